"""tasks.metrics.HeadAges: the bound of a RabbitMQ queue's oldest message age, from the messages taken and the
moments the queue was seen empty."""

from __future__ import annotations

import time

import pytest

from tasks.metrics import HeadAges


def test_nothing_seen_is_unknown_and_an_empty_queue_is_zero() -> None:
    heads = HeadAges()
    assert heads.seen("kms.a", 3) is None
    assert heads.seen("kms.a", 0) == 0.0
    assert heads.seen("kms.a", 3) == pytest.approx(0.0, abs=0.5)  # sent after it was seen empty


def test_the_bound_is_the_time_since_the_last_message_taken() -> None:
    heads = HeadAges()
    now = time.time()
    heads.taken("kms.a", now - 30)
    heads.taken("kms.a", now - 20)
    heads.taken("kms.a", now - 25)  # an older one taken later (sent again): the bound does not go back
    assert heads.seen("kms.a", 5) == pytest.approx(20, abs=0.5)
    assert heads.seen("kms.b", 5) is None  # per queue


def test_the_bound_is_tightened_by_an_empty_queue() -> None:
    heads = HeadAges()
    heads.taken("kms.a", time.time() - 100)
    heads.seen("kms.a", 0)
    bound = heads.seen("kms.a", 1)
    assert bound is not None and bound < 1


@pytest.mark.parametrize("sent_at", ["12", None, True, [1.0], time.time() + 3600])
def test_a_header_that_is_not_a_past_time_is_ignored(sent_at: object) -> None:
    heads = HeadAges()
    heads.taken("kms.a", sent_at)
    assert heads.seen("kms.a", 2) is None
