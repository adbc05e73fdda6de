"""The Celery app bench/peers.py runs: one task that sleeps, broker and backend from the environment."""

from __future__ import annotations

import os
import time

from celery import Celery

# Celery's defaults throughout (prefetch multiplier 4, early acknowledgement), as a user gets them.
app = Celery("cloudkon_bench", broker=os.environ["CELERY_BENCH_BROKER"],
             backend=os.environ["CELERY_BENCH_BACKEND"])


@app.task(name="sleep_ms")
def sleep_task(ms: int) -> None:
    time.sleep(ms / 1000)
