"""PostgreSQL going away under a running instance: it says so, stops polling, and comes back."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit, urlunsplit

from conftest import wait_for, write_sync


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of the PostgreSQL server, which the test can cut."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        self._pipes.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes.add(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._pipes -= {writer, up_writer}

    async def cut(self) -> None:
        """Refuse new connections and break the open ones, as a dead server or network would."""
        self._server.close()
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self._server.wait_closed()

    async def restore(self) -> None:
        await self.start()


async def test_an_outage_makes_the_instance_unready_and_it_recovers(pg_url, inproc_daemons, upstream, conf_dir, tmp_path):
    upstream.body = {"items": [{"id": 1}]}
    write_sync(conf_dir, "one", upstream.url, path="/one", extra='interval = "1s"',
               list_identifier="$.items", record_identifier="$.id")
    parts = urlsplit(pg_url)
    proxy = await Proxy(parts.hostname, parts.port or 5432).start()
    url = urlunsplit((parts.scheme, f"{parts.username}@127.0.0.1:{proxy.port}", parts.path, parts.query, ""))
    try:
        await _outage_and_recovery(inproc_daemons, upstream, conf_dir, tmp_path, proxy, url)
    finally:
        await proxy.cut()  # after the daemon stopped (the test stops it): every socket closed


async def _outage_and_recovery(inproc_daemons, upstream, conf_dir, tmp_path, proxy, url) -> None:
    d = await inproc_daemons(conf_dir, tmp_path / "s.db", state_url=url, lease_ttl=3, instance_id="a")
    daemon = d.daemon
    await wait_for(lambda: daemon._owned == {"one"} and daemon._readiness()[0], 10)
    await wait_for(lambda: upstream.hits("/one"), 10)

    await proxy.cut()
    # Within two thirds of lease_ttl: not ready, saying why, and nothing is polled any more.
    await wait_for(lambda: not daemon._readiness()[0], 10)
    assert "cannot reach the state database" in daemon._readiness()[1]
    await wait_for(lambda: daemon._owned == set(), 10)
    polls = len(upstream.hits("/one"))
    await asyncio.sleep(1.5)  # more than the sync's interval
    assert len(upstream.hits("/one")) == polls
    assert not d.task.done()  # an outage is waited out, never a crash
    assert d.events("leases given up: the state database is unreachable")

    await proxy.restore()
    await wait_for(lambda: daemon._readiness()[0] and daemon._owned == {"one"}, 15)
    await wait_for(lambda: len(upstream.hits("/one")) > polls, 10)  # polling again
    assert d.events("state database reachable again")
    await d.stop()
