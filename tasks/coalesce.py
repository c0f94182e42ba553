"""Coalescing: concurrent single requests of one operation, pool and shared fields go out as one batch message.

An operation coalesces when its row in ``schemas.operations`` has a batch form (:class:`Batching`) that allows
it: the batch operation, which fields make an item, which the batch shares (the root key) and which it sets.
A request that finds nothing of its kind in flight is sent at once, alone, on the caller's thread, exactly as
without coalescing (same latency, same errors). While one is in flight, the next ones of that kind wait for
company, as Nagle's algorithm does for TCP segments: at least ``linger`` seconds, and on while ``max_in_flight``
batch messages (of two items or more) of their kind are out, until one of those lands, at most ``max_wait``
seconds (single messages hold nothing back: a few concurrent callers go in parallel, as before); a group that reaches
``max_items`` items or ``max_bytes`` of items goes at once. Groups go from the coalescer's sender thread as
one batch message; a group of one goes as the single operation. So a batch holds what arrived during the
previous one: under load, batches grow to what the workers take, instead of many small ones going out every
``linger`` (each message has a fixed cost in the worker: its verification, transaction, audit record and
reply). Each caller gets its own item's fields, or its own item's error, or the error of the batch as a
whole. The batch is one message with one request id: the worker's idempotency and a resend (``resend_after``)
cover it as a whole.

Imports no HSM or database code.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.limits import MAX_BATCH_ITEMS, MAX_REQUEST_BYTES
from schemas.operations import Batching, Operation
from schemas.wire import canonical_json
from tasks.codec import Fields, KmsError, KmsTimeout
from tasks.futures import RequestFuture

log = logging.getLogger("kmsq.client")
# What an item adds to a batch message besides its own value (JSON punctuation, field names).
_ITEM_OVERHEAD_BYTES = 64
# The most item bytes one coalesced message may carry: a message's limit, less room for its own fields.
MAX_COALESCED_BYTES = MAX_REQUEST_BYTES - 64 * 1024


@dataclass(frozen=True)
class CoalescePolicy:
    """How long a request waits for others (seconds: at least ``linger``; while ``max_in_flight`` batch messages
    of its kind are out, until one lands, at most ``max_wait``), and how large one batch message may grow."""

    linger: float = 0.002
    max_items: int = 256
    max_bytes: int = 1024 * 1024
    max_in_flight: int = 1
    max_wait: float = 0.1

    def __post_init__(self) -> None:
        if not (0 <= self.linger <= 1 and 1 <= self.max_items <= MAX_BATCH_ITEMS
                and 1024 <= self.max_bytes <= MAX_COALESCED_BYTES
                and 1 <= self.max_in_flight <= 1024 and 0 <= self.max_wait <= 10):  # fmt: skip
            raise ValueError(
                f"coalescing needs 0 <= linger <= 1 s, 1 <= max_items <= {MAX_BATCH_ITEMS}, "
                f"1024 <= max_bytes <= {MAX_COALESCED_BYTES}, 1 <= max_in_flight <= 1024 and 0 <= max_wait <= 10 s"
            )


@dataclass
class _Item:
    futures: list[RequestFuture]  # the callers it answers (several: equal reads asked once)
    value: Any  # the item as its batch operation takes it
    sealed: Any  # its sealed input's plaintext (put_key's prv), or None
    cost: int  # bytes it adds to the batch message
    send_alone: Callable[[], RequestFuture]


@dataclass
class _Group:
    batching: Batching
    shared: dict[str, Any]
    deadline: float  # when its linger is over
    last_call: float  # when it goes even while its kind has max_in_flight batch messages out
    items: list[_Item] = field(default_factory=list)
    cost: int = 0
    retry: bool = False  # items sent alone again, after their batch could not answer them
    by_value: dict[str, _Item] = field(default_factory=dict)  # batchings that dedupe: an item by its value


# (single operation, pool, the values of the fields its batch shares)
_Key = tuple[str, str, tuple[Any, ...]]


class BatchSender(Protocol):
    """What the coalescer sends batches with (:class:`tasks.client.KmsClient`)."""

    def call(
        self, op: str, fields: dict[str, Any], pool: str | None = None, *, lane: str | None = None,
        backoff: bool = True,
    ) -> RequestFuture: ...  # fmt: skip


class Coalescer:
    """Groups a :class:`tasks.client.KmsClient`'s concurrent single requests. Thread-safe."""

    def __init__(self, client: BatchSender, policy: CoalescePolicy) -> None:
        self.client = client
        self.policy = policy
        self.batches_sent = 0  # batch messages sent for coalesced requests
        self.items_coalesced = 0  # requests that went out in one of those
        self._in_flight: dict[_Key, int] = {}  # sends of each kind out (a request finding none goes alone)
        self._batches_out: dict[_Key, int] = {}  # of those, batch messages (what max_in_flight bounds)
        self._groups: dict[_Key, _Group] = {}
        self._ready: list[tuple[_Key, _Group]] = []  # groups to send now, in order
        self._lock = threading.Condition()
        self._closed = False
        self._flusher = threading.Thread(target=self._flush_when_due, name="kmsq-coalesce", daemon=True)
        self._flusher.start()

    def submit(
        self, operation: Operation, pool: str, params: dict[str, Any], send_alone: Callable[[], RequestFuture]
    ) -> RequestFuture:
        """Sends the request (``operation`` with ``params``, checked already; a sealed input still in plaintext)
        now, alone and on this thread, exactly as without coalescing, when nothing of its kind is in flight;
        otherwise adds it to its kind's next batch, which the sender thread sends. Returns its future. Raises
        what ``send_alone`` raises when it is sent alone, KmsError when the client is closed."""
        batching = operation.batch
        assert batching is not None  # only operations with a batch form coalesce
        shared = {name: params.get(name) for name in batching.shared}
        key: _Key = (operation.name, pool, tuple(shared.values()))
        value = batching.item(params)
        sealed = params.get(operation.sealed_input.field) if operation.sealed_input is not None else None
        cost = item_cost(value, sealed)
        with self._lock:
            if self._closed:
                raise KmsError("unavailable", "the client is closed")
            alone = cost > self.policy.max_bytes or (not self._in_flight.get(key) and key not in self._groups)
            if alone:
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
            else:
                future = self._add(key, batching, shared, _Item([RequestFuture("")], value, sealed, cost, send_alone))
        if not alone:
            return future
        try:
            future = send_alone()
        except BaseException:
            self._landed(key)
            raise
        future.add_done_callback(lambda _: self._landed(key))
        return future

    def _add(self, key: _Key, batching: Batching, shared: dict[str, Any], item: _Item) -> RequestFuture:
        """Adds an item to its kind's next batch (an equal one already there when the batching dedupes: then
        that item answers this caller too). Returns the caller's future. Call with the lock held."""
        group = self._groups.get(key)
        if group is not None and batching.dedupe:
            twin = group.by_value.get(canonical_json(item.value).decode())
            if twin is not None:
                twin.futures.append(item.futures[0])
                return item.futures[0]
        if group is not None and group.cost + item.cost > self.policy.max_bytes:
            self._dispatch(key, self._groups.pop(key))
            group = None
        if group is None:
            now, policy = time.monotonic(), self.policy
            group = self._groups[key] = _Group(
                batching, shared, now + policy.linger, now + max(policy.linger, policy.max_wait)
            )
        group.items.append(item)
        group.cost += item.cost
        if batching.dedupe:
            group.by_value[canonical_json(item.value).decode()] = item
        if len(group.items) >= self.policy.max_items:
            self._dispatch(key, self._groups.pop(key))
        self._lock.notify()
        return item.futures[0]

    def _dispatch(self, key: _Key, group: _Group) -> None:
        """Queues a group for the sender thread; it is in flight from now on. Call with the lock held."""
        _count(self._in_flight, key, 1)
        if len(group.items) > 1:
            _count(self._batches_out, key, 1)
        self._ready.append((key, group))

    def _landed(self, key: _Key, batch: bool = False) -> None:
        with self._lock:
            _count(self._in_flight, key, -1)
            if batch:
                _count(self._batches_out, key, -1)
                if key in self._groups:  # a group waiting for a free send may go now
                    self._lock.notify()

    def _due(self, key: _Key, group: _Group, now: float) -> float:
        """When ``group`` is to go: its linger's end, or, while its kind has ``max_in_flight`` batch messages out,
        its last call (the sender thread is woken when one lands). Call with the lock held."""
        if self._batches_out.get(key, 0) < self.policy.max_in_flight:
            return group.deadline
        return group.last_call

    def _flush_when_due(self) -> None:
        """The sender thread: sends what is ready, and each group when it is due (:meth:`_due`)."""
        while True:
            with self._lock:
                while not self._closed:
                    now = time.monotonic()
                    for key in [k for k, g in self._groups.items() if self._due(k, g, now) <= now]:
                        self._dispatch(key, self._groups.pop(key))
                    if self._ready:
                        break
                    next_due = min((self._due(k, g, now) for k, g in self._groups.items()), default=None)
                    self._lock.wait(None if next_due is None else next_due - now)
                if self._closed:
                    return
                ready, self._ready = self._ready, []
            for key, group in ready:
                self._send(key, group)

    def _send(self, key: _Key, group: _Group) -> None:
        """Sends one group: alone when it has one item, else as its batch operation."""
        try:
            sent = group.items[0].send_alone() if len(group.items) == 1 else self._send_batch(key, group)
        except KmsError as e:  # each caller gets the refusal, as it would have alone
            self._refuse(key, group, e)
            return
        except Exception as e:  # the broker: kombu's errors, after its retries
            log.warning("could not send %d request(s): %s", len(group.items), type(e).__name__)
            self._refuse(key, group, KmsError("unavailable", "broker unavailable"))
            return
        batch = len(group.items) > 1
        if batch:
            self.batches_sent += 1
            self.items_coalesced += sum(len(item.futures) for item in group.items)
        futures = [future for item in group.items for future in item.futures]
        for future in futures:
            future.request_id = sent.request_id
            future.sent = sent.sent
        remaining = [len(futures)]

        def item_done(_: Future[Fields]) -> None:  # every caller gave up (timeouts): no longer in flight
            with self._lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last and not sent.done():
                sent.cancel()

        sent.add_done_callback(lambda f: self._deliver(key, f, group, batch))
        for future in futures:
            future.add_done_callback(item_done)

    def _refuse(self, key: _Key, group: _Group, error: KmsError) -> None:
        self._landed(key, len(group.items) > 1)
        for item in group.items:
            for future in item.futures:
                if not future.done():
                    future.set_exception(error)

    def _send_batch(self, key: _Key, group: _Group) -> RequestFuture:
        params = group.batching.batch_params(
            group.shared, [item.value for item in group.items], [item.sealed for item in group.items]
        )
        params.pop("op")
        # Single requests waiting for their answers, in one message: interactive work, not a bulk job's; each was
        # admitted by the client's back-off already (tasks.backoff).
        return self.client.call(group.batching.op, params, key[1], lane="interactive", backoff=False)

    def _deliver(self, key: _Key, sent: Future[Fields], group: _Group, batch: bool) -> None:
        """Hands each caller its item of the reply, or the error of the whole. An item the batch could not answer
        (``too_large``, or the batch refused as a whole for a reason its items may not share) is sent again,
        alone, once: everyone gets the answer it would have had alone."""
        self._landed(key, batch)
        whole = sent.exception() if not sent.cancelled() else None
        for index, item in enumerate(group.items):
            if all(future.done() for future in item.futures):
                continue
            try:
                fields = sent.result()
                if batch:
                    fields = _item_fields(fields, index, len(group.items), str(item.futures[0].request_id))
            except KmsError as e:
                if batch and _send_alone_again(e, whole):
                    self._retry(key, group, item)
                    continue
                _settle(item, error=e)
                continue
            except BaseException as e:
                _settle(item, error=e)
                continue
            _settle(item, fields, getattr(sent, "reply", None))

    def _retry(self, key: _Key, group: _Group, item: _Item) -> None:
        """Queues ``item`` to be sent alone by the sender thread."""
        with self._lock:
            if self._closed:
                _settle(item, error=KmsTimeout(item.futures[0].request_id))
                return
            now = time.monotonic()
            self._dispatch(key, _Group(group.batching, group.shared, now, now, [item], retry=True))
            self._lock.notify()

    def close(self) -> None:
        """Stops the sender thread; requests not sent yet fail as not answered."""
        with self._lock:
            self._closed = True
            groups = list(self._groups.values()) + [group for _, group in self._ready]
            self._groups, self._ready = {}, []
            self._lock.notify()
        for group in groups:
            for item in group.items:
                _settle(item, error=KmsTimeout(item.futures[0].request_id))
        if threading.current_thread() is not self._flusher:
            self._flusher.join(timeout=5)


