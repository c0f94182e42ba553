"""The future of a request sent by :class:`tasks.client.KmsClient`, the signed message it was sent as, and the
bridge that hands finished futures to an asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from schemas.messages import Reply, Request
from tasks.codec import Fields


@dataclass
class SentMessage:
    """A signed message as sent, to send again (``resend_after``), and when it was last sent."""

    request: Request
    args: list[str]
    at: float = field(default_factory=time.monotonic)
    lane: str = "interactive"  # the pool queue's lane it went to (schemas.wire.pool_queue)


class RequestFuture(Future[Fields]):
    """The future of one request; ``request_id`` identifies it (for ``get_result`` after a timeout). A
    coalesced request's is its batch message's."""

    def __init__(self, request_id: str) -> None:
        super().__init__()
        self.request_id = request_id
        self.reply: Reply | None = None  # the verified reply, once it arrived (pool, worker key id...)
        self.sent: SentMessage | None = None  # the signed message, shared by the requests of one batch


class LoopBridge:
    """Hands results from the client's threads to an event loop, one wake-up per burst: a batch reply
    completes hundreds of futures at once, and ``asyncio.wrap_future`` would wake the loop for each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._done: list[tuple[Future[Any], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._lock = threading.Lock()

    def watch(self, future: Future[Fields]) -> asyncio.Future[Fields]:
        """Returns an asyncio future with ``future``'s outcome. Call on the loop."""
        waiter: asyncio.Future[Fields] = self.loop.create_future()
        future.add_done_callback(lambda f: self._arrived(f, waiter))
        # Given up on (a timeout): the client forgets the request (a long-running caller must not keep one
        # entry per request nobody waits for).
        waiter.add_done_callback(lambda w: future.cancel() if w.cancelled() else None)
        return waiter

    def _arrived(self, future: Future[Any], waiter: asyncio.Future[Any]) -> None:
        with self._lock:
            self._done.append((future, waiter))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            done, self._done, self._scheduled = self._done, [], False
        for future, waiter in done:
            if waiter.done():  # timed out meanwhile
                continue
            if future.cancelled():
                waiter.cancel()
            elif (error := future.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())
