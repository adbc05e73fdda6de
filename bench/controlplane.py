"""The control plane's requests a minute at 10, 100 and 1,000 workers, counted from the code.

    python bench/controlplane.py

Each figure is the calls the code makes (provisioning: heartbeats, the registry scan, the keep time
told; sqsbackend: the slot count; control: the workers' control polls, subscription checks and the
drain/shutdown broadcast) times how often it makes them (the defaults' constants, imported).  Every
line grows with the workers at most linearly: none is a call per pair of workers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cloudkon import aws  # noqa: E402
from cloudkon.control import SUBSCRIPTION_CHECK_SECONDS  # noqa: E402
from cloudkon.defaults import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_SCALE_INTERVAL  # noqa: E402
from cloudkon.sqsbackend import SLOTS_REFRESH_SECONDS  # noqa: E402

# DescribeInstances returns at most 1,000 instances a page; a registry item (~150 bytes) fits ~6,000
# times in a Query page of 1 MB.
DESCRIBE_PAGE, QUERY_PAGE_ITEMS = 1000, 6000


def control_plane(workers: int) -> dict[str, float]:
    """Requests a minute of the control plane at ``workers`` instances, counted from the code's
    calls and constants (provisioning, control, sqsbackend): what grows with the fleet."""
    per_minute = 60.0
    scans = per_minute / DEFAULT_SCALE_INTERVAL
    return {
        "heartbeats (UpdateItem)": workers * per_minute / DEFAULT_HEARTBEAT_SECONDS,
        "registry scan (DescribeInstances, Query)": scans * (math.ceil(workers / DESCRIBE_PAGE)
                                                             + math.ceil(workers / QUERY_PAGE_ITEMS)),
        "slot count (ListSubscriptionsByTopic, BatchGetItem)":
            per_minute / SLOTS_REFRESH_SECONDS * 2 * math.ceil(workers / 100),
        "workers' control polls and subscription checks":
            workers * per_minute * (1 / aws.SQS_MAX_WAIT_SECONDS + 1 / SUBSCRIPTION_CHECK_SECONDS),
        "keep time told (UpdateItem, once per burst at most)": workers,
        "drain/shutdown broadcast (once)": drain_requests(workers),
    }


def drain_requests(workers: int) -> int:
    """ControlTopic.stop_workers and the workers' side: prune (subscription pages + a GetQueueUrl
    each), registered (ListQueues pages + GetQueueAttributes each), subscription pages, one Publish,
    one ListQueues round (a second) while waiting (one counted here); each worker: DeleteMessage,
    DeleteQueue, Unsubscribe."""
    subscription_pages, queue_pages = math.ceil(workers / 100), math.ceil(workers / 1000)
    return (subscription_pages + workers) + (queue_pages + workers) + subscription_pages + 1 + queue_pages \
        + 3 * workers


def control_table() -> str:
    sizes = (10, 100, 1000)
    table = {size: control_plane(size) for size in sizes}
    lines = ["| requests a minute | " + " | ".join(f"{size:,} workers" for size in sizes) + " |",
             "| --- |" + " ---: |" * len(sizes)]
    for name in table[sizes[0]]:
        lines.append(f"| {name} | " + " | ".join(f"{table[size][name]:,.0f}" for size in sizes) + " |")
    per_worker = [sum(v for k, v in table[size].items() if "once" not in k) / size for size in sizes]
    lines.append("| steady total per worker | " + " | ".join(f"{v:.1f}" for v in per_worker) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(control_table())
