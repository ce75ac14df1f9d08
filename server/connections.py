"""Connection limits below the ASGI app, in uvicorn's protocol classes (``server.__main__``).

- A request read timeout: a connection must deliver a whole request (headers and body) within
  ``request_read_timeout_s`` of being opened or of its previous response; otherwise it is closed
  (``408`` when no request had started). Half-sent and silent connections no longer live forever.
- A cap on open connections (HTTP and WebSocket alike: one TCP connection each), in total
  (``max_connections``) and per client address (``max_connections_per_address``). Past it the
  connection is answered ``503`` in the OpenAI envelope with ``Retry-After`` and closed; a
  WebSocket handshake gets the same 503.
- A send timeout: a response the client stops reading (the transport's buffer above its high-water
  mark and shrinking by less than 64 KiB in ``send_timeout_s``) is aborted, which frees what the buffer holds
  (a 14 MB base64 answer per non-reading client otherwise stays until the client leaves).
- ``raise_nofile_limit``: the soft ``RLIMIT_NOFILE`` raised to the hard limit at startup, so the
  cap (not the kernel) is what refuses, with descriptors left for images and the database.

The count is per TCP transport, so it covers a connection after its WebSocket upgrade too: the
WebSocket protocol class releases it when the socket closes.
"""

from __future__ import annotations

import json
import logging
import struct

from server.config import Settings

log = logging.getLogger(__name__)
FD_HEADROOM = 256  # descriptors kept for image files, SQLite, Redis, model files
MIN_SEND_PROGRESS = 65_536  # bytes a client must take per send_timeout_s to count as reading
REFUSAL_WAIT_S = 2.0  # how long a refused connection may take to send its request headers


class ConnectionCounter:
    """Open connections, in total and per address; ``admit`` counts one or says no."""

    def __init__(self, total: int, per_address: int):
        self.total, self.per_address = total, per_address
        self.by_address: dict[str, int] = {}
        self.open: set[int] = set()  # id() of counted transports

    def admit(self, transport, address: str) -> str | None:
        """None when admitted (and counted), else why not."""
        if len(self.open) >= self.total:
            return f"the server has {self.total} open connections, its limit"
        if self.by_address.get(address, 0) >= self.per_address:
            return f"{self.per_address} connections from your address are open, the limit per address"
        self.open.add(id(transport))
        self.by_address[address] = self.by_address.get(address, 0) + 1
        return None

    def release(self, transport, address: str) -> None:
        """Idempotent: the HTTP and the WebSocket protocol of one transport may both call it."""
        if id(transport) not in self.open:
            return
        self.open.discard(id(transport))
        left = self.by_address.get(address, 1) - 1
        if left > 0:
            self.by_address[address] = left
        else:
            self.by_address.pop(address, None)


