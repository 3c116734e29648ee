"""The App that ``tests/faults/test_bad_input.py`` runs as a real process:

    python -m strictconsume tests.faults.bad_input_app:app --backend trio ...

The harness (``tests/processes.py``) sets ``PROCESS_APP_QUEUE`` (the queue) and
``PROCESS_APP_RECORD_DIR`` (where the handler records what it did). ``BAD_INPUT_RETRY``
is the retry policy's delays in seconds, comma-separated (none by default: a failure
goes to ``<queue>.dlq`` at once).

What the handler does with a message is chosen by its ``do`` header (a string):

``json`` (the default)
    parse the body with ``msg.json()``.
``digest``
    record ``<id> <length> <sha256>`` of the body in ``<pid>.digest``, without decoding
    it (a handler of bytes).
``sleep``
    ``await anyio.sleep(<the "seconds" header>)``.
``block``
    block the event loop: ``time.sleep(<the "seconds" header>)``, on the first
    delivery only (``redelivered`` False), so that a redelivery finishes.
``raise``
    raise what the ``raise`` header names (see :data:`RAISERS`).

The handler records the message's id (the ``id`` header, else the message_id, else
``tag<delivery_tag>``) in ``<pid>.started`` when it starts and ``<pid>.finished`` when
it returns, each line with one ``os.write`` on an ``O_APPEND`` descriptor (as
``tests/framework/process_app.py`` does), so ``Consumer.finished()`` reads them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable

import anyio

from strictconsume import App, Message, Retry
from tests.framework.process_app import record

QUEUE = os.environ.get("PROCESS_APP_QUEUE", "strictconsume-bad-input-app")
RETRY = tuple(float(s) for s in os.environ.get("BAD_INPUT_RETRY", "").split(",") if s)

app = App()


class HandlerAbort(BaseException):
    """A BaseException of the user's own, neither an Exception nor an interrupt."""


async def _exit() -> None:
    sys.exit(3)


#: What ``do: raise`` raises, by the ``raise`` header.
RAISERS: dict[str, Callable[[], BaseException]] = {
    "KeyboardInterrupt": KeyboardInterrupt,
    "SystemExit": lambda: SystemExit(3),
    "GeneratorExit": GeneratorExit,
    "HandlerAbort": lambda: HandlerAbort("the handler gave up"),
    "ExceptionGroup": lambda: ExceptionGroup(
        "two failures", [ValueError("first"), KeyError("second")]
    ),
    "BaseExceptionGroup": lambda: BaseExceptionGroup(
        "an interrupt in a group", [KeyboardInterrupt()]
    ),
}


def _header(msg: Message, name: str, default: str = "") -> str:
    value = msg.headers.get(name)
    if isinstance(value, bytes | bytearray):
        return value.decode()
    return default if value is None else str(value)


@app.consumer(QUEUE, timeout=120, retry=Retry(delays=RETRY))
async def handle(msg: Message) -> None:
    ident = _header(msg, "id") or msg.message_id or f"tag{msg.delivery_tag}"
    action = _header(msg, "do", "json")
    record("started", ident)
    if action == "json":
        msg.json()
    elif action == "digest":
        record("digest", f"{ident} {len(msg.body)} {hashlib.sha256(msg.body).hexdigest()}")
    elif action == "sleep":
        await anyio.sleep(float(_header(msg, "seconds")))
    elif action == "block":
        if not msg.redelivered:
            time.sleep(float(_header(msg, "seconds")))  # noqa: ASYNC251 - on purpose
    elif action == "raise":
        name = _header(msg, "raise")
        if name == "SystemExitInTaskGroup":
            async with anyio.create_task_group() as tg:
                tg.start_soon(_exit)
        raise RAISERS[name]()
    else:
        raise ValueError(f"unknown action {action!r}")
    record("finished", ident)
