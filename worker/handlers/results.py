"""The results family: ``get_result``, a caller's stored reply to one of its earlier requests. Its own reply is
not stored (``schemas.operations``: not recorded): it hands out one that is."""

from __future__ import annotations

import logging
import uuid

import pydantic

from schemas.limits import MAX_REPLY_BYTES
from schemas.messages import Reply, ReplyEnvelope
from schemas.operations import Family
from schemas.replies import StoredResultReply
from schemas.requests import GetResult
from schemas.wire import WireError, from_b64u
from worker.errors import NotFound, StoredResultCorrupt
from worker.handlers.registry import OpCall, Outcome, handles
from worker.storage.repo import RequestRepository

FAMILY: Family = "results"
log = logging.getLogger("kmsq.worker")


@handles(FAMILY, "get_result")
def get_result(call: OpCall, params: GetResult) -> Outcome:
    """The stored reply envelope of the caller's request ``params.request_id``. Raises NotFound when there is
    none (yet), StoredResultCorrupt when the stored reply answers another request."""
    caller = call.request.caller
    record = RequestRepository(call.db).get(caller, str(params.request_id))
    if record is None or record.status == "pending":
        raise NotFound("no stored result for this request_id")
    if not _answers(record.reply, caller, params.request_id):  # e.g. another row's reply copied in
        log.error("stored reply of %s %s names another request", caller, params.request_id)
        raise StoredResultCorrupt()
    return Outcome(StoredResultReply(reply=record.reply, request_id=str(params.request_id)))


def _answers(stored: str, caller: str, request_id: uuid.UUID) -> bool:
    """True when a stored reply envelope answers ``caller``'s request ``request_id``."""
    try:
        body = from_b64u(ReplyEnvelope.model_validate_json(stored).body, max_len=MAX_REPLY_BYTES)
        reply = Reply.model_validate_json(body)
    except (pydantic.ValidationError, WireError):
        return False
    return reply.request_id == request_id and reply.caller == caller
