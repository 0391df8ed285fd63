"""forward's data path: each accepted local connection dialled, through the tunnel, to an endpoint the
dial plan picks now (a replaced pod is simply not picked again)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
from typing import Any

import asyncssh

from ktproxy.errors import KtError, UsageError
from ktproxy.proxy.relay import relay
from ktproxy.tunnel.supervisor import TunnelDown

log = logging.getLogger("ktproxy")

DIAL_TIMEOUT = 15.0


class Forwarder:
    """Accepted local connections -> a stream through the tunnel to an endpoint the plan picks now."""

    def __init__(self, plan: Any, tunnel: Any) -> None:
        self.plan = plan
        self.tunnel = tunnel
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            remote = await self._dial()
            if remote is None:
                writer.close()
                return
            await relay(reader, writer, *remote)
        except TimeoutError:  # relay's inactivity limit: an ordinary end, not an error with a traceback
            log.info("%s: no traffic either way for too long, closed", self.plan.description)
        except (ConnectionError, OSError, asyncssh.Error) as exc:
            log.debug("%s: stream ended: %s", self.plan.description, exc or type(exc).__name__)
        except asyncio.CancelledError:
            # Cancelled by close(): end normally. On Python 3.11 a cancelled client-connected task makes
            # asyncio's own done-callback (task.exception()) log a traceback at every Ctrl-C.
            writer.close()
            if not self._closing:
                raise
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _dial(self) -> tuple[Any, Any] | None:
        """The first endpoint that answers. The plan's answer may be a second old: when every endpoint
        it gave fails, the cluster is asked once more and the new ones (a replacement pod) are tried."""
        tried: set[tuple[str, int]] = set()
        for _ in range(2):
            try:
                candidates = [c for c in await self.plan.endpoints() if c not in tried]
            except KtError as exc:
                log.warning("cannot forward a connection: %s", exc)
                return None
            random.shuffle(candidates)  # spread connections over the Ready pods, as the Service would
            for host, port in candidates:
                tried.add((host, port))
                try:
                    return await asyncio.wait_for(self.tunnel.open_connection(host, port), DIAL_TIMEOUT)
                except TunnelDown as exc:  # the session is being rebuilt: not the pod's fault
                    log.warning("cannot forward a connection: %s", exc)
                    return None
                except (asyncssh.ChannelOpenError, OSError, TimeoutError, asyncssh.Error) as exc:
                    log.warning("%s:%s (%s) did not answer: %s", host, port, self.plan.description,
                                getattr(exc, "reason", None) or exc)
                    self.plan.invalidate()
        return None

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


async def listen(forwarder: Forwarder, address: str, port: int) -> asyncio.Server:
    try:
        # Bound now, serving only once the session is up: an early client would meet a tunnel that is
        # not there yet and be told every Ready pod "did not answer".
        return await asyncio.start_server(forwarder.handle, address, port, start_serving=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"local port {address}:{port} is already in use") from None
        raise UsageError(f"cannot listen on {address}:{port}: {exc.strerror or exc}") from None
