"""Run the shadow server or the data plane with tuning knobs applied, for the tuning study.

    python -m benchmarks.launch shadow|dataplane [--no-uvloop] [--cipher C] [--window N] [--pktsize N]
                                                 [--chunk N] [--no-nodelay] [--fastpath]
                                                 [--asyncssh-ignore] -- ARGS...

The knobs patch the modules' tuning constants (WINDOW, MAX_PKTSIZE, CHUNK, CIPHERS) before their
`main()` runs, so the study measures the shipped code with one thing changed and nothing edited.
With no knobs this is exactly `python -m shadow_image ARGS` / `python -m ktproxy.dataplane ARGS`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def keep_ignore_packets() -> None:
    """Undo shadow_image.sshwire.drop_cbc_ignore_packets() for this process: asyncssh's default again, an
    empty SSH_MSG_IGNORE before every post-kex packet whatever the cipher (the reverse experiment, to
    show what dropping it gained). Must run before ktproxy.tunnel.session / shadow_image.sshd are
    imported: they apply the patch on import, through the name this replaces."""
    from asyncssh import connection

    from shadow_image import sshwire

    if "ktproxy.tunnel.session" in sys.modules or "shadow_image.sshd" in sys.modules:
        raise SystemExit("benchmarks/launch.py: keep_ignore_packets() must run before the SSH modules load")
    if getattr(connection.SSHConnection.send_packet, "_ktproxy_no_cbc_ignore", False):
        raise SystemExit("benchmarks/launch.py: asyncssh's send_packet is already patched")
    sshwire.drop_cbc_ignore_packets = lambda: False  # type: ignore[assignment]


def check_ignore_patch(expect_patched: bool) -> None:
    """The study must measure what it says: fail loudly if the patch state is not the expected one."""
    from asyncssh import connection

    patched = bool(getattr(connection.SSHConnection.send_packet, "_ktproxy_no_cbc_ignore", False))
    if patched != expect_patched:
        raise SystemExit(f"benchmarks/launch.py: asyncssh MSG_IGNORE patch is {'on' if patched else 'off'}, "
                         f"expected {'on' if expect_patched else 'off'}")


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
    p.add_argument("--asyncssh-ignore", action="store_true",
                   help="reverse experiment: keep asyncssh's empty SSH_MSG_IGNORE before every packet "
                        "(what the shipped code drops for non-CBC ciphers)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = p.parse_args(argv[:cut]), argv[cut + 1:]

    if args.no_uvloop:
        sys.modules["uvloop"] = None  # type: ignore[assignment]  # `import uvloop` now raises ImportError

    if args.asyncssh_ignore:
        keep_ignore_packets()

    if args.what == "shadow":
        from shadow_image import sshd
        if args.window:
            sshd.WINDOW = args.window
        if args.pktsize:
            sshd.MAX_PKTSIZE = args.pktsize
        check_ignore_patch(expect_patched=not args.asyncssh_ignore)
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
    check_ignore_patch(expect_patched=not args.asyncssh_ignore)
    return dataplane.main(rest)


if __name__ == "__main__":
    sys.exit(main())
