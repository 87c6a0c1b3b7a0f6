"""A lean HTTP/1.1 client for posting webhooks: keep-alive connections on asyncio Protocols, responses
parsed by httptools (llhttp).

aiohttp's ClientSession spends about three times the CPU of a plain protocol per request (its request
and response objects, cookie and header machinery, timers), and delivery posts nothing but small
signed JSON bodies to a few receivers, so it gets this. Polling APIs keeps aiohttp.

What it does: POST with a body, keep-alive pooled per (scheme, host, port), http and https
(the system's CAs, hostname verified, SNI), Basic auth from the URL's userinfo. What it does not:
proxies, redirects (a 3xx is a response like any other), compression, pipelining. Timeouts are the
caller's: cancel the task; a cancelled request's connection is closed, never reused. Every failure to
get a response is a `WebhookError` whose message is one line naming host and port only, never the
URL's path, query or credentials. What is read of a response is bounded whatever the receiver sends:
a status line and headers over MAX_HEAD fail the request; a body beyond MAX_DRAIN, and trailers or
chunk framing beyond MAX_HEAD, are not read on (the status stands, the connection is closed).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
from collections.abc import Mapping

import httptools
from yarl import URL

KEEPALIVE = 15.0  # seconds a connection may stay idle before it is closed (aiohttp's default)
MAX_DRAIN = 64 * 1024  # body bytes read to keep a connection reusable; beyond, it is closed instead
# Bytes of a response that are not body (status line, headers, informational responses before it,
# chunk framing, trailers). The parser keeps a partial header line itself, so without a cap a
# receiver that never ends one has it buffered until webhook_timeout (234 MB in 10 s). 64 KiB is
# Python's http.client line limit and eight times aiohttp's per-field limit: a webhook receiver's
# answer uses a few hundred bytes of it, and 256 connections can never hold more than 16 MiB.
MAX_HEAD = 64 * 1024
# Bytes of an error body kept for the message. The deliverer shows 200 characters of it, after
# taking secrets out: cut first, a secret echoed by the receiver could be left in part.
SNIPPET = 1024
ROUTES_KEPT = 1024  # parsed URLs kept


class WebhookError(Exception):
    """No response: the connection, TLS or the response itself failed. str() is a one-line reason."""


class Response:
    """What delivery needs from a response: the status, two headers and the start of the body."""

    __slots__ = ("status", "retry_after", "location", "snippet")

    def __init__(self, status: int, retry_after: str | None, location: str | None, snippet: bytes) -> None:
        self.status, self.retry_after, self.location, self.snippet = status, retry_after, location, snippet


class _Route:
    """One URL, parsed once: where to connect and the fixed start of every request to it."""

    __slots__ = ("key", "host", "port", "tls", "where", "head")

    def __init__(self, url: str, user_agent: str) -> None:
        try:
            u = URL(url)
            host, port = u.raw_host, u.port
        except (ValueError, TypeError):
            raise WebhookError("invalid webhook URL (check webhook_url)") from None
        if u.scheme not in ("http", "https") or not host or port is None:
            raise WebhookError("unsupported webhook URL: only absolute http:// and https:// URLs (check webhook_url)")
        self.tls = u.scheme == "https"
        self.host, self.port = host, port
        self.key = (u.scheme, host, port)
        bracketed = f"[{host}]" if ":" in host else host
        self.where = f"{bracketed}:{port}"
        host_header = bracketed if port == (443 if self.tls else 80) else self.where
        lines = [f"POST {u.raw_path_qs or '/'} HTTP/1.1", f"Host: {host_header}", "Content-Type: application/json",
                 f"User-Agent: {user_agent}"]
        if u.raw_user is not None or u.raw_password is not None:  # as aiohttp: Basic auth from the userinfo
            credentials = f"{u.user or ''}:{u.password or ''}"
            try:
                raw = credentials.encode("latin-1")
            except UnicodeEncodeError:
                raw = credentials.encode()
            lines.append("Authorization: Basic " + base64.b64encode(raw).decode())
        self.head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")


class _Connection(asyncio.Protocol):
    """One connection; the parser's callbacks gather one response at a time."""

    def __init__(self, route: _Route) -> None:
        self.route = route
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None  # set while a request is out
        self.active = False  # a request is out and its response is not complete yet
        self.closed = False  # peer closed, connection lost, or we closed it
        self.reusable = False  # the last response was complete and the peer keeps the connection open
        self.idle_since = 0.0
        self.keepalive = KEEPALIVE
        self.received = 0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.retry_after: str | None = None
        self.location: str | None = None
        self.snippet = b""
        self.body_bytes = 0

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes nobody asked for (idle, or after the response): the connection's state is unknown.
            self.reusable = False
            self.close()
            return
        while True:
            # Fed at most up to the cap of what is not body, so the parser never holds more of a head.
            room = MAX_HEAD - (self.received - self.body_bytes)
            if room <= 0:
                self._too_long()
                return
            piece = data if len(data) <= room else data[:room]
            self.received += len(piece)
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self._end(keep=False)  # 101: not HTTP any more; the status is the outcome
                return
            except httptools.HttpParserError as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                self._fail(f"invalid HTTP response from {self.route.where}: {reason}")
                return
            if piece is data or self.closed:
                return
            data = data[len(piece):]
            if self.complete:  # more bytes after the response: the connection's state is unknown
                self.reusable = False
                self.close()
                return

    def _too_long(self) -> None:
        if self.headers_done and self.status >= 200:
            self._end(keep=False)  # endless trailers or chunk framing: the status is the answer
        else:
            self._fail(f"invalid HTTP response from {self.route.where}: the status line and headers exceed "
                       f"{MAX_HEAD // 1024} KiB")

    def eof_received(self) -> bool:
        self._lost(None)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        if self.complete:  # a second response in the same read: the connection's state is unknown
            self.reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        name = name.lower()
        if name == b"retry-after":
            self.retry_after = value.decode("latin-1")
        elif name == b"location":
            self.location = value.decode("latin-1")
        elif name == b"keep-alive":  # timeout=N: the server's idle timeout; close ours a second sooner
            for part in value.split(b","):
                key, _, number = part.strip().partition(b"=")
                if key.lower() == b"timeout" and number.strip().isdigit():
                    self.keepalive = max(0.0, min(KEEPALIVE, int(number) - 1.0))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        self.status = self.parser.get_status_code()
        self.headers_done = True
        if 200 <= self.status < 300:
            # Accepted: that is the outcome, whatever happens to the body. The rest of the response
            # is read on (the connection is reused if it completes by the time the caller resumes).
            self._answer()

    def on_body(self, body: bytes) -> None:
        if self.complete or self.status < 200:
            return
        if len(self.snippet) < SNIPPET:
            self.snippet += body[:SNIPPET - len(self.snippet)]
        self.body_bytes += len(body)
        if self.body_bytes > MAX_DRAIN:
            self._end(keep=False)  # not worth reading on: close the connection instead

    def on_message_complete(self) -> None:
        if self.complete:
            return
        status = self.status
        if 100 <= status < 200 and status != 101:  # informational (100 Continue, 103): the real one follows
            self._reset()
            return
        self._end(keep=status != 101 and self.parser.should_keep_alive())

    # -- the request's side --

    def _answer(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self, keep: bool) -> None:
        if self.active:
            self.active = False
            self.complete = True
            self.reusable = keep and not self.closed
            if not keep:
                self.close()
            self._answer()

    def _fail(self, message: str) -> None:
        self.active = False
        self.reusable = False
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(WebhookError(message))
        self.close()

    def _lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if not self.active:
            return
        waiter = self.waiter
        if waiter is None or waiter.done():  # answered already (a 2xx): its body is cut short, no matter
            self.active = False
            return
        if self.headers_done and self.status >= 200:
            # The status is known: that is the outcome (a close-delimited body ends here, and a body
            # cut short does not change what the receiver answered).
            self._end(keep=False)
            return
        how = "reset" if isinstance(exc, ConnectionResetError) else "closed"
        when = "in the middle of the response" if self.received else "before any response"
        reason = f" ({_os_reason(exc)})" if exc is not None and not isinstance(exc, ConnectionResetError) else ""
        waiter.set_exception(WebhookError(f"connection to {self.route.where} {how} by the receiver {when}{reason}"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # nothing of ours is worth flushing: the request failed or is done


class WebhookClient:
    """Posts webhooks over pooled keep-alive connections; at most `limit` connections are kept.

    In-flight requests are bounded by the caller (the deliverer's workers): beyond `limit`, idle
    connections are closed to make room, and a connection finishing while over the limit is closed."""

    def __init__(self, limit: int = 100, *, user_agent: str = "syncd", ssl_context: ssl.SSLContext | None = None) -> None:
        self.limit = max(1, limit)
        self.user_agent = user_agent
        self._ssl = ssl_context
        self._routes: dict[str, _Route] = {}
        self._idle: dict[tuple, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> WebhookClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection, idle or in use; later posts fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing (their sockets) before the loop may stop

    async def post(self, url: str, body: bytes, headers: Mapping[str, str] | None = None) -> Response:
        """POST `body` (JSON) to `url` with extra `headers`; the response, whatever its status.

        Raises WebhookError when there is no response. A request on a reused connection that the
        receiver closed meanwhile fails too (it is not sent again here: the receiver may have got it)."""
        if self._closed:
            raise WebhookError("the webhook client is closed")
        route = self._routes.get(url)
        if route is None:
            route = self._route(url)
        extra = b""
        if headers:
            lines = [f"{k}: {v}" for k, v in headers.items()]
            text = "\r\n".join(lines)
            breaks = len(lines) - 1
            if text.count("\n") != breaks or text.count("\r") != breaks:  # no header injection
                raise WebhookError("a header name or value contains a line break")
            try:
                extra = (text + "\r\n").encode("latin-1")
            except UnicodeEncodeError:
                raise WebhookError("a header name or value is not Latin-1 text") from None
        conn = self._take(route.key)
        if conn is None:
            conn = await self._connect(route)
        loop = asyncio.get_running_loop()
        waiter = conn.waiter = loop.create_future()
        conn._reset()
        conn.received = 0
        conn.reusable = False
        conn.active = True
        try:
            conn.transport.write(b"%s%d\r\n%s\r\n%s" % (route.head, len(body), extra, body))
            await waiter
        except BaseException:
            self._discard(conn)  # cancelled (timed out, shutdown) or failed: never reuse
            raise
        conn.waiter = None
        response = Response(conn.status, conn.retry_after, conn.location, conn.snippet)
        # A 2xx answers at its headers; a body still arriving now would take a wait: close instead.
        if conn.complete and conn.reusable and not self._closed and len(self._open) <= self.limit:
            conn.idle_since = loop.time()
            self._idle.setdefault(route.key, []).append(conn)
            if self._sweeper is None:
                self._sweeper = loop.call_later(KEEPALIVE, self._sweep)
        else:
            self._discard(conn)
        return response

    def _route(self, url: str) -> _Route:
        if len(self._routes) >= ROUTES_KEPT:
            self._routes.clear()
        route = self._routes[url] = _Route(url, self.user_agent)
        return route

    def _take(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed by the peer
            if not conn.closed and now - conn.idle_since < conn.keepalive:
                return conn
            self._discard(conn)
        return None

    async def _connect(self, route: _Route) -> _Connection:
        if len(self._open) >= self.limit:
            self._evict()
        loop = asyncio.get_running_loop()
        tls = None
        if route.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            _, conn = await loop.create_connection(lambda: _Connection(route), route.host, route.port, ssl=tls,
                                                   server_hostname=route.host if tls else None,
                                                   happy_eyeballs_delay=0.25)
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or exc.reason or str(exc)
            raise WebhookError(f"cannot connect to {route.where}: TLS certificate not accepted: {reason} (the receiver "
                               f"needs a certificate for this host name from a CA the system trusts)") from None
        except ssl.SSLError as exc:
            raise WebhookError(f"cannot connect to {route.where}: TLS handshake failed: {exc.reason or exc} "
                               f"(is it an https:// receiver?)") from None
        except socket.gaierror as exc:
            raise WebhookError(f"cannot connect to {route.where}: cannot resolve the host name: {_os_reason(exc)} "
                               f"(check webhook_url and DNS)") from None
        except OSError as exc:
            raise WebhookError(f"cannot connect to {route.where}: {_os_reason(exc)} (is the receiver up?)") from None
        if self._closed:
            conn.close()
            raise WebhookError("the webhook client is closed")
        self._open.add(conn)
        return conn

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    def _evict(self) -> None:
        """Close the longest idle connection to any host, to stay within the limit."""
        oldest = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest[0].idle_since):
                oldest = conns
        if oldest:
            self._discard(oldest.pop(0))

    def _sweep(self) -> None:
        """Close connections idle for longer than their keep-alive, so that none linger unused."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for key, conns in list(self._idle.items()):
            kept = []
            for conn in conns:
                if conn.closed or now - conn.idle_since >= conn.keepalive:
                    self._discard(conn)
                else:
                    kept.append(conn)
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)


def _os_reason(exc: BaseException | None) -> str:
    """An OSError's reason without the address tuples asyncio adds ("Connect call failed ('::1', 80)")."""
    if exc is None:
        return "no reason given"
    if isinstance(exc, OSError) and exc.errno is not None:
        try:
            return os.strerror(exc.errno) if exc.errno > 0 else (exc.strerror or str(exc))
        except ValueError:
            pass
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
