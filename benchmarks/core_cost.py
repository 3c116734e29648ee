"""The sans-IO core's cost per message, without a socket or a broker.

usage: .venv/bin/python benchmarks/core_cost.py [--repeat 5] [--messages 20000]

Two figures, each the best of ``--repeat`` runs (the least disturbed by a noisy
neighbour on a shared machine), printed in nanoseconds of CPU time
(``time.process_time_ns``, which leaves out the time the process waited for a core)
per message:

- ``decode_cost_ns``: ``ProtocolConnection.receive_data`` per delivered 128-byte
  message (basic.deliver + content header + body, fed in 64 KiB reads), as
  ``client_throughput.py`` measures it;
- ``publish_cost_ns``: ``ProtocolConnection.publish`` of a 128-byte message with
  properties on a channel in confirm mode, ``data_to_send`` taken every 100 publishes.

To compare two trees, run this script with each tree's ``src`` first on PYTHONPATH
(``PYTHONPATH=/path/to/other/src .venv/bin/python benchmarks/core_cost.py``); the
module path it imported is printed with the figures.
"""

from __future__ import annotations

import argparse
import time

from pamqp import commands, frame

import strictconsume.amqp._protocol as protocol
from client_throughput import BODY, decode_cost_ns


def publish_cost_ns(messages: int = 20000) -> float:
    """CPU nanoseconds of ProtocolConnection.publish per 128-byte message (confirm
    mode)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20000)
    ns = parser.parse_args()
    decode = min(decode_cost_ns(ns.messages, time.process_time_ns) for _ in range(ns.repeat))
    publish = min(publish_cost_ns(ns.messages) for _ in range(ns.repeat))
    print(f"core: {protocol.__file__}")
    print(f"decode_cost_ns  {decode:8.0f}  (best of {ns.repeat}, {ns.messages} messages)")
    print(f"publish_cost_ns {publish:8.0f}  (best of {ns.repeat}, {ns.messages} messages)")


if __name__ == "__main__":
    main()
