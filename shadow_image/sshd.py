"""Shadow SSH server: port forwarding only, for exactly one session key.

It permits direct-tcpip to any host:port (names resolved by this pod's own resolver, so cluster
names work) and tcpip-forward (listeners inside the pod, for exchange/mesh/preview). Sessions (shell,
exec, subsystems), passwords and keyboard-interactive are refused: asyncssh rejects a session when
no session factory is given, and we enable public-key auth only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import asyncssh

from ktwire import sshwire
from ktwire.addr import split_host_port
from ktwire.sshwire import CIPHERS, MAX_PKTSIZE, WINDOW

log = logging.getLogger("shadow")



class ShadowServer(asyncssh.SSHServer):
    def __init__(self) -> None:
        self._peer = "?"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        log.info("connection from %s", self._peer)

    def connection_lost(self, exc: Exception | None) -> None:
        log.info("connection from %s closed%s", self._peer, f": {exc}" if exc else "")

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def auth_completed(self) -> None:
        log.info("session key accepted for %s", self._peer)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        log.debug("direct-tcpip %s:%s", dest_host, dest_port)
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        log.info("tcpip-forward listening on %s:%s", listen_host or "*", listen_port)
        return True

    def session_requested(self) -> bool:
        log.warning("refused a session (shell/exec) request from %s", self._peer)
        return False


async def serve(host: str, port: int, authorized_keys: str, host_key: str,
                ready: asyncio.Event | None = None) -> asyncssh.SSHAcceptor:
    acceptor = await asyncssh.create_server(
        ShadowServer, host, port,
        server_host_keys=[host_key],
        authorized_client_keys=authorized_keys,
        allow_pty=False,
        x11_forwarding=False,
        agent_forwarding=False,
        keepalive_interval=30,
        keepalive_count_max=3,
        window=WINDOW,
        max_pktsize=MAX_PKTSIZE,
        encryption_algs=CIPHERS,
        # Reply to the first failed key quickly instead of waiting for more attempts.
        login_timeout=30,
    )
    log.info("shadow sshd listening on %s:%s", host, acceptor.sockets[0].getsockname()[1])
    if ready:
        ready.set()
    return acceptor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shadow_image", description="ktproxy shadow SSH server")
    parser.add_argument("--listen", default="0.0.0.0:2222", help="host:port to listen on")
    parser.add_argument("--authorized-keys", default="/etc/ktproxy/authorized_keys")
    parser.add_argument("--host-key", default="/etc/ktproxy/ssh_host_key")
    parser.add_argument("--port-file", help="write the bound port here (for --listen host:0)")
    parser.add_argument("-d", "--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    sshwire.install()
    try:
        host, port = split_host_port(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: {exc}")
    host = host or "0.0.0.0"

    async def run() -> None:
        acceptor = await serve(host, port, args.authorized_keys, args.host_key)
        if args.port_file:
            with open(args.port_file, "w") as f:
                f.write(str(acceptor.sockets[0].getsockname()[1]))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        acceptor.close()
        await acceptor.wait_closed()

    try:
        asyncio.run(run())
    except (OSError, asyncssh.Error, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
