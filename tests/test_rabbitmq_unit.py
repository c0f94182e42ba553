"""tasks.rabbitmq in process: a nacked publish is told apart from other broker errors (it is sent again), and
the vhost comes from the namespace."""

from __future__ import annotations

import pytest
from amqp.exceptions import MessageNacked
from kombu.exceptions import OperationalError

from tasks import rabbitmq


def _wrapped(cause: BaseException) -> OperationalError:
    try:
        try:
            raise cause
        except Exception as e:
            raise OperationalError(str(e)) from e  # as kombu's _reraise_as_library_errors does
    except OperationalError as wrapped:
        return wrapped


def test_a_nack_is_found_under_kombu_s_error_and_nothing_else_is() -> None:
    assert rabbitmq.nacked(_wrapped(MessageNacked()))
    assert not rabbitmq.nacked(_wrapped(ConnectionResetError(104, "reset")))
    assert not rabbitmq.nacked(OperationalError("no broker"))


def test_a_nacked_message_is_sent_again_within_seconds() -> None:
    waits = [rabbitmq.nack_backoff(a) for a in range(rabbitmq.NACK_ATTEMPTS - 1)]
    assert waits == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2]) and sum(waits) < 10  # a caller's attempt is 10 s


def test_the_namespace_is_the_vhost_of_every_node() -> None:
    url = "amqp://u:p@a:5672;amqp://u:p@b:5672"
    assert rabbitmq.with_vhost(url, "blue") == "amqp://u:p@a:5672/blue;amqp://u:p@b:5672/blue"
    assert rabbitmq.with_vhost(url, None) == url
    with pytest.raises(ValueError, match="names vhost 'prod'"):
        rabbitmq.with_vhost("amqp://u:p@a:5672/prod", "blue")
