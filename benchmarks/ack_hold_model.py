"""The ack hold's cost in a consumer's window, without CPU: a model on trio's
autojump clock.

usage: .venv/bin/python benchmarks/ack_hold_model.py [--messages 20000]
           [--prefetch 100,1000] [--duration-ms 1,10,50] [--redelivery-ms 0.3]

The real ``ChannelAcks`` (its acker, its tracker, its hold) runs against a stand-in
broker: each ack frees the window slots it settles, and the broker delivers a new
message into each ``--redelivery-ms`` later; each handler takes ``--duration-ms`` of
virtual time, stretched by up to ``--jitter`` (a 10 ms sleep lasts 11-13 ms on a
loaded loop), so that handlers fall out of step as they do in a real consumer. The
ideal is prefetch / mean duration. Nothing costs CPU time (the clock jumps whenever
every task waits), so what is lost against the ideal is the time finished
messages wait for their ack, plus the redelivery: the figure the ack hold decides,
free of the noise of a shared machine. Printed per case: the share of the ideal and
the ack frames per message, with the hold before (``ACK_DELAY`` always: the policy
with an unbounded ``HOLD_SHARE``) and now.
"""

from __future__ import annotations

import argparse
import math
import random
from typing import Any, cast

import trio
import trio.testing

import strictconsume._acks as acks_module
from strictconsume._acks import ChannelAcks
from strictconsume.amqp import Channel


class Broker:
    """The channel's ack side: settles tags, then refills the window after a delay."""

    is_open = True

    def __init__(self, nursery: trio.Nursery, redelivery: float) -> None:
        self.nursery = nursery
        self.redelivery = redelivery
        self.unacked: set[int] = set()
        self.frames = 0

    def ack_nowait(self, delivery_tag: int, *, multiple: bool = False) -> None:
        self.frames += 1
        settled = [t for t in self.unacked if t <= delivery_tag] if multiple else [delivery_tag]
        self.unacked.difference_update(settled)
        self.nursery.start_soon(self.refill, len(settled))

    async def wait_writable(self) -> None:
        return

    async def refill(self, count: int) -> None:
        await trio.sleep(self.redelivery)
        for _ in range(count):
            self.deliver()

    def deliver(self) -> None:
        raise NotImplementedError  # set by run()


async def run(
    prefetch: int, duration: float, jitter: float, redelivery: float, messages: int
) -> dict[str, Any]:
    rng = random.Random(1)
    async with trio.open_nursery() as nursery:
        broker = Broker(nursery, redelivery)
        acks = ChannelAcks(cast(Channel, broker), prefetch)
        nursery.start_soon(acks.acker)
        tags = iter(range(1, 10**9))
        done = 0
        inflight = 0
        finished = trio.Event()

        async def handler(tag: int) -> None:
            nonlocal done, inflight
            took = duration * (1 + jitter * rng.random())
            await trio.sleep(took)
            await acks.acked(tag, alone=inflight == 1, duration=took)
            inflight -= 1
            done += 1
            if done == messages:
                finished.set()

        def deliver() -> None:
            nonlocal inflight
            tag = next(tags)
            broker.unacked.add(tag)
            acks.tracker.received(tag)
            inflight += 1
            nursery.start_soon(handler, tag)

        broker.deliver = deliver  # type: ignore[method-assign]
        began = trio.current_time()
        for _ in range(prefetch):
            deliver()
        await finished.wait()
        elapsed = trio.current_time() - began
        nursery.cancel_scope.cancel()
    return {
        "share": messages / elapsed / (prefetch / (duration * (1 + jitter / 2))),
        "frames": broker.frames / messages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--prefetch", default="100,1000")
    parser.add_argument("--duration-ms", default="1,5,10,50,200")
    parser.add_argument("--redelivery-ms", type=float, default=0.3)
    parser.add_argument(
        "--jitter", type=float, default=0.3, help="a handler takes duration x (1 + jitter x U(0,1))"
    )
    ns = parser.parse_args()
    share_now = acks_module.HOLD_SHARE
    print(
        f"redelivery {ns.redelivery_ms} ms, handlers of duration x (1 + {ns.jitter:g} x U(0,1)), "
        f"{ns.messages} messages; share of the ideal (ack frames per message)"
    )
    print(f"{'prefetch':>8} {'handler ms':>10} {'hold before':>20} {'hold now':>20}")
    for prefetch in (int(p) for p in ns.prefetch.split(",")):
        for duration_ms in (float(d) for d in ns.duration_ms.split(",")):
            row = []
            for share in (math.inf, share_now):
                acks_module.HOLD_SHARE = share
                clock = trio.testing.MockClock(autojump_threshold=0)
                result = trio.run(
                    run,
                    prefetch,
                    duration_ms / 1000,
                    ns.jitter,
                    ns.redelivery_ms / 1000,
                    ns.messages,
                    clock=clock,
                )
                row.append(f"{result['share']:6.1%} ({result['frames']:.3f})")
            acks_module.HOLD_SHARE = share_now
            print(f"{prefetch:>8} {duration_ms:>10g} {row[0]:>20} {row[1]:>20}", flush=True)


if __name__ == "__main__":
    main()
