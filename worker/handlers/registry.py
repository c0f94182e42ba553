"""What a handler gets and returns, and the registry of handlers by operation (filled by the family modules)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy.orm import Session

from schemas.messages import Request
from schemas.operations import OPERATIONS, Family
from schemas.replies import ItemError
from worker.errors import ServiceError
from worker.keystore import KeyStore
from worker.service import RootKeyAccess
from worker.storage.repo import RequestRepository


@dataclass(frozen=True)
class OpCall:
    """One authenticated, authorized request as its handler sees it: the HSM, the open transaction (the handler
    adds and flushes rows, never commits), the worker's pool, the request, how it reaches root keys (the
    worker's trusted rows and the caller's root key permissions), and its sealed input opened (the bytes the
    operation's ``sealed_input`` field sealed to this pool, or None), and the caller's permissions (its row's
    ``allowed_ops``, as the pipeline authorized it)."""

    hsm: KeyStore
    db: Session
    pool: str
    request: Request
    keys: RootKeyAccess
    sealed_input: bytes | None = field(default=None, repr=False)
    permissions: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Outcome:
    """What an operation produced: its reply (its operation's reply model; sealed fields still in plaintext, in
    the worker's memory only) and the root key version it used, for the audit record."""

    reply: BaseModel
    root_key_id: str | None = None
    root_key_version: int | None = None
    # Items of a batch refused on their own that the audit names one by one (``sign_many``: each refused signature,
    # with its key, payload digest and rule): (operation, outcome code, detail), recorded after the batch's record.
    item_audits: tuple[tuple[str, str, str], ...] = ()


class Recorded(Exception):
    """Another delivery of the request has committed its record: raised by a handler before an effect outside the
    database, which a rollback would not undo (a key made in the token). The pipeline sends the stored reply."""


def refuse_if_recorded(call: OpCall) -> None:
    """Raises Recorded when ``call``'s request is recorded already. The record's insert, after the handler, stays
    the commit point; this lookup only spares a redelivered message the effect it cannot roll back."""
    request = call.request
    if RequestRepository(call.db).get(request.caller, str(request.request_id)) is not None:
        raise Recorded()


Handler = Callable[[OpCall, Any], Outcome]
H = TypeVar("H", bound=Handler)
HANDLERS: dict[str, Handler] = {}


def handles(family: Family, *ops: str) -> Callable[[H], H]:
    """Registers the decorated function as the handler of ``ops``, which must be operations of ``family``.

    Raises KeyError for an operation the table does not declare, ValueError for one of another family or one
    registered twice."""

    def register(handler: H) -> H:
        for op in ops:
            row = OPERATIONS[op]
            if row.family != family:
                raise ValueError(f"{op} is an operation of the {row.family} family, not {family}")
            if op in HANDLERS:
                raise ValueError(f"{op} has a handler already")
            HANDLERS[op] = handler
        return handler

    return register


def item_error(error: ServiceError) -> ItemError:
    """The item of a batch reply for an item that failed."""
    return ItemError(error=error.code, message=error.message)
