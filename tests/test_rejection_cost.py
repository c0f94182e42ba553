"""What a message refused before authentication costs a pool process (issue 22, item 7c), in process: no
signed reply that nobody would be sent, no log line per refusal (one line per write of the counts), and the
counts as before. The flood through a real worker is tests/test_flood.py."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from schemas.wire import b64u, request_signing_input, sign
from tasks.codec import KmsCodec
from tasks.identity import CallerIdentity
from tests.unit_fixtures import Unit
from worker import audit, callers
from worker.pipeline import Inbound, handle
from worker.storage.db import transaction
from worker.storage.models import RejectionCount

FLOOD = 50


def forged(codec: KmsCodec, count: int) -> list[Inbound]:
    """``count`` generate_data_key messages of ``codec`` whose signature does not verify."""
    messages = []
    for _ in range(count):
        request, args = codec.build_request({"op": "generate_data_key"}, "alpha")
        args = [*args[:3], ("B" if args[3][0] == "A" else "A") + args[3][1:]]
        messages.append(Inbound("kmsq.generate_data_key", request.reply_queue, str(request.request_id), args))
    return messages


@pytest.fixture
def signatures(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The replies the pipeline signs (their signing input), counted."""
    import worker.pipeline

    signed: list[bytes] = []

    def counting(key: Any, data: bytes) -> str:
        signed.append(data)
        return sign(key, data)

    monkeypatch.setattr(worker.pipeline, "sign", counting)
    return signed


def test_a_refusal_nobody_is_told_is_not_signed(unit: Unit, full: KmsCodec, signatures: list[bytes]) -> None:
    stranger = KmsCodec(CallerIdentity.generate("stranger"), unit.fleet)
    for message in forged(full, FLOOD) + forged(stranger, FLOOD):
        delivery = handle(unit.ctx, message)
        assert (delivery.queue, delivery.code, delivery.envelope) == (None, "unauthenticated", {})
    assert signatures == []
    with transaction(unit.service.sessions) as db:  # a refusal the caller is told is signed, as before
        callers.set_caller_state(unit.service.hsm, db, "full", "disabled")
    delivery = unit.deliver(full, {"op": "generate_data_key"})
    assert delivery.queue == full.reply_queue and len(signatures) == 1


def test_a_flood_logs_one_line_per_write_of_the_counts(
    unit: Unit, full: KmsCodec, caplog: pytest.LogCaptureFixture
) -> None:
    messages = forged(full, FLOOD)
    body = b"{not json"  # signed: refused as malformed, and told on no queue (none could be read from it)
    malformed = [full.identity.caller, full.identity.key_id, b64u(body),
                 sign(full.identity.signing, request_signing_input("kmsq.generate_data_key", body))]  # fmt: skip
    messages.append(Inbound("kmsq.generate_data_key", full.reply_queue, str(uuid.uuid4()), malformed))
    # The counts are written once, below: no timer's write in the middle of the flood on a slow machine (seen on a
    # loaded fresh-clone CI run: the loop outlasted the interval and the timer's write met the loop's).
    unit.ctx.rejections.interval = 3600
    with caplog.at_level(logging.INFO, logger="kmsq"):
        for message in messages:
            handle(unit.ctx, message)
        assert [r for r in caplog.records if r.name.startswith("kmsq")] == []  # nothing per refusal
        unit.ctx.rejections.flush()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("kmsq")]
    assert len(lines) == 1, lines
    assert f"refused {FLOOD + 1} messages in pool alpha" in lines[0], lines[0]
    assert f"{FLOOD} bad signature (unauthenticated)" in lines[0] and "1 malformed body (invalid)" in lines[0]
    assert str(messages[-1].message_id) in lines[0] and "{not json" not in lines[0]


def test_the_counts_are_those_of_every_refusal(unit: Unit, full: KmsCodec) -> None:
    stranger = KmsCodec(CallerIdentity.generate("stranger"), unit.fleet)
    for message in forged(full, FLOOD) + forged(stranger, 3):
        handle(unit.ctx, message)
    unit.ctx.rejections.flush()
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    with unit.service.sessions() as db:
        rows = {(r.caller, r.reason): r for r in db.scalars(select(RejectionCount))}
    assert rows[("full", "bad signature")].count == FLOOD and rows[("?", "unknown caller")].count == 3
    written = rows[("full", "bad signature")].minute.replace(tzinfo=UTC)
    assert written.second == 0 and abs((written - minute).total_seconds()) <= 60
    assert unit.ctx.rejections.total == FLOOD + 3


def test_a_name_that_is_not_printable_is_counted_printable() -> None:
    assert audit._printable("fu\x00ll\n") == "fu?ll?" == audit.printable("fu\x00ll\n")
    assert audit._printable("x" * 100) == "x" * 64