def refusal_bytes(reason: str) -> bytes:
    body = json.dumps({"error": {"message": f"Too many connections: {reason}; retry shortly.",
                                 "type": "server_error", "param": None, "code": "too_many_connections"}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HTTPGuard:
    """Mixed into uvicorn's HTTP protocol: the cap and the request read timeout. ``counter`` and
    ``timeout_s`` are class attributes set by ``guarded_protocols``."""

    counter: ConnectionCounter
    timeout_s: float
    send_timeout_s: float
    refused: bytes | None = None
    read_timer = None
    send_timer = None
    armed_cycle = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.address = self.client[0] if self.client else "unknown"
        reason = self.counter.admit(transport, self.address)
        if reason is not None:  # answer once its headers are in: closing on unread data would RST it
            log.warning("refused a connection from %s: %s", self.address, reason)
            self.refused, self.seen = refusal_bytes(reason), b""
            self.read_timer = self.loop.call_later(REFUSAL_WAIT_S, self.send_refusal)
            return
        self.arm()

    def data_received(self, data: bytes) -> None:
        if self.refused is None:
            return super().data_received(data)
        self.seen = (self.seen + data)[-4:]
        if b"\r\n\r\n" in self.seen or b"\r\n\r\n" in data:
            self.send_refusal()

    def send_refusal(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(self.refused)
            self.transport.close()

    def arm(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
        self.armed_cycle = self.cycle
        self.read_timer = self.loop.call_later(self.timeout_s, self.read_timed_out)

    def read_timed_out(self) -> None:
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed, or upgraded to a WebSocket (the WebSocket protocol owns it now)
        if self.flow.write_paused:  # still delivering a response: the send timeout watches that
            return self.arm()
        cycle = self.cycle
        if cycle is not None and cycle is not self.armed_cycle and not cycle.more_body:
            return  # the request arrived in full; its response re-arms the timer
        log.info("closed a connection from %s: no complete request within %.0f s", self.address, self.timeout_s)
        if cycle is None or cycle is self.armed_cycle:
            self.transport.write(REQUEST_TIMEOUT)  # no request had started: say why
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.arm()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.watch_send(unsent_bytes(self.transport))

    def resume_writing(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
        super().resume_writing()

    def watch_send(self, buffered: int) -> None:
        self.send_timer = self.loop.call_later(self.send_timeout_s, self.send_stalled, buffered)

    def send_stalled(self, buffered: int) -> None:
        """The client has not read for ``send_timeout_s``: abort (``close`` would wait for the
        buffer to drain, keeping it for as long as the client stays)."""
        # Closing does not count: uvicorn closes an idle keep-alive connection with ``close``,
        # which keeps the unsent buffer until it drains.
        if self.transport.get_protocol() is not self or not self.flow.write_paused:
            return
        now = unsent_bytes(self.transport)
        if buffered - now >= MIN_SEND_PROGRESS:  # slow, but reading (zero-window probes move a few bytes)
            return self.watch_send(now)
        log.warning("aborted a response to %s: the client read nothing for %.0f s (%d bytes unsent)", self.address,
                 self.send_timeout_s, now)
        self.transport.abort()

    def connection_lost(self, exc) -> None:
        for timer in (self.read_timer, self.send_timer):
            if timer is not None:
                timer.cancel()
        self.counter.release(self.transport, self.address)
        super().connection_lost(exc)


class WebSocketGuard:
    """Mixed into uvicorn's WebSocket protocol: releases the connection's count when it closes."""

    counter: ConnectionCounter

    def connection_lost(self, exc) -> None:
        self.counter.release(self.transport, self.client[0] if self.client else "unknown")
        super().connection_lost(exc)


def guarded_protocols(settings: Settings) -> tuple[type, type]:
    """(http, ws) protocol classes for ``uvicorn.Config``: uvicorn's own, with the limits above,
    sharing one counter."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    counter = ConnectionCounter(effective_max_connections(settings), settings.max_connections_per_address)
    http = type("GuardedHTTP", (HTTPGuard, AutoHTTPProtocol),
                {"counter": counter, "timeout_s": settings.request_read_timeout_s,
                 "send_timeout_s": settings.send_timeout_s})
    ws = type("GuardedWebSocket", (WebSocketGuard, AutoWebSocketsProtocol), {"counter": counter})
    return http, ws


def unsent_bytes(transport) -> int:
    """What the client has not taken yet: the transport's buffer plus the kernel's send queue
    (``SIOCOUTQ``). The sum falls only as the client reads; the transport's buffer alone also
    falls while the kernel's send buffer grows (autotuning) for a client that reads nothing."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    try:
        import fcntl
        import termios

        unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (ImportError, AttributeError, OSError, ValueError):
        pass  # not Linux, or no socket: the transport's buffer alone
    return unsent


def effective_max_connections(settings: Settings) -> int:
    """``max_connections``, lowered to what the descriptor limit allows (with headroom)."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return settings.max_connections
    allowed = soft - FD_HEADROOM if soft != resource.RLIM_INFINITY else settings.max_connections
    if allowed < settings.max_connections:
        log.warning("max_connections %d lowered to %d: only %d file descriptors (ulimit -n)",
                    settings.max_connections, max(allowed, 1), soft)
    return max(1, min(settings.max_connections, allowed))


def raise_nofile_limit(target: int = 65_536) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (at most ``target``); (before, after)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = target if hard == resource.RLIM_INFINITY else min(hard, target)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            log.info("open file limit raised from %d to %d", soft, wanted)
            return soft, wanted
        return soft, soft
    except (ImportError, ValueError, OSError) as exc:
        log.warning("could not raise the open file limit: %s", exc)
        return -1, -1
