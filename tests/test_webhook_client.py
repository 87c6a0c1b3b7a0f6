"""The webhook client against real servers on loopback: an aiohttp receiver for the normal cases, raw
asyncio servers for the misbehaving ones, and an https receiver with a certificate made here."""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import ssl
import subprocess
from typing import Self

import pytest
from aiohttp import web

from syncd.http import USER_AGENT
from syncd.webhook_client import MAX_DRAIN, SNIPPET, WebhookClient, WebhookError

pytestmark = pytest.mark.timeout(10)


async def serve(handler, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve `handler` for every path on `host` and a free port (https with `ssl_context`)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, host, 0, ssl_context=ssl_context).start()
    return runner, runner.addresses[0][1]


class Hook:
    """An aiohttp receiver that records each request and the connection it came on."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.respond = lambda request: web.Response(status=204)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append({"headers": dict(request.headers), "body": body, "path": request.path_qs,
                              "connection": id(request.transport)})
        return self.respond(request)

    @property
    def connections(self) -> int:
        return len({r["connection"] for r in self.requests})


@pytest.fixture
async def hook():
    h = Hook()
    runner, port = await serve(h.handle)
    h.url = f"http://127.0.0.1:{port}"
    try:
        yield h
    finally:
        await runner.cleanup()


class _Loopback:
    """A raw asyncio server on a loopback port; `_serve` says how it misbehaves."""

    async def start(self, host: str = "127.0.0.1") -> Self:
        self.server = await asyncio.start_server(self._serve, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://{host}:{self.port}/hook"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


class Raw(_Loopback):
    """A raw HTTP server for misbehaviour: `respond(connection, request)` (numbered from 0) returns the
    bytes to answer and whether to close afterwards, or None to never answer."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.connections = 0
        self.requests: list[bytes] = []
        self.got_request = asyncio.Event()
        self.closed_by_client = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self.connections = self.connections, self.connections + 1
        try:
            for index in range(1000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                self.requests.append(head + await reader.readexactly(length))
                self.got_request.set()
                answer = self.respond(number, index)
                if answer is None:
                    await reader.read()  # never answer; wait for the client to give up
                    self.closed_by_client.set()
                    return
                data, close = answer
                writer.write(data)
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()


@pytest.fixture
async def raw():
    servers = []

    async def make(respond, host="127.0.0.1"):
        servers.append(await Raw(respond).start(host))
        return servers[-1]

    yield make
    for s in servers:
        await s.close()


async def test_keep_alive_one_connection_for_many_posts_and_the_request_as_sent(hook):
    async with WebhookClient(4, user_agent=USER_AGENT) as client:
        for i in range(20):
            resp = await client.post(hook.url + "/hook?x=1", b'{"n":%d}' % i, {"webhook-id": f"evt_{i}"})
            assert resp.status == 204
        # As many in flight as the limit (the deliverer's concurrency): one connection each, the idle one reused.
        for _ in range(3):
            await asyncio.gather(*(client.post(hook.url + "/hook", b"{}") for _ in range(4)))
    assert hook.requests[0]["connection"] == hook.requests[19]["connection"]
    assert hook.connections <= 4
    first = hook.requests[0]
    assert first["path"] == "/hook?x=1" and first["body"] == b'{"n":0}'
    h = first["headers"]
    assert h["Content-Type"] == "application/json" and h["User-Agent"] == USER_AGENT
    assert h["Host"] == hook.url.removeprefix("http://") and h["Content-Length"] == "7" and h["webhook-id"] == "evt_0"


async def test_basic_auth_from_the_url_and_status_headers_snippet(hook):
    hook.respond = lambda r: web.Response(status=503, headers={"Retry-After": "7"}, text="  busy,\n try later " + "x" * 5000)
    url = hook.url.replace("http://", "http://user:p%40ss@") + "/hook?token=t0ken"
    async with WebhookClient(1) as client:
        resp = await client.post(url, b"{}")
        assert (resp.status, resp.retry_after) == (503, "7")
        assert resp.snippet.startswith(b"  busy,\n try later xxx") and len(resp.snippet) == SNIPPET
        hook.respond = lambda r: web.Response(status=302, headers={"Location": "https://elsewhere.example/in"})
        resp = await client.post(url, b"{}")
        assert (resp.status, resp.location) == (302, "https://elsewhere.example/in")
    assert hook.requests[0]["headers"]["Authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert hook.connections == 1


@pytest.mark.parametrize("response, reused", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n", True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
])
async def test_response_framing_and_reuse(raw, response, reused):
    server = await raw(lambda conn, req: (response, not reused))
    async with WebhookClient(4) as client:
        for _ in range(3):
            assert (await client.post(server.url, b"{}")).status in (200, 204)
    assert server.connections == (1 if reused else 3)


async def test_a_keep_alive_timeout_from_the_server_is_respected(raw):
    # Keep-Alive: timeout=1 (Node.js sends timeout=5): reusing it later would race the server's close.
    server = await raw(lambda conn, req: (b"HTTP/1.1 204 No Content\r\nKeep-Alive: timeout=1\r\n\r\n", False))
    async with WebhookClient(1) as client:
        for _ in range(2):
            assert (await client.post(server.url, b"{}")).status == 204
    assert server.connections == 2


async def test_close_delimited_body_and_an_error_snippet_across_reads(raw):
    server = await raw(lambda conn, req: (b"HTTP/1.1 500 Oops\r\n\r\n{\"error\": \"invalid token\"}", True))
    async with WebhookClient(1) as client:
        for _ in range(2):
            resp = await client.post(server.url, b"{}")
            assert (resp.status, resp.snippet) == (500, b'{"error": "invalid token"}')
    assert server.connections == 2


async def test_informational_responses_are_skipped(raw):
    early = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
             b"HTTP/1.1 201 Created\r\nLocation: /ignored\r\nContent-Length: 0\r\n\r\n")
    server = await raw(lambda conn, req: (early, False))
    async with WebhookClient(1) as client:
        for _ in range(2):
            resp = await client.post(server.url, b"{}")
            assert (resp.status, resp.location) == (201, "/ignored")
    assert server.connections == 1


