"""The HTTP layer under the app: uvicorn on h11, with limits uvicorn does not have.

    limits = ServerLimits(max_header_bytes=16384, max_headers=100, read_timeout_s=30)
    uvicorn.run(app, host="127.0.0.1", port=8000, **uvicorn_options(limits))

What uvicorn gives by its own settings, set here from `ServerLimits`:
    h11_max_incomplete_event_size   request line + headers, in bytes (431 above)
    timeout_keep_alive              an idle keep-alive connection is closed after it
    timeout_graceful_shutdown       on SIGTERM: how long in-flight requests may take
    limit_concurrency               connections + tasks before 503 (default: none)
What `GuardedH11Protocol` adds:
    - at most `max_headers` header lines (431 above);
    - a read timeout: a request (from its first byte, or from the connection's opening)
      must be received whole, headers and body, within `read_timeout_s`. A slow or
      truncated body is answered 408 and the connection closed; the app sees the client
      leave, with `scope["stealguard.dropped"]` saying why, and logs and records it once.
      Only a request the app never saw (headers not complete) is logged here.
    - header refusals answered as JSON `{"detail", "code": "header_too_large"}` and logged
      once, without a traceback.

On SIGTERM uvicorn stops accepting, closes idle connections, lets each request in flight
finish (up to `graceful_s`), then runs the app's shutdown (the batcher answers what it holds):
a clean stop leaves no image counted but unanswered. kill -9 can leave the requests then in
flight counted (their charges were committed before the model ran).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from stealguard.errors import ConfigError

log = logging.getLogger("stealguard.service")


@dataclass(frozen=True)
class ServerLimits:
    """What one connection may send, and how long the server waits for it."""

    max_header_bytes: int = 16 * 1024  # request line + headers (431 above)
    max_headers: int = 100  # header lines (431 above)
    read_timeout_s: float = 30.0  # a whole request, headers and body (408 after)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after it
    graceful_s: float = 30.0  # SIGTERM: the longest wait for requests in flight
    limit_concurrency: int | None = None  # connections + tasks before 503 (None: no limit)

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_headers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("read_timeout_s", "keep_alive_s", "graceful_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ConfigError(f"limit_concurrency must be >= 1, got {self.limit_concurrency}")


def uvicorn_options(limits: ServerLimits) -> dict[str, Any]:
    """The keyword arguments of uvicorn.run / uvicorn.Config that apply `limits`."""
    protocol = type("BoundGuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    return {"http": protocol, "h11_max_incomplete_event_size": limits.max_header_bytes,
            "timeout_keep_alive": limits.keep_alive_s,
            "timeout_graceful_shutdown": limits.graceful_s,
            "limit_concurrency": limits.limit_concurrency}


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header count limit, a whole-request read timeout and
    JSON answers for header refusals. `limits` is set on a subclass (uvicorn_options)."""

    limits: ServerLimits = ServerLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: Any = None
        self._received = 0  # bytes of the current request so far
        next_event = self.conn.next_event

        def checked_next_event() -> Any:
            """h11's next event, with protocol errors answered here (uvicorn would log a
            second, vaguer line and answer 400 whatever h11's status hint)."""
            try:
                event = next_event()
                if isinstance(event, h11.Request):
                    self._check_headers(event)
            except h11.RemoteProtocolError as e:
                self._refuse(e.error_status_hint, str(e))
                return h11.NEED_DATA  # uvicorn's loop stops; the connection is closing
            return event

        self.conn.next_event = checked_next_event  # type: ignore[method-assign]

    def _check_headers(self, event: h11.Request) -> None:
        """h11 bounds only headers still incomplete in its buffer; a whole oversized block
        arriving at once is measured here."""
        size = len(event.method) + len(event.target) + 12 + sum(
            len(k) + len(v) + 4 for k, v in event.headers)
        msg = None
        if len(event.headers) > self.limits.max_headers:
            msg = f"{len(event.headers)} request headers; the limit is {self.limits.max_headers}"
        elif size > self.limits.max_header_bytes:
            msg = f"{size} bytes of request line and headers"
        if msg is not None:
            raise h11.RemoteProtocolError(msg, error_status_hint=431)

    # the read timeout --------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request must arrive in time too

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None:  # the first bytes of a new request
            self._received = 0
            self._arm()
        self._received += len(data)
        super().data_received(data)
        if self.cycle is not None and not self.cycle.more_body:
            self._disarm()  # received whole; the app answers in its own time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.limits.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        t = self.limits.read_timeout_s
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            # The app is reading this body: tell it why it ends, answer 408, close.
            self.scope["stealguard.dropped"] = f"body not complete after {t:g} s"  # type: ignore[typeddict-unknown-key]
            self._answer(408, "read_timeout", f"the request body was not received within "
                                              f"{t:g} s", started=cycle.response_started)
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.close()
            return
        if self._received and (cycle is None or cycle.response_complete):
            log.warning("dropped a connection from %s: request headers not complete after "
                        "%g s (%d bytes)", _peer(self.client), t, self._received)
            self._answer(408, "read_timeout", f"the request headers were not received within "
                                              f"{t:g} s")
        self.transport.close()  # silent when nothing was sent: an idle connection

    # header refusals ---------------------------------------------------------------------

    def _refuse(self, status: int, why: str) -> None:
        self._disarm()
        if status == 431:
            log.warning("refused a request from %s: %s", _peer(self.client), why)
            self._answer(431, "header_too_large", f"request headers refused: {why}; at most "
                         f"{self.limits.max_headers} headers and {self.limits.max_header_bytes} "
                         f"bytes")
        else:
            log.warning("refused a request from %s: invalid HTTP (%s)", _peer(self.client), why)
            self._answer(400, "malformed_json", f"invalid HTTP request: {why}")
        self.transport.close()

    def _answer(self, status: int, code: str, detail: str, *, started: bool = False) -> None:
        """Write a JSON error straight to the connection (no app involved), if it can."""
        if started:
            return
        body = json.dumps({"detail": detail, "code": code}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            for event in (h11.Response(status_code=status, headers=headers),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:  # a state h11 cannot answer from: just close
            pass


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
