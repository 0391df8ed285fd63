"""Opening a channel safely: no leak when the caller gives up, and telling a dead session from a refusal."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncssh

from ktproxy import aio

log = logging.getLogger("ktproxy.tunnel")

T = TypeVar("T")

# asyncssh's reason for an open that failed because the session closed under it (add_channel during
# the close, or an open still in flight at clean-up): the stream never reached the shadow.
SESSION_CLOSED = "SSH connection closed"


async def open_shielded(opening: Awaitable[T], discard: Callable[[T], None]) -> T:
    """Await a channel open; if the caller is cancelled (its deadline), the open goes on and a channel
    confirmed after that is discarded. Cancelling asyncssh's open instead leaves a channel the shadow
    confirmed open for the life of the session, with its TCP connection in the pod (finding R7)."""
    task = aio.create_task(opening) if asyncio.iscoroutine(opening) else asyncio.ensure_future(opening)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda done: _discard_late(done, discard))
        raise


def _discard_late(task: asyncio.Future[T], discard: Callable[[T], None]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    log.debug("closing a channel whose open completed after its caller gave up")
    discard(task.result())


def close_stream(streams: tuple[Any, Any]) -> None:
    """discard() for open_connection's (reader, writer)."""
    streams[1].close()


def close_channel(opened: tuple[Any, Any]) -> None:
    """discard() for create_connection's (channel, session)."""
    opened[0].close()


def session_gone(conn: asyncssh.SSHClientConnection, exc: BaseException) -> bool:
    """True when an open failed because the session died, not because the shadow refused it."""
    if conn.is_closed():
        return True
    return isinstance(exc, asyncssh.ChannelOpenError) and exc.reason == SESSION_CLOSED
