"""Test helper: a real S3-protocol server (moto's ThreadedMotoServer) on 127.0.0.1, one per test session.

The server runs in the pytest process; its objects live in moto's in-process backend, so
:meth:`S3Server.restart` (stop, then serve again on the same port) keeps them, like a real
S3 endpoint that went away for a moment. The client side finds it the way any AWS SDK user
would: ``AWS_ENDPOINT_URL`` and the ``AWS_*`` credential variables in the environment
(inherited by every subprocess, Ray worker and DataLoader worker), never through our configs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from noiserefine.train.distributed import free_port

BUCKET = "noiserefine-test"


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
            self.server.start()

    def stop(self) -> None:
        with self.lock:
            if self.server is not None:
                listening = self.server._server
                self.server.stop()  # stops serving, but leaves the socket listening: clients would hang
                if listening is not None:
                    listening.server_close()  # now they are refused, as by a server that is down
                self.server = None

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def restart_in_background(self, down_s: float = 1.0) -> threading.Thread:
        thread = threading.Thread(target=self.restart, args=(down_s,), daemon=True)
        thread.start()
        return thread


def s3_env(endpoint: str) -> dict[str, str]:
    """What a user's environment would say: credentials and endpoint for botocore (no ~/.aws files)."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE":
            "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
    server = S3Server()
    server.start()
    saved = {key: os.environ.get(key) for key in s3_env(server.endpoint)}
    os.environ.update(s3_env(server.endpoint))
    from noiserefine.storage.s3 import s3_filesystem

    try:
        s3_filesystem().mkdir(BUCKET)
    except FileExistsError:  # moto's state lives in this process: a bucket of an earlier server
        pass
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def s3_url(*parts: str) -> str:
    return "s3://" + "/".join([BUCKET, *parts])


def upload_dir(local: Path, url: str) -> str:
    """Copy a local cache directory's files to ``url`` (an ``s3://`` prefix)."""
    from noiserefine.storage import store_for

    store = store_for(url)
    for path in sorted(Path(local).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            store.write_bytes(path.name, path.read_bytes())
    return url


def object_etags(url: str) -> dict[str, str]:
    """{name: ETag} of every object under ``url``: changes if an object is rewritten."""
    from noiserefine.storage import store_for

    store = store_for(url)
    return {name: store.version(name) for name in store.names()}


def run_job_in_process(argv: list[str]) -> tuple[int, str, str]:
    """``pipeline/generate_targets.py`` main(argv) in this process (no interpreter start-up: the S3 server is
    here too): exit code, stdout, stderr. The process's I/O settings and torch thread count are restored."""
    import contextlib
    import importlib.util
    import io

    from noiserefine.storage import retries

    spec = importlib.util.spec_from_file_location("generate_targets_job",
                                                  Path(__file__).resolve().parents[1] / "pipeline" /
                                                  "generate_targets.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    import torch

    out, err = io.StringIO(), io.StringIO()
    saved = (retries._policy, retries._chunk_bytes, torch.get_num_threads())
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = job.main(argv)
    finally:
        retries._policy, retries._chunk_bytes, threads = saved
        torch.set_num_threads(threads)  # the job's worker sets its own count
    return code, out.getvalue(), err.getvalue()