def _count(counts: dict[_Key, int], key: _Key, step: int) -> None:
    """Adds ``step`` to ``counts[key]``, dropping the key at zero."""
    left = counts.get(key, 0) + step
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _send_alone_again(error: KmsError, whole: BaseException | None) -> bool:
    """Whether an item a batch did not answer is sent alone: ``too_large`` (its answer did not fit the batch's),
    or the batch refused as a whole with an error its items need not share (an internal error, such as a reply too
    large to open, or ``invalid``). Not for ``unavailable`` (the worker or broker: sending more does not help)
    nor for a refusal that is the caller's own (forbidden, unauthenticated...)."""
    if error is not whole:
        return error.code == "too_large"
    return not isinstance(error, KmsTimeout) and error.code in ("internal", "invalid")


def _settle(
    item: _Item, fields: Fields | None = None, reply: Any = None, *, error: BaseException | None = None
) -> None:
    """Completes every future of ``item`` not done yet: with a copy of ``fields``, or with ``error``."""
    for future in item.futures:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.reply = reply
            future.set_result(dict(fields or {}))


def _item_fields(fields: Fields, index: int, count: int, request_id: str) -> Fields:
    """One item of a batch reply as its single operation returns it. Raises its KmsError."""
    items = fields.get("items")
    if not isinstance(items, list) or len(items) != count:
        raise KmsError("internal", "batch reply does not match its request", request_id)
    item = dict(items[index])
    if "error" in item:
        raise KmsError(str(item["error"]), str(item.get("message", "")), request_id)
    return item


def item_cost(value: Any, sealed: Any = None) -> int:
    """Bytes an item adds to a batch message: its value as JSON, and its sealed input (base64url, 4/3)."""
    cost = len(canonical_json(value)) + _ITEM_OVERHEAD_BYTES
    if sealed is not None:
        cost += (len(json.dumps(sealed)) + 1) * 4 // 3
    return cost
