"""A spot instance's interruption notice, watched for by its worker.

Owns ``watch_interruption``: on a spot instance, a thread of the worker reads the instance
metadata's interruption notice every SPOT_POLL_SECONDS and, on the first one, tells the worker,
which then leaves as on a ``shutdown`` control message (remoteworker.py): it takes no new
bundle, hands the bundles it holds back to the request queue (another worker runs them), kills
their tasks and retires, well within the notice's two minutes, so no task runs past the instance.

AWS behaviour relied on (IMDSv2, workerinstance.metadata_item):
  - ``meta-data/instance-life-cycle`` is ``spot`` on a spot instance (``on-demand`` otherwise);
  - ``meta-data/spot/instance-action`` answers 404 until EC2 decides to reclaim the instance, then
    ``{"action": "terminate"|"stop"|"hibernate", "time": "...Z"}``, two minutes before it acts;
    AWS advises reading it every 5 seconds.  The worker needs no AWS permission for either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cloudkon.repeats import Outage
from cloudkon.workerinstance import metadata_item

log = logging.getLogger("cloudkon.worker")

# How often the notice is read: a notice comes two minutes ahead, leaving takes a few seconds.
SPOT_POLL_SECONDS = 5.0
# Pauses before reading again while the metadata service does not answer.
_FAILURE_PAUSES = (SPOT_POLL_SECONDS, 60.0)


def watch_interruption(on_notice: Callable[[str], None], stop: threading.Event,
                       poll_seconds: float = SPOT_POLL_SECONDS) -> None:
    """On a spot instance, read the interruption notice every ``poll_seconds`` until ``stop``; on the
    first, call ``on_notice`` with why the worker leaves, and return (run in a thread)."""
    try:
        if metadata_item("meta-data/instance-life-cycle") != "spot":
            return  # on demand: nothing to watch
    except OSError as exc:
        log.warning("cannot tell whether this instance is spot (%s): no interruption notice watched", exc)
        return
    log.info("spot instance: reading its interruption notice every %g s", poll_seconds)
    outage = Outage("reading the spot interruption notice", _FAILURE_PAUSES, log)
    pause = 0.0
    while not stop.wait(pause):
        try:
            notice = metadata_item("meta-data/spot/instance-action")
        except OSError as exc:
            pause = outage.failed(exc)
            continue
        outage.ended()
        if notice is not None:
            on_notice(f"spot interruption notice ({notice.strip()}): stopping now; the bundles held "
                      "go back to the queue")
            return
        pause = poll_seconds
