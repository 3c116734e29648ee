"""The App ``tests/faults/test_cluster.py`` runs as a real process against a cluster:

    python -m strictconsume tests.faults.cluster_app:app --url u1,u2,u3 ...

The handler is ``tests/framework/process_app.py``'s, configured from the same
environment (``PROCESS_APP_QUEUE``, ``PROCESS_APP_RECORD_DIR``,
``PROCESS_APP_SLEEP_MAX``, ...); the one difference is the queue: a quorum queue,
replicated on every node, so that losing one node loses no message. No retries, so a
failure goes to ``<queue>.dlq`` at once with its reason.
"""

from __future__ import annotations

from strictconsume import App, Message, Retry
from tests.framework import process_app

app = App()


@app.consumer(
    process_app.QUEUE,
    queue_type="quorum",
    timeout=process_app.TIMEOUT,
    retry=Retry(delays=()),
)
async def handle(msg: Message) -> None:
    await process_app.handle(msg)
