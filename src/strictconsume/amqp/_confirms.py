"""Publisher confirms on one channel: publish sequence numbers, single and multiple
confirms, and matching a returned message to the publish it was.

Sending confirm.select puts the channel in confirm mode at once (publishes pipelined
behind it are counted); publish sequence numbers start at 1. The outstanding numbers
are kept in publish order; basic.ack/basic.nack with multiple=True settle every
outstanding number <= delivery_tag (all of them when delivery_tag is 0), with
multiple=False exactly delivery_tag. Settling nothing, or a number that is not
outstanding, is a protocol error.

Returns in confirm mode: RabbitMQ sends basic.return for an unroutable mandatory
message before the basic.ack for it, and in publish order. So a returned message is
matched to the earliest outstanding, not yet returned, mandatory publish on its
channel with the same exchange, routing key and body. Two identical mandatory
publishes are two entries: the first return takes the first, the second the second.
To do that a reference (no copy) to the exchange, routing key and body of every
mandatory publish is kept until it is confirmed.
"""

from __future__ import annotations

import collections

import attrs

from ._errors import RemoteProtocolError

__all__ = ["PublishConfirms"]


@attrs.define(slots=True, eq=False)
class PublishConfirms:
    """The confirm state of one channel."""

    confirm: bool = False
    next_publish_tag: int = 1
    unconfirmed: set[int] = attrs.Factory(set)
    # Ascending; may still hold tags already confirmed singly (dropped lazily).
    publish_order: collections.deque[int] = attrs.Factory(collections.deque)
    # Mandatory, unconfirmed, not yet returned publishes: tag -> (exchange, key, body).
    returnable: dict[int, tuple[str, str, bytes]] = attrs.Factory(dict)

    def select(self) -> None:
        """confirm.select was sent: count publishes from 1 (once per channel)."""
        if not self.confirm:
            self.confirm = True
            self.next_publish_tag = 1

    def published(
        self, exchange: str, routing_key: str, body: bytes, mandatory: bool
    ) -> int | None:
        """A message was published: its sequence number in confirm mode, else None."""
        if not self.confirm:
            return None
        tag = self.next_publish_tag
        self.next_publish_tag = tag + 1
        self.unconfirmed.add(tag)
        self.publish_order.append(tag)
        if mandatory:
            self.returnable[tag] = (exchange, routing_key, body)
        return tag

    def settle(self, name: str, channel_id: int, tag: int, multiple: bool) -> tuple[int, ...]:
        """The broker's basic.ack or basic.nack (``name``): the sequence numbers it
        settles, ascending.

        Raises:
            RemoteProtocolError: The channel is not in confirm mode, or the confirm
                settles nothing outstanding.
        """
        if not self.confirm:
            raise RemoteProtocolError(
                f"the broker sent {name} on channel {channel_id}, which is not in confirm mode"
            )
        unconfirmed = self.unconfirmed
        order = self.publish_order
        tags: list[int] = []
        if multiple:
            while order and (tag == 0 or order[0] <= tag):
                settled = order.popleft()
                if settled in unconfirmed:
                    unconfirmed.remove(settled)
                    tags.append(settled)
            if not tags:
                raise RemoteProtocolError(
                    f"the broker sent {name} (multiple) for publish tag {tag} on channel "
                    f"{channel_id}, but no publish up to it is awaiting a confirm"
                )
        else:
            if tag not in unconfirmed:
                raise RemoteProtocolError(
                    f"the broker sent {name} for publish tag {tag} on channel {channel_id}, "
                    "which is not awaiting a confirm"
                )
            unconfirmed.remove(tag)
            tags.append(tag)
            while order and order[0] not in unconfirmed:
                order.popleft()
        returnable = self.returnable
        if returnable:
            for settled in tags:
                returnable.pop(settled, None)
        return tuple(tags)

    def match_return(self, exchange: str, routing_key: str, body: bytes) -> int | None:
        """The earliest returnable publish that this returned message is (module
        notes); it is returnable no more. None when none matches."""
        for tag, published in self.returnable.items():
            if published[0] == exchange and published[1] == routing_key and published[2] == body:
                del self.returnable[tag]
                return tag
        return None

    def forget(self) -> None:
        """The channel is closing: no confirm or return will be matched any more."""
        self.unconfirmed.clear()
        self.publish_order.clear()
        self.returnable.clear()
