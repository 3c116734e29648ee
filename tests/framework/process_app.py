"""The App that ``tests/framework/test_process.py`` runs as a real process:

    python -m strictconsume tests.framework.process_app:app --backend trio ...

Everything per test comes from the environment, read once at import:

``PROCESS_APP_QUEUE``
    the queue to consume (durable; no retries, so a failure goes to ``<queue>.dlq``).
``PROCESS_APP_RECORD_DIR``
    where the handler records message ids: ``<pid>.started`` gets a line when a
    handler starts (only with ``PROCESS_APP_MARK_STARTED=1``), ``<pid>.finished``
    one when it returns, just before the framework acks. Each line is appended with
    one ``os.write`` on an ``O_APPEND`` descriptor, so a line is in the file (the
    kernel's) as soon as the handler returns, whatever happens to the process later.
``PROCESS_APP_SLEEP_MAX``
    a message whose JSON body has no ``"sleep"`` sleeps uniformly in ``[0, max]`` s.
``PROCESS_APP_TIMEOUT``
    the handler's timeout (120 s).

A message's body is JSON: ``{"id": "...", "sleep": seconds}`` (``sleep`` optional).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio

from strictconsume import App, Message, Retry

QUEUE = os.environ.get("PROCESS_APP_QUEUE", "strictconsume-process-app")
RECORD_DIR = Path(os.environ.get("PROCESS_APP_RECORD_DIR", "."))
MARK_STARTED = os.environ.get("PROCESS_APP_MARK_STARTED") == "1"
SLEEP_MAX = float(os.environ.get("PROCESS_APP_SLEEP_MAX", "0"))
TIMEOUT = float(os.environ.get("PROCESS_APP_TIMEOUT", "120"))

app = App()

_files: dict[str, int] = {}


def record(kind: str, message_id: str) -> None:
    """Append ``message_id`` to this process's ``<pid>.<kind>`` file.

    A few microseconds of blocking I/O on the event loop, on purpose: the line must be
    in the file before the handler returns (and so before the ack can be sent).
    """
    fd = _files.get(kind)
    if fd is None:
        path = RECORD_DIR / f"{os.getpid()}.{kind}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _files[kind] = fd
    os.write(fd, f"{message_id}\n".encode())


@app.consumer(QUEUE, timeout=TIMEOUT, retry=Retry(delays=()))
async def handle(msg: Message) -> None:
    data = msg.json()
    message_id = str(data["id"])
    if MARK_STARTED:
        record("started", message_id)
    sleep = data.get("sleep")
    await anyio.sleep(float(sleep) if sleep is not None else random.uniform(0, SLEEP_MAX))
    record("finished", message_id)
