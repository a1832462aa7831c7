"""The chaos bench's machinery (``bench/chaos.py``): an S3 server that logs every request it answers, and the
process handling (the Ray workers of a job, signals to a job's process tree).

- :class:`LoggingMotoServer`: moto's ``ThreadedMotoServer`` with its WSGI app wrapped by :class:`RequestLog`.
  A job is told apart by ``AWS_SDK_UA_APP_ID`` (botocore appends ``app/<id>`` to every request's
  User-Agent), so the log says which job wrote which object, when, with which answer and ETag.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


# --- the S3 server's request log ------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    t: float  # time.monotonic() when answered
    method: str
    key: str  # bucket/key, no leading slash
    query: str
    status: int
    app: str  # the client's AWS_SDK_UA_APP_ID ("" if none)
    etag: str
    conditional: str  # "If-None-Match" / "If-Match" / ""

    @property
    def is_write(self) -> bool:  # a write that took effect
        return self.method in ("PUT", "POST", "DELETE") and 200 <= self.status < 300


_APP_RE = re.compile(r"(?:^|\s)app/(\S+)")


class RequestLog:
    def __init__(self) -> None:
        self.entries: list[Request] = []
        self._lock = threading.Lock()

    def wrap(self, app):
        def logged(environ, start_response):
            answer = {}

            def start(status, headers, exc_info=None):
                answer["status"] = int(status.split()[0])
                answer["etag"] = next((v for k, v in headers if k.lower() == "etag"), "")
                return start_response(status, headers, exc_info)

            body = app(environ, start)
            agent = environ.get("HTTP_USER_AGENT", "")
            match = _APP_RE.search(agent)
            conditional = ("If-None-Match" if environ.get("HTTP_IF_NONE_MATCH") else
                           "If-Match" if environ.get("HTTP_IF_MATCH") else "")
            request = Request(time.monotonic(), environ.get("REQUEST_METHOD", ""),
                              environ.get("PATH_INFO", "").lstrip("/"), environ.get("QUERY_STRING", ""),
                              answer.get("status", 0), match.group(1) if match else "", answer.get("etag", ""),
                              conditional)
            with self._lock:
                self.entries.append(request)
            return body

        return logged

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.entries)


class LoggingMotoServer(ThreadedMotoServer):
    """moto's threaded server, every request recorded in ``log`` (the objects live in moto's in-process backend:
    a restart keeps them, as ``tests/helpers_s3.py``'s ``S3Server`` relies on)."""

    log: RequestLog = RequestLog()  # one per process, kept across restarts

    def _server_entry(self) -> None:
        app = self.log.wrap(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


# --- processes ------------------------------------------------------------------------------------------

def process_tree(pid: int) -> list:
    """``pid`` and its living descendants (psutil processes): a local Ray job's raylet, GCS and workers."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def ray_workers(pid: int) -> list[int]:
    """PIDs of the job's teacher workers (Ray titles an actor's process ``ray::TargetWorker...``), sorted."""
    import psutil

    found = []
    for process in process_tree(pid)[1:]:
        try:
            if "TargetWorker" in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.Error:
            pass
    return sorted(found)


def signal_processes(processes: list, sig: int) -> list[int]:
    """Send ``sig`` to each process (by its pid); the pids reached."""
    import psutil

    reached = []
    for process in processes:
        try:
            process.send_signal(sig)
            reached.append(process.pid)
        except psutil.Error:
            pass
    return reached
