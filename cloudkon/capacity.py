"""Where a fleet asks EC2 for capacity: the market, instance type and subnet of each launch, and
the backoff of refusals.

Owns ``LaunchPlan``: a launch of N instances is split between the spot and on-demand markets so
that, over the fleet's launches, about ``spot_ratio`` of the instances launched are spot; each
market's share then tries the (instance type, subnet) pairs in the order the options list them
(every subnet of the first type, then of the next: the types are the user's preference), until
the share is launched.  A pair EC2 refuses is logged once and left alone for a pause that doubles
while it keeps being refused (CAPACITY_BACKOFF_SECONDS, capped, jittered: repeats.Outage), its
end logged once too.  When every pair of a market is refused, that is logged once, and the share
waits for the next scaling round after a pause ends: the fleet never crash-loops on a refusal.
A spot share is never launched on demand instead (it would cost what spot saves): with
--spot-ratio below 1, the on-demand share goes on meanwhile.

AWS behaviour relied on:
  - RunInstances with MinCount 1 launches as many as EC2 can grant, up to MaxCount, and refuses
    with InsufficientInstanceCapacity (HTTP 500, yet lasting minutes), InstanceLimitExceeded,
    VcpuLimitExceeded, Unsupported (the type is not offered in the subnet's zone),
    InsufficientFreeAddressesInSubnet, MaxSpotInstanceCountExceeded, SpotMaxPriceTooLow...
    (aws.aws_errors makes them errors.CapacityRefused).  Such a launch is tried once, not
    retried by boto (a refusal answered with a 500 would be retried for half a minute).
  - InstanceMarketOptions MarketType "spot", one-time, "terminate" on interruption, with no
    maximum price, launches spot instances billed at most at the on-demand price; an
    interrupted instance gets a two-minute notice in its metadata (spotwatch.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cloudkon import aws
from cloudkon.errors import CapacityRefused
from cloudkon.repeats import Outage

log = logging.getLogger("cloudkon.fleet")

# The pause before a refused (market, type, subnet) is asked again: doubled at each refusal in a
# row, from the first to the second figure.  EC2's capacity in a zone comes back in minutes.
CAPACITY_BACKOFF_SECONDS = (30.0, 600.0)

SPOT, ON_DEMAND = "spot", "on-demand"
_SPOT_OPTIONS = {"MarketType": "spot",
                 "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}

Choice = tuple[str, str, str | None]  # (market, instance type, subnet or None: the default VPC's)


class LaunchPlan:
    """The markets, instance types and subnets a fleet launches in, and what EC2 refused lately."""

    def __init__(self, instance_types: list[str], subnets: list[str], spot_ratio: float,
                 backoff: tuple[float, float] = CAPACITY_BACKOFF_SECONDS, ec2: Any = None) -> None:
        """``ec2``: the client to launch with (default: one of its own, made at the first launch)."""
        if not instance_types:
            raise ValueError("a launch plan needs at least one instance type")
        self.pairs: list[tuple[str, str | None]] = [
            (kind, subnet) for kind in instance_types for subnet in (subnets or [None])]
        self.spot_ratio = spot_ratio
        self._backoff = backoff
        self._refusals: dict[Choice, Outage] = {}
        self._refused: dict[Choice, tuple[float, CapacityRefused]] = {}  # until when, and why
        self._markets = {market: Outage(f"launching {market} workers (every instance type and subnet "
                                        "refused)", backoff, log) for market in (SPOT, ON_DEMAND)}
        self.launched = {SPOT: 0, ON_DEMAND: 0}
        self._ec2 = ec2

    def split(self, count: int) -> list[tuple[str, int]]:
        """``count`` instances as (market, how many): the spot share keeps the launched ones' ratio."""
        total = sum(self.launched.values()) + count
        spot = min(count, max(0, round(total * self.spot_ratio) - self.launched[SPOT]))
        return [(market, n) for market, n in ((SPOT, spot), (ON_DEMAND, count - spot)) if n]

    def launch(self, count: int, request: dict[str, Any]) -> list[dict[str, Any]]:
        """Launch up to ``count`` instances with RunInstances ``request`` (all but type, subnet,
        market and counts); the instances launched: fewer, or none, when capacity is refused."""
        instances: list[dict[str, Any]] = []
        for market, share in self.split(count):
            launched = self._launch_share(market, share, request)
            self.launched[market] += len(launched)
            instances += launched
        return instances

    def _launch_share(self, market: str, count: int, request: dict[str, Any]) -> list[dict[str, Any]]:
        instances: list[dict[str, Any]] = []
        refused: CapacityRefused | None = None  # the last refusal met, now or still waited out
        for kind, subnet in self.pairs:
            choice = (market, kind, subnet)
            until, last = self._refused.get(choice, (0.0, None))
            if len(instances) >= count:
                break
            if time.monotonic() < until:
                refused = last
                continue
            try:
                instances += self._run(choice, count - len(instances), request)
            except CapacityRefused as exc:
                refused = exc
                self._refused[choice] = (time.monotonic() + self._refusal(choice).failed(exc), exc)
                continue
            self._refused.pop(choice, None)
            self._refusal(choice).ended()
        if instances:
            self._markets[market].ended()
        elif refused is not None:
            self._markets[market].failed(refused)
        return instances

    def _refusal(self, choice: Choice) -> Outage:
        if choice not in self._refusals:
            market, kind, subnet = choice
            self._refusals[choice] = Outage(f"launching {market} {kind} in {subnet or 'the default subnet'}",
                                            self._backoff, log, expected=(CapacityRefused,))
        return self._refusals[choice]

    def _run(self, choice: Choice, count: int, request: dict[str, Any]) -> list[dict[str, Any]]:
        market, kind, subnet = choice
        attempt = {**request, "InstanceType": kind, "MinCount": 1, "MaxCount": count}
        if subnet:
            attempt["SubnetId"] = subnet
        if market == SPOT:
            attempt["InstanceMarketOptions"] = _SPOT_OPTIONS
        if self._ec2 is None:  # one try per launch: a refusal is this plan's to retry, not boto's
            self._ec2 = aws.client("ec2", attempts=1)
        with aws.aws_errors(f"launching {market} {kind} instances"):
            return self._ec2.run_instances(**attempt)["Instances"]
