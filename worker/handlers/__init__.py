"""One handler module per family of operations (``schemas.operations.Family``): each registers a function for
every operation of its family, and :func:`handler_of` finds it. A handler runs one authorized request inside the
open transaction and returns its :class:`Outcome`; the pipeline (:mod:`worker.pipeline`) does everything else
that every operation shares: authentication, binding, authorization, opening the sealed input, sealing the
reply's secrets, signing, recording and the audit record."""

from __future__ import annotations

from schemas.operations import OPERATIONS
from worker.handlers import data_keys, private_keys, results, signing
from worker.handlers.registry import HANDLERS, Handler, OpCall, Outcome, Recorded

__all__ = ["FAMILIES", "Handler", "OpCall", "Outcome", "Recorded", "handler_of"]

# The modules, by family: a test checks that each handles exactly its family's operations.
FAMILIES = {module.FAMILY: module for module in (data_keys, private_keys, results, signing)}

_unhandled = sorted(set(OPERATIONS) - set(HANDLERS))
if _unhandled:
    raise ImportError(f"operations without a handler: {', '.join(_unhandled)}")


def handler_of(op: str) -> Handler:
    """Returns the handler of ``op``. Raises KeyError for an operation the table does not declare."""
    return HANDLERS[op]
