"""exchange/preview's path proof against the real shadow server on loopback (no cluster, no netns):
the laptop's ports ride one session, and a connection made in the shadow to its own exposed port is
seen to reach the laptop's service, or the proof fails when nothing listens locally."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ktproxy.errors import KtError
from ktproxy.expose import ExposedPort
from ktproxy.shadow.reverse import prove_path
from ktproxy.tunnel.keys import generate_session_keys
from ktproxy.tunnel.session import SSHOptions, SSHTunnel, connect_tcp

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def shadow_and_tunnel() -> AsyncIterator[tuple[SSHTunnel, list[int]]]:
    keys = generate_session_keys()
    exposed = [_free_port(), _free_port()]
    with tempfile.TemporaryDirectory() as d:
        auth, host, port_file = Path(d, "authorized_keys"), Path(d, "host_key"), Path(d, "port")
        auth.write_text(keys.authorized_keys)
        host.write_text(keys.host_key_private)
        os.chmod(host, 0o600)
        proc = subprocess.Popen([sys.executable, "-m", "shadow_image", "--listen", "127.0.0.1:0",
                                 "--authorized-keys", str(auth), "--host-key", str(host), "--port-file",
                                 str(port_file), "--expose", ",".join(map(str, exposed))],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while not (port_file.exists() and port_file.read_text().strip()):
                assert proc.poll() is None and time.monotonic() < deadline, "shadow did not start"
                await asyncio.sleep(0.05)
            ssh_port = int(port_file.read_text())
            options = SSHOptions.for_session(keys)
            tunnel = SSHTunnel(lambda o: connect_tcp("127.0.0.1", ssh_port, o), options)
            yield tunnel, exposed
            await tunnel.close()
        finally:
            proc.terminate()
            proc.wait(10)


async def _local_service() -> tuple[asyncio.Server, asyncio.Queue[str]]:
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.put_nowait("connection")
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


async def test_proof_sees_the_connection_reach_the_laptop(shadow_and_tunnel) -> None:
    tunnel, (first, second) = shadow_and_tunnel
    service, seen = await _local_service()
    local = service.sockets[0].getsockname()[1]
    async with service:
        await tunnel.expose(first, "127.0.0.1", local)
        await tunnel.expose(second, "127.0.0.1", local)
        await tunnel.start()
        await prove_path(tunnel, ExposedPort(local, first, first))
        await prove_path(tunnel, ExposedPort(local, second, second))
        # Each proof reached the laptop's service (which accepts just after the proof ends), on one session.
        for _ in range(2):
            await asyncio.wait_for(seen.get(), 5)
        assert tunnel.reconnects == 0


async def test_proof_fails_when_the_port_is_not_attached(shadow_and_tunnel) -> None:
    """The shadow listens on both ports, but this session forwards only the first: a connection to the
    second never reaches this machine."""
    tunnel, (first, second) = shadow_and_tunnel
    service, seen = await _local_service()
    local = service.sockets[0].getsockname()[1]
    async with service:
        await tunnel.expose(first, "127.0.0.1", local)
        await tunnel.start()
        with pytest.raises(KtError, match=f"its port {second} did not reach this machine"):
            await prove_path(tunnel, ExposedPort(local, second, second), limit=3)
        assert seen.empty()
