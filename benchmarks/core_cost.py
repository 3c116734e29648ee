"""The sans-IO core's cost per message, without a socket or a broker.

usage: .venv/bin/python benchmarks/core_cost.py [--repeat 5] [--messages 20000]
                                                [--against OTHER/src]

Two figures, each the best of ``--repeat`` runs (the least disturbed by a noisy
neighbour on a shared machine), printed in nanoseconds of CPU time
(``time.process_time_ns``, which leaves out the time the process waited for a core)
per message:

- ``decode_cost_ns``: ``ProtocolConnection.receive_data`` per delivered 128-byte
  message (basic.deliver + content header + body, fed in 64 KiB reads), as
  ``client_throughput.py`` measures it;
- ``publish_cost_ns``: ``ProtocolConnection.publish`` of a 128-byte message with
  properties on a channel in confirm mode, ``data_to_send`` taken every 100 publishes.

``--against OTHER/src`` compares this tree's core with another's (``main``'s, say) in
one process: the other tree's ``strictconsume/amqp`` is copied to a temporary
directory and imported as a package of its own, and the two alternate, trial after
trial (``--repeat`` trials each, in turns), so that a busy neighbour weighs on both
alike. Then the best and the median of each side are printed.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from pamqp import commands, frame

import strictconsume.amqp._protocol
from client_throughput import BODY, decode_cost_ns


def publish_cost_ns(protocol: ModuleType, messages: int = 20000) -> float:
    """CPU nanoseconds of ProtocolConnection.publish per 128-byte message (confirm
    mode), of the core in ``protocol``."""
    core = protocol.ProtocolConnection(credentials=protocol.Credentials("guest", "guest"))
    core.initiate()
    core.receive_data(
        b"".join(
            [
                frame.marshal(
                    commands.Connection.Start(
                        mechanisms="PLAIN", locales="en_US", server_properties={}
                    ),
                    0,
                ),
                frame.marshal(commands.Connection.Tune(2047, 131072, 60), 0),
                frame.marshal(commands.Connection.OpenOk(), 0),
            ]
        )
    )
    channel = core.open_channel()
    core.receive_data(frame.marshal(commands.Channel.OpenOk(), channel))
    core.send_method(channel, commands.Confirm.Select())
    core.receive_data(frame.marshal(commands.Confirm.SelectOk(), channel))
    core.data_to_send()
    props = commands.Basic.Properties(delivery_mode=2, content_type="application/json")
    publish = core.publish
    start = time.process_time_ns()
    for n in range(messages):
        publish(channel, exchange="", routing_key="q", body=BODY, properties=props)
        if n % 100 == 99:
            core.data_to_send()
    elapsed = time.process_time_ns() - start
    return elapsed / messages


def trial(protocol: ModuleType, messages: int) -> tuple[float, float]:
    """One decode and one publish measurement of the core in ``protocol``."""
    return (
        decode_cost_ns(messages, time.process_time_ns, protocol),
        publish_cost_ns(protocol, messages),
    )


def other_core(src: Path, into: Path) -> ModuleType:
    """The ``_protocol`` module of the client under ``src``, imported as a package of
    its own (the client imports nothing of the framework, so it stands alone)."""
    shutil.copytree(src / "strictconsume" / "amqp", into / "other_amqp")
    sys.path.insert(0, str(into))
    return importlib.import_module("other_amqp._protocol")


def report(name: str, path: str | None, trials: list[tuple[float, float]]) -> None:
    decode = [d for d, _ in trials]
    publish = [p for _, p in trials]
    print(f"{name}: {path}")
    print(
        f"  decode_cost_ns  best {min(decode):7.0f}  median {statistics.median(decode):7.0f}"
        f"  ({len(trials)} trials)"
    )
    print(f"  publish_cost_ns best {min(publish):7.0f}  median {statistics.median(publish):7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--against", type=Path, help="another tree's src directory")
    ns = parser.parse_args()
    this = strictconsume.amqp._protocol
    if ns.against is None:
        report("this tree", this.__file__, [trial(this, ns.messages) for _ in range(ns.repeat)])
        return
    with tempfile.TemporaryDirectory() as tmp:
        other = other_core(ns.against, Path(tmp))
        sides = {"this tree": (this, list[tuple[float, float]]()), "against": (other, [])}
        for n in range(ns.repeat):
            order = list(sides.values()) if n % 2 else list(reversed(sides.values()))
            for protocol, trials in order:
                trials.append(trial(protocol, ns.messages))
        for name, (protocol, trials) in sides.items():
            report(name, protocol.__file__, trials)


if __name__ == "__main__":
    main()
