"""Reverse channels on the real shadow process: ports it exposes itself (--expose), handed over
forwarded-tcpip channels to the newest laptop session, and the readiness probe that follows them.

The laptop is a real asyncssh client doing `forward_remote_port("", P, "127.0.0.1", local)` (the
standard semantics ktctl's tunnel uses). Everything runs on loopback; no namespace needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from itlib import PY, REPO, stop, wait_for

from ktwire import sshwire

PROMPT = 3.0  # what "at once" may take on a loaded 2-core machine


@pytest.fixture(autouse=True, scope="module")
def _wire_patches() -> None:
    sshwire.install()  # what ktctl's entry point does; the client below runs in this process


def free_port() -> int:
    """A port free on every address (the shadow binds exposed ports dual-stack)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s.getsockname()[1]


@dataclass
class Shadow:
    proc: subprocess.Popen[bytes]
    log: Path
    ssh_port: int
    expose: list[int]
    health_port: int | None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Keys:
    client: asyncssh.SSHKey
    authorized_keys: Path
    host_key: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    client = asyncssh.generate_private_key("ssh-ed25519")
    host = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "authorized_keys").write_bytes(client.export_public_key())
    host.write_private_key(str(tmp_path / "host_key"))
    return Keys(client, tmp_path / "authorized_keys", tmp_path / "host_key")


@pytest.fixture
def start_shadow(tmp_path: Path, keys: Keys) -> Iterator[Callable[..., Shadow]]:
    started: list[Shadow] = []

    def start(expose: list[int] | None = None, health: bool = True) -> Shadow:
        n = len(started)
        port_file, log = tmp_path / f"shadow{n}.port", tmp_path / f"shadow{n}.log"
        health_port = free_port() if health else None
        argv = [PY, "-m", "shadow_image", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                "--authorized-keys", str(keys.authorized_keys), "--host-key", str(keys.host_key), "-d"]
        if expose:
            argv += ["--expose", ",".join(map(str, expose))]
        if health_port:
            argv += ["--health-port", str(health_port)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                    env={**os.environ, "PYTHONPATH": str(REPO)})
        shadow = Shadow(proc, log, 0, expose or [], health_port)
        started.append(shadow)
        wait_for(port_file.exists, 15, "shadow", proc, log)
        shadow.ssh_port = int(port_file.read_text())
        return shadow

    yield start
    for shadow in started:
        stop(shadow.proc)


@contextlib.asynccontextmanager
async def laptop(shadow: Shadow, keys: Keys, port: int | None = None) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """An SSH session to the shadow (through 127.0.0.1:port when given: a relay in front of it)."""
    async with asyncssh.connect("127.0.0.1", port or shadow.ssh_port, username="kt", client_keys=[keys.client],
                                known_hosts=None, keepalive_interval=0) as conn:
        yield conn


