"""Yardstick: asyncssh's own `forward_socks` with default settings (uvloop), the figure DESIGN.md says to beat.

    python -m benchmarks.asyncssh_socks --ssh 127.0.0.1:PORT --identity KEY --host-key-pub PUB --port-file F
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import asyncssh


async def run(args: argparse.Namespace) -> None:
    host, _, port = args.ssh.rpartition(":")
    conn = await asyncssh.connect(host, int(port), username="kt", client_keys=[args.identity],
                                  known_hosts=([asyncssh.read_public_key(args.host_key_pub)], [], []),
                                  encryption_algs=[args.cipher], config=[], agent_path=None)
    listener = await conn.forward_socks("127.0.0.1", 0)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(listener.get_port()))
    os.replace(tmp, args.port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    listener.close()
    conn.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.asyncssh_socks")
    p.add_argument("--ssh", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--host-key-pub", required=True)
    p.add_argument("--cipher", default="aes128-gcm@openssh.com")
    p.add_argument("--port-file", required=True)
    args = p.parse_args()
    if not args.ssh.startswith("127."):
        raise SystemExit("benchmarks only ever connect to loopback")
    import uvloop
    uvloop.install()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
