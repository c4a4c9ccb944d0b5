"""``bulwark stats``: the processes' Prometheus metrics, read for a terminal.

It scrapes the same ``/metrics`` endpoints Prometheus does (bulwark/metrics.py;
where from the settings), with prometheus_client's own parser, and prints one
table per process: counters and gauges as they are, histograms as their count,
mean and estimated quantiles (interpolated in the buckets, as PromQL's
``histogram_quantile`` does). ``--json`` gives the same, parsed, for scripts.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from bulwark.settings import METRICS_PORTS, Settings

TIMEOUT_SECONDS = 3.0
#: The process's own metrics (CPU, memory, files, GC): shown with --all only.
PROCESS_PREFIXES = ("process_", "python_")


@dataclass
class Series:
    """One counter or gauge sample, or one histogram (its buckets gathered)."""

    name: str
    kind: str
    labels: dict[str, str]
    value: float | None = None
    count: float | None = None
    sum: float | None = None
    #: (upper bound, cumulative count), ascending, +Inf last.
    buckets: list[tuple[float, float]] = field(default_factory=list)

    def quantile(self, q: float) -> float | None:
        return quantile(self.buckets, q)

    def as_json(self) -> dict:
        if self.kind == "histogram":
            return {"name": self.name, "type": self.kind, "labels": self.labels, "count": self.count,
                    "sum": self.sum, "p50": self.quantile(0.5), "p95": self.quantile(0.95),
                    "buckets": {_bound(le): n for le, n in self.buckets}}
        return {"name": self.name, "type": self.kind, "labels": self.labels, "value": self.value}


@dataclass
class Scrape:
    component: str
    url: str
    series: list[Series] | None = None
    error: str | None = None

    @property
    def up(self) -> bool:
        return self.series is not None

    def as_json(self, include_process: bool = False) -> dict:
        return {"component": self.component, "url": self.url, "up": self.up, "error": self.error,
                "metrics": [s.as_json() for s in self.series or () if include_process or _ours(s)]}


def endpoints(settings: Settings, components: list[str] | None = None) -> dict[str, str]:
    """component -> its /metrics URL, for the components with a port (all, or those named)."""
    host = settings.metrics_host
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: ask over loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    found = {}
    processes = {"ingest": settings.ingest_processes, "streams": settings.streams_workers}
    for component in components or list(METRICS_PORTS):
        for instance in range(processes.get(component, 1)):
            port = settings.metrics_port(component, instance)
            if port:
                # Named as bulwark up names its processes: ingest, ingest-2, ...
                found[component if instance == 0 else f"{component}-{instance + 1}"] = f"http://{host}:{port}/metrics"
    return found


def parse(text: str) -> list[Series]:
    """The series of one exposition, histograms gathered into one series per label set."""
    out: list[Series] = []
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            gathered: dict[tuple, Series] = {}
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "le"}
                series = gathered.setdefault(tuple(sorted(labels.items())),
                                             Series(family.name, "histogram", labels))
                if sample.name.endswith("_bucket"):
                    series.buckets.append((float(sample.labels["le"]), sample.value))
                elif sample.name.endswith("_count"):
                    series.count = sample.value
                elif sample.name.endswith("_sum"):
                    series.sum = sample.value
            for series in gathered.values():
                series.buckets.sort()
            out.extend(gathered.values())
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out.append(Series(sample.name, family.type, dict(sample.labels), value=sample.value))
    return out


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a histogram's cumulative buckets, interpolated linearly within
    the bucket it falls in (PromQL's histogram_quantile); None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):  # beyond the last finite bucket: its bound is all that is known
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def scrape(component: str, url: str, timeout: float = TIMEOUT_SECONDS) -> Scrape:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except (OSError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return Scrape(component, url, error=f"not reachable ({reason})")
    try:
        return Scrape(component, url, parse(text))
    except ValueError as exc:
        return Scrape(component, url, error=f"not a Prometheus exposition ({exc})")


def scrape_all(targets: dict[str, str], timeout: float = TIMEOUT_SECONDS) -> list[Scrape]:
    """Every target at once (a process that does not answer costs the timeout once, not per process)."""
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        return list(pool.map(lambda item: scrape(*item, timeout=timeout), targets.items()))


def _ours(series: Series) -> bool:
    return not series.name.startswith(PROCESS_PREFIXES)


def _bound(le: float) -> str:
    return "+Inf" if math.isinf(le) else f"{le:g}"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else f"{value:.6g}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _value(series: Series) -> str:
    if series.kind != "histogram":
        return _number(series.value)
    count = series.count or 0
    if not count:
        return "0 observed"
    mean = (series.sum or 0) / count
    unit = _seconds if series.name.endswith("_seconds") else (lambda v: "-" if v is None else f"{v:.6g}")
    return (f"{_number(count)} observed, mean {unit(mean)}, p50 {unit(series.quantile(0.5))}, "
            f"p95 {unit(series.quantile(0.95))}")


def render(scrapes: list[Scrape], include_process: bool = False) -> str:
    """One table per process: metric, labels, value."""
    blocks = []
    for result in scrapes:
        head = f"{result.component}  {result.url}"
        if not result.up:
            blocks.append(f"{head}  {result.error}")
            continue
        rows = [(s.name, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())), _value(s))
                for s in result.series if include_process or _ours(s)]
        rows.sort(key=lambda r: (r[0], r[1]))
        if not rows:
            blocks.append(f"{head}\n  (no metrics)")
            continue
        name_width = max(len(r[0]) for r in rows)
        label_width = max(len(r[1]) for r in rows)
        lines = [head] + [f"  {n:<{name_width}}  {lb:<{label_width}}  {v}" for n, lb, v in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
