"""How many requests an S3 call costs when the server fails: one per attempt of our retry policy (botocore's and
s3fs's own retries are off), so ``data.io_retries`` bounds the requests and, with the client's timeouts, the time.

The server is a small fake endpoint on 127.0.0.1 that counts the requests it receives and either answers every
one with 503 SlowDown or never answers at all (moto cannot be made to do either).
"""

from __future__ import annotations

import http.server
import threading

import pytest

from noiserefine.storage import StorageUnavailable, retries, s3, store_for
from noiserefine.train.distributed import free_port

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')


class FakeEndpoint:
    """An HTTP server counting requests; ``mode`` "503" answers SlowDown, "silent" never answers."""

    def __init__(self, mode: str):
        self.requests: list[str] = []
        self.release = threading.Event()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                endpoint.requests.append(f"{self.command} {self.path}")
                if mode == "silent":
                    endpoint.release.wait(30)  # the client's read timeout ends the request first
                    return
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(SLOW_DOWN)

            do_GET = do_HEAD = do_PUT = do_DELETE = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# "silent" waits out a read timeout per attempt (~2 s a case): `make test` only, not the fast lane
@pytest.fixture(params=["503", pytest.param("silent", marks=pytest.mark.slow)])
def endpoint(request, monkeypatch):
    """A fresh s3fs client (this process's cached one is set aside) pointed at the fake endpoint."""
    fake = FakeEndpoint(request.param)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": fake.url,
                       "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(s3, "_filesystems", {})
    monkeypatch.setattr(s3, "READ_TIMEOUT_S", 0.5)  # the default 60 s, shortened here
    monkeypatch.setattr(retries, "_policy", retries.RetryPolicy(attempts=3, backoff_s=0.01))
    yield fake
    fake.close()


@pytest.mark.parametrize("operation", ["GET", "HEAD", "PUT"])
def test_each_attempt_is_one_request(endpoint, operation):
    """``data.io_retries=2``: 3 attempts, 3 requests (botocore's own retry made it 6; 2 * (io_retries + 1))."""
    store = store_for("s3://some-bucket/cache")
    call = {"GET": lambda: store.read_range("shard-000000.tar", 0, 10),
            "HEAD": lambda: store.size("shard-000000.tar"),
            "PUT": lambda: store.write_bytes("teacher.yaml", b"x")}[operation]
    with pytest.raises(StorageUnavailable, match=r"s3://some-bucket/cache/[^:]+: the object store failed 3 times"):
        call()
    assert len(endpoint.requests) == 3, endpoint.requests

