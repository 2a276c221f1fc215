"""Connections of `cogvlm2 serve`: the listening socket bound early, a cap on open connections that
fits the open-file limit, header timeouts (slow-loris), and accept() errors logged without floods."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from . import limits
from .errors import APIError

logger = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (not listen) the server's address: done before the model loads, so a taken port is
    reported at once. SystemExit with a clear message on failure."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise SystemExit(f"cogvlm2 serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = " (is another server running there? pick another --port)" if e.errno == 98 else ""
        raise SystemExit(f"cogvlm2 serve: cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock


def connection_cap(requested: int) -> int:
    """`requested` connections, fewer when the open-file limit (raised to its hard limit first) would
    not leave RESERVED_FDS descriptors for everything else."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = requested + limits.RESERVED_FDS
        if soft != resource.RLIM_INFINITY and soft < want and (hard == resource.RLIM_INFINITY or hard > soft):
            soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if soft != resource.RLIM_INFINITY:
            return max(1, min(requested, soft - limits.RESERVED_FDS))
    except (ImportError, ValueError, OSError):
        pass
    return requested


def guarded_protocol(max_connections: int):
    """uvicorn's h11 protocol with a header timeout and a connection cap: a connection past the cap
    gets 503 and is closed at once (no file-descriptor exhaustion, no accept() error floods); one
    that has not sent complete headers HEADER_TIMEOUT_S after connecting (or after the first byte
    of a kept-alive request) gets 408 and is closed (slow-loris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    def raw(status: str, message: str) -> bytes:
        body = APIError(message, status=int(status.split()[0])).to_response().model_dump_json().encode()
        return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"retry-after: {limits.RETRY_AFTER_S}\r\nconnection: close\r\n\r\n").encode() + body

    busy = raw("503 Service Unavailable", f"too many connections (limit {max_connections}); retry later")
    slow = raw("408 Request Timeout", f"request headers not received within {limits.HEADER_TIMEOUT_S:g} s")

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:  # waiting for a request's headers
                self._arm()
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # its headers arrived
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(limits.HEADER_TIMEOUT_S, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.write(slow)
                self.transport.close()

    return GuardedH11Protocol


def quiet_resource_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio reports every failed accept() (EMFILE: out of file descriptors) with a traceback;
    report it once per minute in one line instead."""
    last = [0.0]

    def handler(loop, context) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (23, 24, 105, 12):  # ENFILE, EMFILE, ENOBUFS, ENOMEM
            if time.monotonic() - last[0] > 60:
                last[0] = time.monotonic()
                logger.warning("%s: %s (new connections wait; lower --max-connections or raise `ulimit -n`)",
                               context.get("message"), exc)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
