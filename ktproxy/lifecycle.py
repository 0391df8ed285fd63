"""One lifecycle for every long-running command (connect today; exchange, preview, forward, mesh next).

- Signals: SIGINT, SIGTERM, SIGHUP (a closed terminal) and, on Windows, SIGBREAK (Ctrl-Break and a closed
  console window) where each exists. The first one starts an orderly clean-up; a second one exits at
  once, telling the user how to remove what is left.
- Clean-up: each resource registers its clean-up as soon as it exists. Steps run in reverse order and a
  step that raises is logged without skipping the steps after it.
- `until_stopped(aw)`: await a start-up step unless a stop signal comes first.
- `end(line)`: a running command whose state was lost for good (after a sleep or an API outage longer
  than the clean threshold, what it held was swept or taken over) stops itself with one WARNING line
  naming what was lost; the command then exits 1 after the same clean-up a stop signal runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger("ktproxy")

T = TypeVar("T")

EXIT_INTERRUPTED = 130
EXIT_ENDED = 1  # the command ended itself (Lifecycle.end): what it held is gone or someone else's
LEFTOVERS_HINT = "`ktctl clean` removes leftovers"


class Stopped(Exception):
    """A stop signal arrived before the awaited step finished (the step was cancelled)."""


def stop_signals() -> list[signal.Signals]:
    """The signals that mean "stop" on this platform (SIGHUP: closed terminal; SIGBREAK: closed console)."""
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it exists (not on Windows); None means asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class Lifecycle:
    """Signals and clean-up of one command; use as `async with Lifecycle() as life:`."""

    def __init__(self, leftovers_hint: str = LEFTOVERS_HINT) -> None:
        self.hint = leftovers_hint
        self.stopping = asyncio.Event()
        self.failed: list[str] = []
        self._stack = contextlib.AsyncExitStack()
        self._signals = 0
        self._loop_handlers: list[int] = []
        self._plain_handlers: dict[int, Any] = {}
        self._interruptible: asyncio.Future[Any] | None = None
        self.exit_code = 0

    # -- signals ---------------------------------------------------------------------------------
    def _on_signal(self, sig: int) -> None:
        if self._interruptible is not None and not self._interruptible.done():
            self._interruptible.cancel()  # a wait the user may cut short: this signal ends only the wait
            return
        self._signals += 1
        if self._signals > 1:
            log.warning("interrupted again: exiting without clean-up (%s)", self.hint)
            logging.shutdown()
            os._exit(EXIT_INTERRUPTED)
        if not self.stopping.is_set():
            log.info("shutting down (%s); cleaning up (interrupt again to exit at once)",
                     signal.Signals(sig).name)
            self.stopping.set()

    def _install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in stop_signals():
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
                self._loop_handlers.append(sig)
                continue
            except (NotImplementedError, RuntimeError):  # Windows loops have no add_signal_handler
                pass
            if threading.current_thread() is not threading.main_thread():
                continue  # only the main thread may set handlers; asyncio's own Ctrl-C handling stays
            # A plain handler runs between bytecodes on the main thread; the loop does the work, so a
            # second Ctrl-C during clean-up no longer raises KeyboardInterrupt in the middle of a delete.
            with contextlib.suppress(OSError, ValueError):
                self._plain_handlers[sig] = signal.signal(
                    sig, lambda s, _frame: loop.call_soon_threadsafe(self._on_signal, s))

    def _uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._loop_handlers:
            loop.remove_signal_handler(sig)
        for sig, previous in self._plain_handlers.items():
            signal.signal(sig, previous)
        self._loop_handlers.clear()
        self._plain_handlers.clear()

    async def __aenter__(self) -> Lifecycle:
        self._install()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self._stack.aclose()
            if self.failed:
                log.warning("clean-up incomplete (%s); %s", ", ".join(self.failed), self.hint)
        finally:
            self._uninstall()

    def end(self, line: str | None) -> None:
        """End the command from within: log `line` (one WARNING: what was lost and that the command
        ends; None when the caller already said so) and start the orderly clean-up. The command's main
        returns `exit_code` (EXIT_ENDED) after `wait()`. Only the first call counts."""
        if self.stopping.is_set():
            return
        if line:
            log.warning("%s", line)
        self.exit_code = EXIT_ENDED
        self.stopping.set()

    # -- clean-up --------------------------------------------------------------------------------
    def on_cleanup(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` (sync or async) at clean-up; registered last, run first."""

        async def step(*_exc: object) -> bool:
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self.failed.append(what)
                log.warning("clean-up: %s failed: %s", what, exc, exc_info=True)
            return False  # never swallows the command's own exception

        self._stack.push_async_exit(step)

    # -- waiting ---------------------------------------------------------------------------------
    async def wait(self) -> None:
        """Until the first stop signal."""
        await self.stopping.wait()

    async def interruptible(self, aw: Awaitable[Any]) -> bool:
        """Await `aw` (a clean-up step's long wait) so that a further stop signal ends only this wait
        instead of exiting at once; False when it was cut short."""
        task = asyncio.ensure_future(aw)
        self._interruptible = task
        try:
            await task
            return True
        except asyncio.CancelledError:
            if not task.cancelled() or asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            return False
        finally:
            self._interruptible = None

    async def until_stopped(self, aw: Awaitable[T]) -> T:
        """Await `aw` unless a stop signal arrives first: then `aw` is cancelled and Stopped raised."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.cancelled() and self.stopping.is_set():
            raise Stopped()
        return task.result()


def run(main: Callable[[Lifecycle], Awaitable[int]], leftovers_hint: str = LEFTOVERS_HINT) -> int:
    """Run one command: `main(life)` inside a Lifecycle, on uvloop where it exists. A stop before the
    command is ready exits 130 after clean-up."""

    async def body() -> int:
        async with Lifecycle(leftovers_hint) as life:
            try:
                return await main(life)
            except Stopped:
                return EXIT_INTERRUPTED

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(body())
