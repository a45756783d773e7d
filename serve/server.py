"""The HTTP server under the app: uvicorn with connection limits and deadlines.

Plain `uvicorn.run` leaves a connection open for as long as its client likes before it sends a request
(idle sockets, a request line sent one byte at a time) and, after an early answer such as a 413, keeps
reading and discarding whatever body the client still sends. `make_server` configures uvicorn with:

- `max_connections`: uvicorn's `limit_concurrency` (more concurrent connections or requests get a 503);
- `keep_alive_timeout_s`: uvicorn's idle keep-alive timeout;
- `header_timeout_s`: a request's line and headers must arrive within this many seconds of the connection
  opening or of the previous response, however slowly the bytes trickle in; otherwise the connection is
  closed (`GuardedH11Protocol`);
- `max_header_bytes`: h11's limit on a request's line + headers (larger: 400);
- after an answer sent before the whole request body arrived (a 413, a 415, a 401, ...), the rest of the
  body is read and discarded, so the client, which sends its whole body before reading, gets the answer
  instead of a connection reset, but at most `max_drain_bytes` and within `header_timeout_s`; then the
  connection is closed.

The body's own deadline (`Limits.body_timeout_s`) is the app's (`serve.app`): a body that does not arrive
in time is answered with a 408 and the connection closed.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from dataclasses import dataclass

__all__ = ["ServerOptions", "bind_socket", "is_loopback_host", "make_server", "startup_warnings"]


@dataclass
class ServerOptions:
    """Connection limits and deadlines (`mllm serve`'s flags set them)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_connections: int = 128
    keep_alive_timeout_s: float = 5.0
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_drain_bytes: int = 128 * 2**20


def is_loopback_host(host: str) -> bool:
    """Whether binding to `host` keeps the server on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def startup_warnings(host: str, api_key: str | None) -> list[str]:
    """What `mllm serve` prints before it starts: a server reachable from other machines without a key."""
    if is_loopback_host(host) or api_key:
        return []
    warning = (f"warning: serving on {host} without --api-key: anyone who can reach this address can use the "
               "model, and web pages can send it requests; set --api-key KEY (or bind to 127.0.0.1)")
    return [warning]


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound before the model loads: a port in use or an address this machine does
    not have is a ValueError naming --host / --port at once (not a uvicorn log line after the load).
    Pass the socket to `make_server(...).run(sockets=[sock])`."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a port number (use 1024-65535, or 0 for any free port)")
    # uvicorn's own choice: IPv6 for an address with a colon, IPv4 otherwise.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise ValueError(_bind_error(host, port, error)) from None
    return sock


def _bind_error(host: str, port: int, error: OSError) -> str:
    if isinstance(error, socket.gaierror):
        return (f"--host {host} is not an address this machine can resolve ({error.strerror}) (use an IP address "
                "such as 127.0.0.1 or 0.0.0.0, or a known host name)")
    if error.errno == errno.EADDRINUSE:
        return (f"--port {port} is already in use on {host} (stop the program using it, or choose another "
                "--port)")
    if error.errno == errno.EADDRNOTAVAIL:
        return (f"--host {host} is not an address of this machine (use 127.0.0.1 for this machine only, or "
                "0.0.0.0 for every interface)")
    if error.errno == errno.EACCES:
        return f"--port {port}: permission denied (ports below 1024 need administrator rights; use 1024-65535)"
    return f"cannot listen on {host}:{port}: {error.strerror or error} (check --host and --port)"


def guarded_protocol(options: ServerOptions) -> type:
    """uvicorn's h11 protocol with the header deadline and the bounded drain of `options`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        header_timeout_s = options.header_timeout_s
        max_drain_bytes = options.max_drain_bytes

        def connection_made(self, transport) -> None:  # type: ignore[override]
            self._deadline: asyncio.TimerHandle | None = None
            self._timed_cycle = None
            self._drained = 0
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            """The next request's headers (and the rest of an answered request's body) are due in time."""
            self._disarm()
            self._timed_cycle = self.cycle
            self._deadline = self.loop.call_later(self.header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.SEND_BODY and self.conn.our_state in (h11.DONE, h11.MUST_CLOSE):
                # answered before the body ended: the rest is discarded, up to a bound
                self._drained += len(data)
                if self._drained > self.max_drain_bytes:
                    self._disarm()
                    self.transport.close()
                    return
            super().data_received(data)
            if self.cycle is not self._timed_cycle and self._deadline is not None:
                self._disarm()  # a new request's headers are in: the app takes over (its own body deadline)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._drained = 0
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def make_server(app, options: ServerOptions | None = None, log_level: str = "info"):
    """A `uvicorn.Server` for `app` with `options`' limits (`server.run()` serves until stopped)."""
    import uvicorn

    options = options or ServerOptions()
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=log_level,
        http=guarded_protocol(options),
        limit_concurrency=options.max_connections,
        timeout_keep_alive=options.keep_alive_timeout_s,  # type: ignore[arg-type]  (uvicorn uses it as a float)
        h11_max_incomplete_event_size=options.max_header_bytes,
    )
    return uvicorn.Server(config)