@contextlib.asynccontextmanager
async def local_server(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                       ) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def says(word: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(word)
        await writer.drain()
        writer.close()
    return handler


async def fetch(port: int, host: str = "127.0.0.1") -> bytes:
    """Everything a connection to host:port gives before it closes (b"" when closed at once)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(PROMPT + 12):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def probe(shadow: Shadow, path: str = "/ready") -> tuple[int, str]:
    assert shadow.health_port
    reader, writer = await asyncio.open_connection("127.0.0.1", shadow.health_port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: shadow\r\nUser-Agent: kube-probe/1.34\r\n\r\n".encode())
    async with asyncio.timeout(PROMPT):
        response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode().strip()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll the shadow (another process: nothing to wait on but its answers)."""
    try:
        async with asyncio.timeout(10):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_exposed_port_reaches_the_laptop_and_ready_follows_it(start_shadow, keys) -> None:
    port = free_port()
    shadow = start_shadow([port])
    assert await probe(shadow, "/live") == (200, "live")
    status, reason = await probe(shadow)
    assert status == 503 and "no laptop attached" in reason and str(port) in reason
    async with local_server(says(b"kt-connect local v2")) as local:
        async with laptop(shadow, keys) as conn:
            await conn.forward_remote_port("", port, "127.0.0.1", local)
            assert (await probe(shadow))[0] == 200
            assert await fetch(port) == b"kt-connect local v2"
            assert await fetch(port, "::1") == b"kt-connect local v2"  # dual stack: a Service on IPv6 too
        await eventually(lambda: _status_is(shadow, 503), "/ready to go 503 once the laptop left")
    assert "laptop attached for ports" in shadow.log_text() and "laptop detached" in shadow.log_text()


async def _status_is(shadow: Shadow, status: int) -> bool:
    return (await probe(shadow))[0] == status


async def test_newest_session_wins_and_the_previous_one_takes_over(start_shadow, keys) -> None:
    port = free_port()
    shadow = start_shadow([port])
    async with local_server(says(b"first")) as first, local_server(says(b"second")) as second:
        async with laptop(shadow, keys) as one:
            await one.forward_remote_port("", port, "127.0.0.1", first)
            assert await fetch(port) == b"first"
            async with laptop(shadow, keys) as two:
                await two.forward_remote_port("", port, "127.0.0.1", second)
                assert await fetch(port) == b"second"
            await eventually(lambda: _fetches(port, b"first"), "the first session to serve again")
            assert (await probe(shadow))[0] == 200


async def _fetches(port: int, want: bytes) -> bool:
    return await fetch(port) == want


async def test_a_silently_dead_session_does_not_block_the_new_one(start_shadow, keys) -> None:
    """The laptop's old session hangs (port-forward dropped, no FIN): the shadow cannot know for 90-120 s.
    Its reconnect must be served at once, with no "address in use"."""
    port = free_port()
    shadow = start_shadow([port])
    frozen, done = asyncio.Event(), asyncio.Event()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            if frozen.is_set():
                await done.wait()  # swallow everything from now on, like a dead network
                return
            dst.write(data)
            await dst.drain()

    sockets: list[asyncio.StreamWriter] = []
    relays: list[asyncio.Future[object]] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", shadow.ssh_port)
        sockets.extend((up_w, writer))
        relays.append(asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True))
        await relays[-1]

    relay_srv = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        async with local_server(says(b"old")) as old, local_server(says(b"new")) as new:
            old_conn = await asyncssh.connect("127.0.0.1", relay_srv.sockets[0].getsockname()[1], username="kt",
                                              client_keys=[keys.client], known_hosts=None, keepalive_interval=0)
            await old_conn.forward_remote_port("", port, "127.0.0.1", old)
            assert await fetch(port) == b"old"
            frozen.set()
            async with laptop(shadow, keys) as conn:
                await conn.forward_remote_port("", port, "127.0.0.1", new)
                assert await fetch(port) == b"new"
            old_conn.abort()
    finally:
        done.set()
        relay_srv.close()
        for w in sockets:
            w.close()
        await asyncio.gather(*relays)


async def test_forwards_are_refused_unless_exposed(start_shadow, keys) -> None:
    """S1: no tcpip-forward without --expose; with it, only those ports and only on all addresses."""
    port, other = free_port(), free_port()
    bare = start_shadow(health=False)
    async with local_server(says(b"laptop")) as local:
        async with laptop(bare, keys) as conn:
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("", port, "127.0.0.1", local)
        exposing = start_shadow([port])
        async with laptop(exposing, keys) as conn:
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("", other, "127.0.0.1", local)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", port, "127.0.0.1", local)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("", 0, "127.0.0.1", local)
            # still good for the port it exposes, from the same session
            await conn.forward_remote_port("0.0.0.0", port, "127.0.0.1", local)
            assert await fetch(port) == b"laptop"
    assert "refused tcpip-forward" in bare.log_text()


async def test_no_laptop_means_the_connection_is_closed_at_once(start_shadow) -> None:
    port = free_port()
    start_shadow([port])
    async with asyncio.timeout(PROMPT):
        assert await fetch(port) == b""


async def test_a_megabyte_round_trips_with_half_close(start_shadow, keys) -> None:
    """The laptop's server answers only after the client's EOF: the EOF must cross the shadow while the
    reply direction stays open."""
    port = free_port()
    shadow = start_shadow([port])
    payload = os.urandom(1 << 20)

    async def echo_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(data)
        await writer.drain()
        writer.close()

    async with local_server(echo_after_eof) as local, laptop(shadow, keys) as conn:
        await conn.forward_remote_port("", port, "127.0.0.1", local)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(30):
            back = await reader.read()
        writer.close()
    first_diff = next((i for i, (x, y) in enumerate(zip(back, payload, strict=False)) if x != y), None)
    assert (len(back), first_diff) == (len(payload), None), shadow.log_text()[-3000:]
