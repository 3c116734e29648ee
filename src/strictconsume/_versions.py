"""What differs between the RabbitMQ versions strictconsume supports (3.10 to 4.3).

The App reads the broker's version from connection.start
(:attr:`strictconsume.amqp.Connection.server_version`) and asks this module; each
answer is pinned by a test against that version of the broker (the table in
``tests/README.md``). ``None`` (a broker that does not say) is taken as the newest
behaviour.

- **Quorum queues count returns differently from 4.3.** Before 4.3 every return of a
  message to a quorum queue (``basic.nack`` or ``basic.reject`` with requeue, a
  channel or connection closed with the message unacked) increments its
  ``x-delivery-count``, which the delivery limit is checked against. From 4.3 only a
  failure counts: ``basic.reject`` with requeue and a lost channel or connection; a
  ``basic.nack`` with requeue (what ``Requeue`` and a shutdown send) does not, and
  the broker counts every return in ``x-acquired-count`` instead.
- **Consumer timeouts.** Up to 4.2 the broker closes the channel (406
  PRECONDITION_FAILED) when a delivery stays unacked past ``consumer_timeout``, for
  every queue type. From 4.3 only quorum queues enforce it, and they cancel the
  consumer (a ``basic.cancel`` to a client that advertises
  ``consumer_cancel_notify``, as ours does) and return the timed-out deliveries to
  the queue; the channel stays open. A per-consumer value is the consumer argument
  ``x-consumer-timeout`` (milliseconds), honoured from 3.12.
- **Message size.** 4.0 lowered the default ``max_message_size`` from 128 MiB to
  16 MiB; a larger publish closes the channel with 406.
- **frame_max.** 4.1 raised the least frame_max a client may ask for from 4096 to
  8192 (the client refuses before sending one, see ``amqp/_handshake.py``).
- **Transient non-exclusive queues** (``durable=False``) are a deprecated feature
  from 4.3: permitted by default there, refused (connection closed with 541) where
  ``deprecated_features.permit.transient_nonexcl_queues = false``.
- **Classic mirrored queues** (``ha-*`` policies) are gone from 4.0; nothing here
  relies on them (quorum queues replicate).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "Version",
    "consumer_timeout_argument",
    "consumer_timeout_cancels",
    "consumer_timeout_enforced",
    "describe",
    "max_message_size",
    "nack_counts_as_delivery",
    "transient_queues_deprecated",
]

Version = tuple[int, int, int] | None

_MiB: Final = 1024 * 1024


def _at_least(version: Version, since: tuple[int, int]) -> bool:
    return version is None or version[:2] >= since


def describe(version: Version) -> str:
    """``"RabbitMQ 4.3.6"``, or ``"a broker of unknown version"``."""
    if version is None:
        return "a broker of unknown version"
    return "RabbitMQ " + ".".join(map(str, version))


def nack_counts_as_delivery(version: Version) -> bool:
    """Whether a ``basic.nack`` with requeue (``Requeue``, a shutdown's requeue)
    raises a quorum message's ``x-delivery-count`` (and so brings it nearer to the
    delivery limit): before 4.3 it does, from 4.3 it does not."""
    return not _at_least(version, (4, 3))


def consumer_timeout_enforced(version: Version, queue_type: str) -> bool:
    """Whether the broker's consumer timeout applies to a consumer of this queue type
    (from 4.3, quorum queues only)."""
    return queue_type == "quorum" or not _at_least(version, (4, 3))


def consumer_timeout_cancels(version: Version) -> bool:
    """Whether a consumer timeout cancels the consumer (basic.cancel, the channel
    stays open; from 4.3) rather than closing the channel with 406."""
    return _at_least(version, (4, 3))


def consumer_timeout_argument(version: Version, queue_type: str) -> bool:
    """Whether to send the ``x-consumer-timeout`` consumer argument: brokers honour it
    from 3.12 (older ones ignore it); from 4.3 only quorum queues do, and a classic
    queue's consume with it is refused (406)."""
    if not consumer_timeout_enforced(version, queue_type):
        return False
    return _at_least(version, (3, 12))


def max_message_size(version: Version) -> int:
    """The broker's default ``max_message_size`` in bytes (a setting: a broker may be
    configured otherwise)."""
    return 16 * _MiB if _at_least(version, (4, 0)) else 128 * _MiB


def transient_queues_deprecated(version: Version) -> bool:
    """Whether declaring a non-durable, non-exclusive queue uses a deprecated feature
    (from 4.3), which a broker may be configured to refuse."""
    return _at_least(version, (4, 3))
