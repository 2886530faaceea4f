"""Running the server: in a background thread of this process (tests, benchmarks) or waiting for one started
as ``python -m companion serve`` in another process (the notebook).

``uvicorn.Server`` runs in a daemon thread and stops when ``should_exit`` is set (uvicorn's own shutdown path:
open connections finish, the app's lifespan stops the engine).
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from types import TracebackType

from fastapi import FastAPI


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_healthy(base_url: str, timeout: float = 60.0, interval: float = 0.1) -> float:
    """Poll ``{base_url}/health`` until it answers 200; returns the seconds waited, raises ``TimeoutError``."""
    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet (URLError), or 503 while loading (HTTPError is a URLError)
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout} s")
        time.sleep(interval)


class ServerThread:
    """``with ServerThread(app) as server: ... server.url ...``: uvicorn on 127.0.0.1 and a free port, in a daemon
    thread; leaving the block stops it (``should_exit``) and waits for the thread."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self.thread.join(30)
