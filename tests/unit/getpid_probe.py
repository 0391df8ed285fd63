"""Run under strace by test_aio.py: N proxied connections through the real data-plane pieces (ProxyServer,
Dialer, SSHTunnel over an in-process asyncssh server, the relay), each with a few round trips.

    python tests/unit/getpid_probe.py N [uvloop]

Only the data plane may use asyncio here: the client is a thread with blocking sockets, and the SSH
server echoes inside its channel session (no connection of its own to a target).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from typing import Any

import asyncssh

from ktproxy.proxy.dialer import Dialer
from ktproxy.proxy.server import ProxyServer
from ktproxy.routing import ClusterRules
from ktproxy.tunnel.session import SSHOptions, SSHTunnel, connect_tcp

LOOP = "127.0.0.1"
ROUND_TRIPS = 5


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: Any) -> bool:
        return True

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        return _Echo()


class _Echo(asyncssh.SSHTCPSession):
    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.chan.write(data)

    def eof_received(self) -> bool:
        return False  # close the channel: the target hangs up after its peer's EOF


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "closed early"
        out += chunk
    return out


def _connections(proxy_port: int, n: int) -> None:
    """n SOCKS5 connections to 10.96.0.1:80 (through the tunnel; the SSH server echoes), ROUND_TRIPS each; blocking."""
    for _ in range(n):
        with socket.create_connection((LOOP, proxy_port), timeout=10) as s:
            s.sendall(b"\x05\x01\x00")
            assert _recv(s, 2) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01" + bytes([10, 96, 0, 1]) + struct.pack("!H", 80))
            reply = _recv(s, 10)
            assert reply[1] == 0, reply
            for i in range(ROUND_TRIPS):
                msg = b"ping %d" % i
                s.sendall(msg)
                assert _recv(s, len(msg)) == msg


async def main(n: int) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    acceptor = await asyncssh.listen(LOOP, 0, server_host_keys=[host_key], authorized_client_keys=None,
                                     server_factory=_Server)
    ssh_port = acceptor.sockets[0].getsockname()[1]
    options = SSHOptions(client_key, host_key.convert_to_public())
    tunnel = SSHTunnel(lambda o: connect_tcp(LOOP, ssh_port, o), options)
    await tunnel.start()
    proxy = ProxyServer(Dialer(ClusterRules(namespace="default", cidrs=["10.96.0.0/16"]), tunnel))
    await proxy.start(LOOP, 0)
    try:
        # 3 more to warm up: the same in every run, so the difference between two runs is n's share.
        await asyncio.get_running_loop().run_in_executor(None, _connections, proxy.bound_port, 3 + n)
        await asyncio.sleep(0.1)  # the last relay sees its EOF
    finally:
        await proxy.close()
        await tunnel.close()
        acceptor.close()


if __name__ == "__main__":
    if sys.argv[2:] == ["uvloop"]:
        import uvloop

        uvloop.install()
    asyncio.run(main(int(sys.argv[1])))