async def test_switching_protocols_is_a_final_answer_and_the_connection_is_not_reused(raw):
    server = await raw(lambda conn, req: (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", False))
    async with WebhookClient(1) as client:
        for _ in range(2):
            assert (await client.post(server.url, b"{}")).status == 101
    assert server.connections == 2


async def test_a_huge_body_closes_the_connection_instead_of_being_read(raw):
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (4 * MAX_DRAIN) + b"x" * (4 * MAX_DRAIN)
    server = await raw(lambda conn, req: (big, False) if req == 0 else None)
    async with WebhookClient(1) as client:
        resp = await client.post(server.url, b"{}")
        assert resp.status == 200
        await asyncio.wait_for(server.closed_by_client.wait(), 2)


async def test_a_2xx_is_the_answer_at_its_headers_even_if_its_body_never_ends(raw):
    # The receiver accepted the event: a body that stalls must not turn that into a timeout (and a
    # duplicate). The connection, its response unfinished, is closed rather than reused.
    stalled = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial"
    server = await raw(lambda conn, req: (stalled, False))
    async with WebhookClient(1) as client:
        for _ in range(2):
            resp = await asyncio.wait_for(client.post(server.url, b"{}"), 2)
            assert resp.status == 200
    assert server.connections == 2


async def test_a_server_closing_idle_connections_between_posts(raw):
    server = await raw(lambda conn, req: (b"HTTP/1.1 204 No Content\r\n\r\n", True))  # closes after answering
    async with WebhookClient(1) as client:
        for _ in range(3):
            assert (await client.post(server.url, b"{}")).status == 204
            # Let the client's loop see the server's FIN (nothing of the client's to await for it).
            await asyncio.sleep(0.02)
    assert server.connections == 3


async def test_a_reused_connection_closed_before_any_response_fails_the_attempt_without_resending(raw):
    # The race a keep-alive timeout creates: the request goes out on a connection the server drops.
    server = await raw(lambda conn, req: (b"HTTP/1.1 204 No Content\r\n\r\n", False) if req == 0 else (b"", True))
    async with WebhookClient(1) as client:
        assert (await client.post(server.url, b"{}")).status == 204
        with pytest.raises(WebhookError) as failed:
            await client.post(server.url, b"{}")
        assert str(failed.value) == f"connection to 127.0.0.1:{server.port} closed by the receiver before any response"
        assert (await client.post(server.url, b"{}")).status == 204
    assert len(server.requests) == 3 and server.connections == 2  # not sent again on its own


async def test_cancelling_a_post_closes_its_connection(raw):
    server = await raw(lambda conn, req: None)  # never answers
    async with WebhookClient(1) as client:
        task = asyncio.create_task(client.post(server.url, b"{}"))
        await asyncio.wait_for(server.got_request.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed_by_client.wait(), 2)


async def test_closing_the_client_closes_idle_connections(raw):
    server = await raw(lambda conn, req: (b"HTTP/1.1 204 No Content\r\n\r\n", False))
    client = WebhookClient(1)
    assert (await client.post(server.url, b"{}")).status == 204
    await client.close()
    await asyncio.wait_for(server.closed_by_client.wait(), 2)
    with pytest.raises(WebhookError, match="closed"):
        await client.post(server.url, b"{}")


async def test_garbage_is_an_invalid_response(raw):
    server = await raw(lambda conn, req: (b"SSH-2.0-OpenSSH_9.6\r\n", False))
    async with WebhookClient(1) as client:
        with pytest.raises(WebhookError, match=rf"^invalid HTTP response from 127.0.0.1:{server.port}: "):
            await client.post(server.url, b"{}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_refused_and_reset_errors_name_host_and_port_never_the_urls_secrets(raw):
    secrets = ("s3cret-user", "s3cret-pass", "s3cret-token", "/private-path")
    port = free_port()
    async with WebhookClient(1) as client:
        with pytest.raises(WebhookError) as refused:
            await client.post(f"http://s3cret-user:s3cret-pass@127.0.0.1:{port}/private-path?token=s3cret-token", b"{}")
        assert str(refused.value) == f"cannot connect to 127.0.0.1:{port}: Connection refused (is the receiver up?)"
        server = await raw(lambda conn, req: (b"HTTP/1.1 200 OK\r\nContent-Le", True))  # cut off mid-headers
        with pytest.raises(WebhookError) as cut:
            await client.post(f"http://s3cret-user:s3cret-pass@127.0.0.1:{server.port}/private-path?token=s3cret-token", b"{}")
        assert str(cut.value) == f"connection to 127.0.0.1:{server.port} closed by the receiver in the middle of the response"
        with pytest.raises(WebhookError) as invalid:
            await client.post("ftp://s3cret-user:s3cret-pass@127.0.0.1/private-path?token=s3cret-token", b"{}")
    for error in (refused.value, cut.value, invalid.value):
        assert "\n" not in str(error) and not any(s in str(error) for s in secrets)


async def test_ipv6_loopback(hook):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    runner, port = await serve(hook.handle, host="::1")
    try:
        async with WebhookClient(1) as client:
            for _ in range(2):
                assert (await client.post(f"http://[::1]:{port}/hook", b"{}")).status == 204
            closed = free_port()
            with pytest.raises(WebhookError, match=rf"^cannot connect to \[::1\]:{closed}: "):
                await client.post(f"http://[::1]:{closed}/hook", b"{}")
    finally:
        await runner.cleanup()
    assert hook.requests[0]["headers"]["Host"] == f"[::1]:{port}" and hook.connections == 1


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (files: cert.pem, key.pem)."""
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor the openssl command is available to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", "/CN=syncd test receiver", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                   check=True, capture_output=True)
    return folder


async def test_https_verifies_the_certificate(hook, certificate):
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")
    runner, port = await serve(hook.handle, ssl_context=server_side)
    url = f"https://user:s3cret@127.0.0.1:{port}/hook?token=s3cret"
    try:
        async with WebhookClient(1) as client:  # the system's CAs: not this certificate
            with pytest.raises(WebhookError) as untrusted:
                await client.post(url, b"{}")
        assert str(untrusted.value).startswith(f"cannot connect to 127.0.0.1:{port}: TLS certificate not accepted: "
                                               "self-signed certificate")
        assert "s3cret" not in str(untrusted.value)
        trusting = ssl.create_default_context(cafile=str(certificate / "cert.pem"))
        async with WebhookClient(1, ssl_context=trusting) as client:
            for _ in range(2):
                assert (await client.post(url, b"{}")).status == 204
    finally:
        await runner.cleanup()
    assert hook.connections == 1


async def test_https_to_a_plain_http_receiver(hook):
    port = hook.url.rsplit(":", 1)[1]
    async with WebhookClient(1) as client:
        with pytest.raises(WebhookError, match=rf"^cannot connect to 127.0.0.1:{port}: TLS handshake failed: "):
            await client.post(f"https://127.0.0.1:{port}/hook", b"{}")


class Endless(_Loopback):
    """A receiver that answers every request with `start`, then `filler` again and again: a response
    that never ends (up to `most` bytes, then it waits for the client to close)."""

    def __init__(self, start: bytes, filler: bytes, most: int = 64 * 1024 * 1024) -> None:
        self.start_bytes, self.filler, self.most = start, filler, most
        self.closed_by_client = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n{}")
            writer.write(self.start_bytes)
            block = self.filler * max(1, 16384 // len(self.filler))
            sent = 0
            while sent < self.most:
                writer.write(block)
                sent += len(block)
                await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed_by_client.set()
            writer.close()


@pytest.fixture
async def endless():
    servers = []

    async def make(start: bytes, filler: bytes) -> Endless:
        servers.append(await Endless(start, filler).start())
        return servers[-1]

    yield make
    for s in servers:
        await s.close()


HEAD_LIMIT = 64 * 1024  # status line + headers of one response, as common servers cap a request's


@pytest.mark.parametrize("start, filler", [
    (b"HTTP/1.1 200 OK\r\nX-Long: ", b"a"),  # one header line that never ends
    (b"HTTP/1.1 200 ", b"a"),  # nor does the status line
    (b"HTTP/1.1 200 OK\r\n", b"X-Filler: 0123456789abcdef\r\n"),  # header after header
    (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),  # informational responses count toward the same limit
], ids=["header-value", "status-line", "many-headers", "endless-1xx"])
async def test_a_response_head_that_never_ends_fails_the_attempt_at_64_kib(endless, start, filler):
    # Buffering it until webhook_timeout took 234 MB in 10 s for one connection.
    server = await endless(start, filler)
    async with WebhookClient(1) as client:
        with pytest.raises(WebhookError) as failed:
            await asyncio.wait_for(client.post(server.url, b"{}"), 2)
        await asyncio.wait_for(server.closed_by_client.wait(), 2)
    assert str(failed.value) == (f"invalid HTTP response from 127.0.0.1:{server.port}: the status line and headers "
                                 "exceed 64 KiB")


async def test_a_response_head_just_under_the_limit_is_read(raw):
    start, end = b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\n", b"Content-Length: 4\r\n\r\n"
    fields = b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 8000) for i in range(7))
    pad = HEAD_LIMIT - 16 - len(start + fields + end) - len(b"X-Pad: \r\n")
    head = start + fields + b"X-Pad: %s\r\n" % (b"p" * pad) + end
    assert len(head) == HEAD_LIMIT - 16
    answer = head + b"busy"
    server = await raw(lambda conn, req: (answer, False))
    async with WebhookClient(1) as client:
        for _ in range(2):
            resp = await client.post(server.url, b"{}")
            assert (resp.status, resp.retry_after, resp.snippet) == (503, "3", b"busy")
    assert server.connections == 1


@pytest.mark.parametrize("start, filler, status", [
    (b"HTTP/1.1 500 Error\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nerror\r\n0\r\nX-Trailer: ", b"a", 500),
    (b"HTTP/1.1 500 Error\r\n\r\nerror", b"x", 500),  # a body delimited by the close: no end
    (b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nerror\r\n", b"1\r\nx\r\n", 503),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\nerror", b"x", 200),
], ids=["endless-trailer", "endless-body", "endless-tiny-chunks", "terabyte-body"])
async def test_a_response_that_never_ends_after_its_status_gives_the_status_and_closes(endless, start, filler, status):
    # The status is the receiver's answer; what follows it is read up to a bound, then cut off.
    server = await endless(start, filler)
    async with WebhookClient(1) as client:
        resp = await asyncio.wait_for(client.post(server.url, b"{}"), 2)
        assert resp.status == status and resp.snippet.startswith(b"error" if status != 200 else b"")
        await asyncio.wait_for(server.closed_by_client.wait(), 2)
