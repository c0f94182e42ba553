"""The future of a request sent by :class:`tasks.client.KmsClient`, and the signed message it was sent as."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from schemas.messages import Reply, Request
from tasks.codec import Fields


@dataclass
class SentMessage:
    """A signed message as sent, to send again (``resend_after``), and when it was last sent."""

    request: Request
    args: list[str]
    at: float = field(default_factory=time.monotonic)


class RequestFuture(Future[Fields]):
    """The future of one request; ``request_id`` identifies it (for ``get_result`` after a timeout). A
    coalesced request's is its batch message's."""

    def __init__(self, request_id: str) -> None:
        super().__init__()
        self.request_id = request_id
        self.reply: Reply | None = None  # the verified reply, once it arrived (pool, worker key id...)
        self.sent: SentMessage | None = None  # the signed message, shared by the requests of one batch
