"""Shadow SSH server: port forwarding only, for exactly one session key.

direct-tcpip goes to any host:port (names resolved by this pod's own resolver, so cluster names work);
tcpip-forward only to the ports given with --expose, which the shadow binds itself (ports.py) and hands
to the newest laptop session. Sessions (shell, exec, subsystems), passwords and keyboard-interactive are
refused: asyncssh rejects a session when no session factory is given, and we enable public-key auth only.
The modules: options (flags), server (per-session policy), ports (exposed ports and their owners),
inbound (relaying their connections), health (probes), listeners (dual-stack sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

import asyncssh

from ktwire import sshwire
from ktwire.sshwire import CIPHERS, MAX_PKTSIZE, WINDOW
from shadow_image import listeners
from shadow_image.health import readiness, serve_health
from shadow_image.inbound import InboundForwarder
from shadow_image.options import Options, parse_args
from shadow_image.ports import PortTable
from shadow_image.server import ShadowServer

log = logging.getLogger("shadow")


async def serve(host: str, port: int, authorized_keys: str, host_key: str,
                ready: asyncio.Event | None = None, *, ports: PortTable | None = None) -> listeners.Listening:
    """The SSH server on host:port ("" = every address, dual stack). Without `ports` it grants no
    tcpip-forward. WINDOW and MAX_PKTSIZE are read here, at call time (benchmarks/launch.py sets them)."""
    table = ports if ports is not None else PortTable()

    async def start(sock: socket.socket) -> asyncssh.SSHAcceptor:
        return await asyncssh.listen(
            sock=sock,
            server_factory=lambda: ShadowServer(table, WINDOW, MAX_PKTSIZE),
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
            # A client that has not authenticated 30 s after connecting is dropped: an unauthenticated
            # connection must not hold the server's resources for long (clients here log in within a second).
            login_timeout=30,
        )

    acceptor = await listeners.listen(host, port, start)
    log.info("shadow sshd listening on %s", listeners.describe(acceptor))
    if ready:
        ready.set()
    return acceptor


def _write_port_file(path: str, port: int) -> None:
    # Whole or absent: a reader polling for the file never sees it empty.
    with open(path + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(path + ".tmp", path)


async def run(opts: Options, stop: asyncio.Event | None = None) -> None:
    """Everything the shadow serves, until `stop` (or SIGINT/SIGTERM) is set."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    ports = PortTable(opts.expose)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(ports.close)
        await ports.start(InboundForwarder)
        acceptor = await serve(opts.listen_host, opts.listen_port, opts.authorized_keys, opts.host_key, ports=ports)
        stack.push_async_callback(acceptor.wait_closed)
        stack.callback(acceptor.close)
        if opts.health_port is not None:
            health = await serve_health(opts.health_port, lambda: readiness(acceptor.is_serving(), ports.states()))
            stack.push_async_callback(health.wait_closed)
            stack.callback(health.close)
            log.info("probes on %s (/ready, /live)", listeners.describe(health))
        if opts.port_file:
            _write_port_file(opts.port_file, acceptor.port)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if opts.debug else logging.WARNING)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    sshwire.install()
    try:
        asyncio.run(run(opts))
    except (OSError, asyncssh.Error, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
