"""The router process: a listener per target port, the probe endpoint, the route table kept current."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Sequence

from shadow_image import listeners
from shadow_image.router import health
from shadow_image.router.downstream import ClientConnection, Context
from shadow_image.router.options import Options, parse_args
from shadow_image.router.table import RouteTable
from shadow_image.router.upstream import Pool
from shadow_image.router.watch import AnnotationsWatch

try:
    from shadow_image.router.h2_route import H2Downstream
except ImportError:  # the HTTP/2 layer is a separate module; without it, HTTP/2 connections are closed
    H2Downstream = None

log = logging.getLogger("router")

DRAIN = 10.0  # a stopping router lets requests under way finish for this long (the pod's grace is 30 s)


class Router:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.table = RouteTable(opts.service, opts.ports, default_host=opts.default_host,
                                route_host=opts.route_host)
        self.watch = AnnotationsWatch(opts.annotations, self.table)
        self.listening: dict[int, listeners.Listening] = {}
        self.health: listeners.Listening | None = None
        self._stack = contextlib.AsyncExitStack()
        self.ctx: Context | None = None

    def ready(self) -> tuple[bool, str]:
        down = [tp for tp in self.opts.ports if tp not in self.listening or not self.listening[tp].is_serving()]
        if down:
            return False, "not listening on port(s) " + ",".join(map(str, down))
        if not self.watch.loaded:
            return False, f"annotations file {self.opts.annotations} not read yet"
        return True, f"routing {len(self.table.routes)} route(s)"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        stack = self._stack
        pool = Pool(loop)
        stack.callback(pool.close)
        ctx = self.ctx = Context(self.table, pool, loop, client_idle=self.opts.client_idle,
                                 upstream_idle=self.opts.upstream_idle, h2_layer=H2Downstream)
        self.watch.check()
        watcher = loop.create_task(self.watch.run())
        stack.callback(watcher.cancel)
        # The probe first: the kubelet may ask before the listeners are up and must get a 503, not a refusal.
        self.health = await health.serve(self.opts.health_port, self.ready, lambda: self.table.routes)
        stack.push_async_callback(self.health.wait_closed)
        stack.callback(self.health.close)
        for tp in self.opts.ports:
            async def start(sock: socket.socket, tp: int = tp) -> asyncio.Server:
                return await listeners.tcp_server(lambda: ClientConnection(ctx, tp), sock)

            lst = await listeners.listen("", tp, start)
            stack.push_async_callback(lst.wait_closed)
            stack.callback(lst.close)
            self.listening[tp] = lst
            log.info("listening on %s; upstreams on port %d", listeners.describe(lst), self.opts.ports[tp])
        if H2Downstream is None:
            log.warning("no HTTP/2 layer (shadow_image.router.h2_route): HTTP/2 connections will be closed")
        log.info("probes on %s (/ready, /routes, /live)", listeners.describe(self.health))

    async def close(self, drain: float = DRAIN) -> None:
        """Stop accepting, give requests under way up to `drain` seconds to finish, then close everything."""
        for lst in self.listening.values():
            lst.close()
        ctx = self.ctx
        if ctx is not None and ctx.connections:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain
            log.info("stopping: %d connection(s) open", len(ctx.connections))
            while loop.time() < deadline:
                for conn in list(ctx.connections):
                    conn.close_if_idle()
                if not ctx.connections:
                    break
                await asyncio.sleep(0.05)
            for conn in list(ctx.connections):
                conn.transport.abort()
        await self._stack.aclose()


async def run(opts: Options, stop: asyncio.Event | None = None) -> None:
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    router = Router(opts)
    try:
        await router.start()
        await stop.wait()
    finally:
        await router.close()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if opts.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(run(opts))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
