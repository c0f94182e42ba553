"""Figure Q's interactive probe (kmsq.bench_lanes.probe) measures kmsq, not the bench process's collector: while it
sends, the bench's own heap is out of the garbage collector's reach (a full collection over it stopped the probe's
sends for 90-150 ms, which showed as kmsq's p99), and afterwards the heap is back in it."""

from __future__ import annotations

import gc
from concurrent.futures import Future
from typing import Any

from kmsq import bench_lanes


class _AnsweringClient:
    """Answers every request at once, noting whether the collector saw the caller's heap when it was sent."""

    def __init__(self) -> None:
        self.frozen_when_sent: list[int] = []

    def _answer(self) -> Future[Any]:
        self.frozen_when_sent.append(gc.get_freeze_count())
        future: Future[Any] = Future()
        future.set_result({})
        return future

    def submit_generate_data_key(self, root_key: str) -> Future[Any]:
        return self._answer()

    def submit_sign(self, pub: str, source: str, payload: str, algorithm: str, pool: str) -> Future[Any]:
        return self._answer()

    def pool_for(self, root_key: str) -> str:
        return "bench"

    def wait(self, future: Future[Any]) -> Any:
        return future.result()


def test_probe_keeps_the_bench_heap_out_of_the_collector_while_it_sends() -> None:
    heap = [{"n": n} for n in range(10_000)]  # the bench's own objects, alive across the window
    client = _AnsweringClient()
    result = bench_lanes.probe(client, "root", "pub", seconds=0.5, rate=20)
    assert len(client.frozen_when_sent) == 10
    assert min(client.frozen_when_sent) >= len(heap)  # every request was sent with the heap frozen
    assert gc.get_freeze_count() == 0  # and the heap is collectable again afterwards
    assert result["generate_data_key"]["count"] == 5 and result["sign"]["count"] == 5
