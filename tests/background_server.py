"""Test harness: run `cogvlm2 serve` or `cogvlm2 web` in a background thread of the test process.

    with BackgroundServer(["serve", "--model", "tiny"]) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="none")...

The server binds 127.0.0.1 on a free port chosen by the OS (a socket bound before the thread starts,
so there is no race for the port); its event loop, engine thread and uvicorn run until `stop()`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from cogvlm2.cli import build_parser


class BackgroundServer:
    def __init__(self, argv: list[str], startup_timeout: float = 120):
        self.args = build_parser().parse_args(argv)
        self.command = self.args.command
        self.startup_timeout = startup_timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.args.host, self.args.port = "127.0.0.1", self.port
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"cogvlm2-{self.command}", daemon=True)

    def _run(self) -> None:
        def started(server) -> None:
            self._server = server

        try:
            if self.command == "serve":
                from cogvlm2.serving.api_server import run_server

                asyncio.run(run_server(self.args, sock=self.sock, on_started=started))
            else:
                from cogvlm2.web.app import run_web_app

                asyncio.run(run_web_app(self.args, sock=self.sock, on_started=started))
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e

    def start(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not (self._server is not None and self._server.started):
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the {self.command} server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.command} server did not start in {self.startup_timeout} s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
