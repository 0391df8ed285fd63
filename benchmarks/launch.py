"""Run the shadow server or the data plane with tuning knobs applied, for the tuning study.

    python -m benchmarks.launch shadow|dataplane [--no-uvloop] [--cipher C] [--window N] [--pktsize N]
                                                 [--chunk N] [--no-nodelay] [--fastpath] -- ARGS...

The knobs patch the modules' tuning constants (WINDOW, MAX_PKTSIZE, CHUNK, CIPHERS) before their
`main()` runs, so the study measures the shipped code with one thing changed and nothing edited.
With no knobs this is exactly `python -m shadow_image ARGS` / `python -m ktproxy.dataplane ARGS`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def drop_ignore_packets() -> None:
    """asyncssh (2.24) sends an empty SSH_MSG_IGNORE before every post-kex packet (a traffic-analysis
    countermeasure), doubling the packet count; this measures what that costs."""
    from asyncssh import connection
    from asyncssh.constants import MSG_IGNORE

    orig = connection.SSHConnection.send_packet
    empty = (b"\0\0\0\0",)

    def send_packet(self, pkttype, *args, handler=None):  # type: ignore[no-untyped-def]
        if pkttype == MSG_IGNORE and args == empty:
            return
        orig(self, pkttype, *args, handler=handler)

    connection.SSHConnection.send_packet = send_packet


def tunnel_everything(routing: Any, dialer: Any) -> None:
    """The benchmark target is 127.0.0.2, which ktproxy never tunnels on its own (loopback is the user's
    machine). Here it must go through the shadow, and nothing may silently go direct instead."""
    for owner, name in ((routing, "_is_loopback"), (dialer.Dialer, "_dial_direct")):
        if not hasattr(owner, name):
            raise SystemExit(f"benchmarks/launch.py: {owner.__name__}.{name} is gone; update tunnel_everything()")
    routing._is_loopback = lambda host: False

    async def refuse(self: Any, host: str, port: int) -> Any:
        raise dialer.DialError("refused", f"benchmark: {host}:{port} would have gone direct, not tunnelled")

    dialer.Dialer._dial_direct = refuse


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.launch")
    p.add_argument("what", choices=["shadow", "dataplane"])
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--cipher")
    p.add_argument("--window", type=int)
    p.add_argument("--pktsize", type=int)
    p.add_argument("--chunk", type=int)
    p.add_argument("--no-nodelay", action="store_true")
    p.add_argument("--fastpath", action="store_true")
    p.add_argument("--no-ignore", action="store_true",
                   help="experiment: drop the empty SSH_MSG_IGNORE asyncssh sends before every packet")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = p.parse_args(argv[:cut]), argv[cut + 1:]

    if args.no_uvloop:
        sys.modules["uvloop"] = None  # type: ignore[assignment]  # `import uvloop` now raises ImportError

    if args.no_ignore:
        drop_ignore_packets()

    if args.what == "shadow":
        from shadow_image import sshd
        if args.window:
            sshd.WINDOW = args.window
        if args.pktsize:
            sshd.MAX_PKTSIZE = args.pktsize
        return sshd.main(rest)

    from ktproxy import dataplane, routing
    from ktproxy.proxy import dialer, relay, server
    from ktproxy.tunnel import session
    tunnel_everything(routing, dialer)
    if args.window:
        session.WINDOW = args.window
    if args.pktsize:
        session.MAX_PKTSIZE = args.pktsize
    if args.chunk:
        relay.CHUNK = args.chunk
    if args.cipher:
        session.CIPHERS = [args.cipher]
    if args.no_nodelay:
        def no_nodelay(writer: object) -> None:
            import socket
            sock = writer.get_extra_info("socket")  # type: ignore[attr-defined]
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        dialer.set_nodelay = no_nodelay
        server.set_nodelay = no_nodelay
    if args.fastpath:
        from benchmarks import fastpath
        fastpath.install_for_benchmark(server)
    return dataplane.main(rest)


if __name__ == "__main__":
    sys.exit(main())
