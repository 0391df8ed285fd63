"""The one task that (re)connects the session; everyone else only waits for it to be up.

Connecting can mean replacing the shadow pod (minutes), so it must never run under a caller's deadline:
a proxy or DNS request that gives up would cancel the pod it was creating, and the next request would
start over (review finding R2). Callers wait on the outcome of the supervisor's attempt, shielded, and
may only wake it early from a back-off sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from ktproxy import aio

log = logging.getLogger("ktproxy.tunnel")


class Session(Protocol):
    def is_closed(self) -> bool: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


S = TypeVar("S", bound=Session)
StateCallback = Callable[[bool], None]


class TunnelDown(ConnectionError):
    """The SSH session is gone and could not be rebuilt (yet)."""


class Supervisor(Generic[S]):
    """Keeps one session up: connects at start, and again in the background whenever it drops.

    `attempt` connects and prepares a session; it raises on failure (closing what it opened), and any
    Exception it raises is one failed attempt, retried with back-off.
    """

    def __init__(self, attempt: Callable[[], Awaitable[S]], *, name: str,
                 backoff: tuple[float, float] = (0.5, 10.0),
                 on_down: Callable[[S], None] | None = None) -> None:
        self._attempt_fn = attempt
        self.name = name
        self._min_delay, self._max_delay = backoff
        self._on_down = on_down
        self.session: S | None = None
        self.reconnects = 0
        self.state_changed: list[StateCallback] = []
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._wake = asyncio.Event()
        # Resolved when the attempt in progress (or the next one) ends: None when up, else the error.
        self._outcome: asyncio.Future[TunnelDown | None] | None = None

    @property
    def is_up(self) -> bool:
        session = self.session
        return session is not None and not session.is_closed()

    async def start(self) -> S:
        """The first connect, in the caller's task so its error reaches the user; then supervise."""
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        try:
            session = await self._attempt()
        except BaseException:
            self._started = False
            raise
        self._task = asyncio.create_task(self._supervise(), name=f"{self.name} session supervisor")
        return session

    async def wait_up(self, deadline: float | None = None, *, stale: S | None = None) -> S:
        """The live session, waiting for the supervisor's attempt if there is none.

        `deadline` is a loop.time(); `stale` is a session the caller saw die (it may not know yet).
        Raises TunnelDown when the attempt being waited for fails, TimeoutError at the deadline.
        """
        async with aio.Deadline(None if deadline is None else deadline - aio.running_loop().time()):
            while True:
                session = self.session
                if session is not None and session is not stale and not session.is_closed():
                    return session
                if self._closing:
                    raise TunnelDown(f"the tunnel to the {self.name} is closed")
                if not self._started or (self._task is not None and self._task.done()):
                    raise TunnelDown(f"the tunnel to the {self.name} is not running")
                if self._outcome is None:
                    self._outcome = asyncio.get_running_loop().create_future()
                outcome = self._outcome
                self._wake.set()
                # Shielded: a caller giving up must never cancel the attempt it waits for.
                down = await asyncio.shield(outcome)
                if down is not None:
                    raise TunnelDown(str(down))

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._settle(TunnelDown(f"the tunnel to the {self.name} is closed"))
        session, self.session = self.session, None
        if session is not None:
            self._lost(session)
            session.close()
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(5):
                    await session.wait_closed()

    async def _attempt(self) -> S:
        try:
            session = await self._attempt_fn()
        except Exception as exc:
            down = exc if isinstance(exc, TunnelDown) else TunnelDown(f"cannot reach the {self.name}: {exc!s}")
            self._settle(down)
            raise down from exc
        except BaseException:
            self._settle(TunnelDown(f"connecting to the {self.name} was cancelled"))
            raise
        if self._closing:  # finished while close() ran: nobody will close it later
            session.close()
            down = TunnelDown(f"the tunnel to the {self.name} is closed")
            self._settle(down)
            raise down
        self.session = session
        self._settle(None)
        self._notify(True)
        return session

    async def _supervise(self) -> None:
        delay = self._min_delay
        while True:
            try:
                session = self.session
                if session is not None:
                    with contextlib.suppress(Exception):
                        await session.wait_closed()
                    self.session = None
                    self._lost(session)
                    log.warning("session to the %s lost; reconnecting", self.name)
                await self._attempt()
            except Exception as exc:  # anything: this task must outlive every failure
                log.warning("%s; retrying in %.1f s", exc, delay)
                await self._back_off(delay)
                delay = min(delay * 2, self._max_delay)
            else:
                delay = self._min_delay
                self.reconnects += 1
                log.info("session to the %s re-established", self.name)

    async def _back_off(self, delay: float) -> None:
        """Sleep `delay`, or less when a caller is waiting, but never under the minimum: a burst of
        requests during an outage must not turn into a connect storm against the API server."""
        self._wake.clear()
        await asyncio.sleep(min(delay, self._min_delay))
        if delay > self._min_delay:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay - self._min_delay):
                    await self._wake.wait()

    def _settle(self, result: TunnelDown | None) -> None:
        outcome, self._outcome = self._outcome, None
        if outcome is not None and not outcome.done():
            outcome.set_result(result)

    def _lost(self, session: S) -> None:
        if self._on_down is not None:
            try:
                self._on_down(session)
            except Exception:
                log.exception("clean-up after the %s session failed", self.name)
        self._notify(False)

    def _notify(self, up: bool) -> None:
        for callback in list(self.state_changed):
            try:
                callback(up)
            except Exception:
                log.exception("state_changed callback %r failed", callback)
