"""The App that ``tests/deploy/test_prometheus.py`` runs as a real process, for a
real Prometheus to scrape:

    python -m strictconsume tests.deploy.metrics_app:app --http 127.0.0.1:PORT ...

``METRICS_APP_QUEUE`` names its queue. A message whose body is ``fail`` fails every
time (retried once after 0.2 s, then dead-lettered); any other is acked.
"""

from __future__ import annotations

import os

from strictconsume import App, Message, Retry

QUEUE = os.environ.get("METRICS_APP_QUEUE", "strictconsume-metrics-app")

app = App()


@app.consumer(QUEUE, timeout=10.0, retry=Retry(delays=(0.2,)))
async def handle(msg: Message) -> None:
    if msg.body == b"fail":
        raise ValueError("failing on purpose")
