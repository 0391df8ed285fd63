"""Targets that speak first (SMTP, MySQL, SSH banners) and close at once must lose nothing.

A report from the pproxy evaluation suspected that bytes a target sends right after accept could be
dropped by the shadow's direct-tcpip forwarding; this pins the behaviour, under asyncio and uvloop.
"""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from shadow_image.sshd import serve

BANNER = b"220 banner from a server that speaks first\r\n"


async def _run(tmp_path, rounds: int) -> int:
    client = asyncssh.generate_private_key("ssh-ed25519")
    host = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "authorized_keys").write_bytes(client.export_public_key())
    (tmp_path / "host").write_bytes(host.export_private_key())

    async def speak(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        writer.close()  # no drain, no waiting for the client: the worst case

    target = await asyncio.start_server(speak, "127.0.0.1", 0)
    acceptor = await serve("127.0.0.1", 0, str(tmp_path / "authorized_keys"), str(tmp_path / "host"))
    good = 0
    try:
        async with asyncssh.connect("127.0.0.1", acceptor.sockets[0].getsockname()[1], username="kt",
                                    client_keys=[client], known_hosts=None) as conn:
            for _ in range(rounds):
                reader, writer = await conn.open_connection("127.0.0.1", target.sockets[0].getsockname()[1])
                good += await asyncio.wait_for(reader.read(), 10) == BANNER
                writer.close()
    finally:
        acceptor.close()
        target.close()
    return good


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_banner_never_lost(tmp_path, loop: str) -> None:
    rounds = 150
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        good = uvloop.run(_run(tmp_path, rounds))
    else:
        good = asyncio.run(_run(tmp_path, rounds))
    assert good == rounds
