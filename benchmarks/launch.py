"""Run the shadow server or the data plane with tuning knobs applied, for the tuning study.

    python -m benchmarks.launch shadow|dataplane [--no-uvloop] [--cipher C] [--window N] [--pktsize N]
                                                 [--chunk N] [--no-nodelay] [--fastpath]
                                                 [--asyncssh-ignore] [--asyncssh-recv]
                                                 [--asyncssh-default PATCH]... -- ARGS...

The knobs patch the modules' tuning constants (WINDOW, MAX_PKTSIZE, CHUNK, CIPHERS) before their
`main()` runs, so the study measures the shipped code with one thing changed and nothing edited.
With no knobs this is exactly `python -m shadow_image ARGS` / `python -m devtools.dataplane_main ARGS`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def skip_wire_patch(name: str) -> None:
    """Leave asyncssh's default in place of one sshwire patch in this process (a reverse experiment: what
    the patch gains, measured by its absence). Must run before the entry point's sshwire.install(), which
    applies the patches through sshwire.PATCHES, where this replaces one."""
    from ktwire import sshwire

    if sshwire.installed()[name]:
        raise SystemExit(f"benchmarks/launch.py: asyncssh already carries sshwire's {name}")
    sshwire.PATCHES[name] = lambda: False


def check_wire_patches(skipped: set[str]) -> None:
    """The study must measure what it says: fail loudly if a patch state is not the expected one."""
    from ktwire import sshwire

    for name, patched in sshwire.installed().items():
        if patched == (name in skipped):
            raise SystemExit(f"benchmarks/launch.py: sshwire patch {name} is "
                             f"{'on' if patched else 'off'}, expected {'off' if patched else 'on'}")


def tunnel_everything(routing: Any, dialer: Any) -> None:
    """The benchmark target is 127.0.0.2, which ktproxy never tunnels on its own (loopback is the user's
    machine). Here it must go through the shadow, and nothing may silently go direct instead."""
    for owner, name in ((routing, "is_loopback_host"), (dialer.Dialer, "_dial_direct")):
        if not hasattr(owner, name):
            raise SystemExit(f"benchmarks/launch.py: {owner.__name__}.{name} is gone; update tunnel_everything()")
    routing.is_loopback_host = lambda host: False

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
    p.add_argument("--asyncssh-recv", action="store_true",
                   help="reverse experiment: asyncssh's own receive path, which re-slices its buffer after "
                        "every packet (the shipped code feeds it one packet at a time)")
    p.add_argument("--asyncssh-default", action="append", default=[], metavar="PATCH",
                   help="reverse experiment: leave asyncssh's own behaviour in place of this ktwire.sshwire "
                        "patch (a name in sshwire.PATCHES; repeatable)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = p.parse_args(argv[:cut]), argv[cut + 1:]

    if args.no_uvloop:
        sys.modules["uvloop"] = None  # type: ignore[assignment]  # `import uvloop` now raises ImportError

    skipped = set(args.asyncssh_default)
    if args.asyncssh_ignore:
        skipped.add("drop_cbc_ignore_packets")
    if args.asyncssh_recv:
        skipped.add("feed_whole_packets")
    for name in skipped:
        skip_wire_patch(name)
    from ktwire import sshwire
    sshwire.install()  # main() installs again (idempotent); checked here, before anything connects

    if args.what == "shadow":
        from shadow_image import sshd
        if args.window:
            sshd.WINDOW = args.window
        if args.pktsize:
            sshd.MAX_PKTSIZE = args.pktsize
        check_wire_patches(skipped)
        return sshd.main(rest)

    from devtools import dataplane_main  # imported before the patch below: its bind check keeps the real rule
    from ktproxy import routing
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
    check_wire_patches(skipped)
    return dataplane_main.main(rest)


if __name__ == "__main__":
    sys.exit(main())
