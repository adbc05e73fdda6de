"""Prometheus metrics: counters, gauges and histograms, and their text exposition format 0.0.4.

Owns the metric types the scheduler keeps (telemetry.py says which) and how they are written
for a scrape, by hand: local mode needs nothing beyond Python.  Each family is written as
``# HELP`` (backslash and newline escaped), ``# TYPE``, then one line per sample with its
labels (backslash, double quote and newline escaped in values).  A histogram's buckets are
cumulative, ``le="+Inf"`` equal to its ``_count``.

Counters and histograms are changed by one thread each (the event loop, the journal's thread)
and read by a scrape on another: what a scrape copies (a list, a dict) is copied whole under the
GIL, so a family is never written half-changed, and a histogram's buckets and count always agree.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Label values, by the labels' names in order: one sample each.
Samples = dict[tuple[str, ...], float]


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(int(value)) if value == int(value) and abs(value) < 2 ** 53 else repr(float(value))


def sample_line(name: str, labels: Sequence[tuple[str, str]], value: float) -> str:
    if not labels:
        return f"{name} {format_value(value)}"
    pairs = ",".join(f'{label}="{escape_label_value(text)}"' for label, text in labels)
    return f"{name}{{{pairs}}} {format_value(value)}"


def family_head(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {kind}"]


def family_lines(family: Counter | Gauge, samples: Samples) -> list[str]:
    """A counter's or gauge's lines: its head, then a sample a combination of label values."""
    return family_head(family.name, family.kind, family.help_text) + [
        sample_line(family.name, list(zip(family.labels, key, strict=True)), value)
        for key, value in sorted(samples.items())]


class Counter:
    """A number that only grows, one per combination of label values."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help_text, self.labels = name, help_text, tuple(labels)
        self._values: Samples = {}

    def inc(self, amount: float = 1, values: tuple[str, ...] = ()) -> None:
        self._values[values] = self._values.get(values, 0) + amount

    def total(self) -> float:
        """Every sample's value, added up."""
        return sum(dict(self._values).values())

    def lines(self) -> list[str]:
        return family_lines(self, dict(self._values))


class Gauge:
    """A figure read when scraped: ``read()`` gives its samples by label values (a number alone
    when it has no labels)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], Samples | float],
                 labels: Sequence[str] = ()) -> None:
        self.name, self.help_text, self.labels, self._read = name, help_text, tuple(labels), read

    def lines(self) -> list[str]:
        values = self._read()
        return family_lines(self, values if isinstance(values, dict) else {(): values})


class ScrapedCounter(Gauge):
    """A counter whose value is read when scraped: kept elsewhere (AWS requests, by aws.py), or
    worked out from what is (tasks submitted)."""

    kind = "counter"


class Histogram:
    """Observations counted in buckets (upper bounds ``buckets``, in the unit shown), with their
    sum.  Observations come in ``scale`` units per shown unit (1e6: microseconds shown as seconds)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], scale: float = 1.0) -> None:
        self.name, self.help_text, self.scale = name, help_text, scale
        self.buckets = tuple(buckets)
        self._bounds = [bound * scale for bound in self.buckets]
        self._counts = [0] * (len(self._bounds) + 1)  # per bucket, not cumulative; the last: over every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def observe_many(self, values: list[int] | list[float]) -> None:
        """Observe a batch: C-speed sorting and counting, no Python step per value (a batch of a
        thousand instant tasks, all in the first bucket, is one max())."""
        if not values:
            return
        counts, bounds = self._counts, self._bounds
        if max(values) <= bounds[0]:
            counts[0] += len(values)
        else:
            ordered = sorted(values)
            below = 0
            for index, bound in enumerate(bounds):
                upto = bisect_right(ordered, bound)
                counts[index] += upto - below
                below = upto
                if below == len(ordered):
                    break
            counts[-1] += len(ordered) - below
        self._sum += sum(values)

    def snapshot(self) -> tuple[list[int], float]:
        """Cumulative counts per bucket (the last: +Inf, the count) and the sum, in shown units."""
        counts, total = list(self._counts), self._sum
        return list(accumulate(counts)), total / self.scale

    def lines(self) -> list[str]:
        cumulative, total = self.snapshot()
        bounds = [format_value(bound) for bound in self.buckets] + ["+Inf"]
        return family_head(self.name, self.kind, self.help_text) + [
            *(sample_line(f"{self.name}_bucket", [("le", bound)], count)
              for bound, count in zip(bounds, cumulative, strict=True)),
            sample_line(f"{self.name}_sum", [], total),
            sample_line(f"{self.name}_count", [], cumulative[-1])]


Family = Counter | Gauge | Histogram


def exposition(families: Iterable[Family]) -> bytes:
    """The text a scrape reads: every family, in order, each line ending in a newline."""
    return "".join(line + "\n" for family in families for line in family.lines()).encode()
