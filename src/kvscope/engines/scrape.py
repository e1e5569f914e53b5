"""Fetch a Prometheus /metrics page and parse it with prometheus_client's text parser into a `Snapshot`.

A `Snapshot` answers "the value of this gauge / counter / histogram", summed (or averaged, for ratios) over the label
sets an engine exposes: one per data-parallel engine in vLLM, one per scheduler rank in SGLang.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from kvscope.engines.metric_names import SKIP_LABELS
from kvscope.errors import usage

USER_AGENT = "kvscope-watch"
MAX_BYTES = 32 * 1024**2  # a /metrics page of a busy engine is well under 1 MiB


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts by upper bound (the last bound is +Inf), with the sum and count of observations."""

    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float

    def minus(self, older: Histogram | None) -> Histogram:
        """Observations made since `older` (a reset, when counts went down, keeps the newer counts)."""
        if older is None or older.count > self.count or len(older.buckets) != len(self.buckets):
            return self
        buckets = tuple((le, c - o) for (le, c), (_, o) in zip(self.buckets, older.buckets))
        return Histogram(buckets, self.sum - older.sum, self.count - older.count)

    def quantile(self, q: float) -> float | None:
        """The q-quantile by linear interpolation inside the bucket that holds it, as PromQL's histogram_quantile."""
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank:
                if le == float("inf"):
                    return lower_bound  # beyond the largest finite bound: its value is all that can be said
                if c == lower_count:
                    return le
                return lower_bound + (le - lower_bound) * (rank - lower_count) / (c - lower_count)
            lower_bound, lower_count = le, c
        return lower_bound

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None


@dataclass
class Snapshot:
    """The samples of one scrape by sample name, each a list of (labels, value); `at` is a monotonic time."""

    samples: dict[str, list[tuple[dict[str, str], float]]]
    types: dict[str, str]
    at: float = field(default_factory=time.monotonic)

    @property
    def families(self) -> set[str]:
        return set(self.types)

    def _series(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Samples of `name` less those that would count a quantity twice (SKIP_LABELS)."""
        return [(labels, value) for labels, value in self.samples.get(name, [])
                if not any(k in labels and skip(labels[k]) for k, skip in SKIP_LABELS.items())]

    def _values(self, name: str) -> list[float]:
        return [value for _, value in self._series(name)]

    def first(self, names: Iterable[str]) -> str | None:
        return next((n for n in names if n in self.types), None)

    def gauge(self, names: Iterable[str], *, mean: bool = False) -> float | None:
        """The first present gauge in `names`, summed over label sets (or averaged, for ratios)."""
        name = self.first(names)
        if name is None:
            return None
        values = self._values(name)
        if not values:
            return None
        return sum(values) / len(values) if mean else sum(values)

    def counter(self, names: Iterable[str]) -> float | None:
        """Sum of every present counter in `names` (kvscope's swaps and drops add up), over label sets."""
        found = [n for n in names if n in self.types]
        if not found:
            return None
        return sum(sum(self._values(n + "_total") or self._values(n)) for n in found)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """A counter's value per value of one label, summed over the other labels."""
        out: dict[str, float] = {}
        for labels, value in self.samples.get(name + "_total", []) or self.samples.get(name, []):
            key = labels.get(label, "")
            out[key] = out.get(key, 0.0) + value
        return out

    def histogram(self, names: Iterable[str]) -> Histogram | None:
        """The first present histogram in `names`, its buckets summed over label sets."""
        name = self.first(names)
        if name is None:
            return None
        buckets: dict[float, float] = {}
        for labels, value in self._series(name + "_bucket"):
            le = float(labels.get("le", "inf"))
            buckets[le] = buckets.get(le, 0.0) + value
        if not buckets:
            return None
        return Histogram(tuple(sorted(buckets.items())), sum(self._values(name + "_sum")),
                         sum(self._values(name + "_count")))

    def info_labels(self, names: Iterable[str]) -> list[dict[str, str]]:
        """Labels of every series of an info-style gauge (vLLM's cache_config_info: one per data-parallel engine)."""
        name = self.first(names)
        return [dict(labels) for labels, _ in self.samples.get(name, [])] if name else []


def parse(text: str, *, source: str = "the response") -> Snapshot:
    """Parse Prometheus text exposition; malformed text is a `UsageError` naming the source."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    types: dict[str, str] = {}
    try:
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise usage(f"{source} is not valid Prometheus text ({type(exc).__name__}: {exc})",
                    expected="the /metrics page of a vLLM, SGLang or kvscope server", fix="the URL argument") from None
    if not types:
        raise usage(f"{source} holds no Prometheus metrics",
                    expected="the /metrics page of a vLLM, SGLang or kvscope server", fix="the URL argument")
    return Snapshot(samples, types)


def normalize_url(url: str) -> str:
    """Add http:// to host:port and /metrics to a bare host; refuse anything but http(s)."""
    raw = url.strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise usage(f"{url!r} is not an http(s) URL", expected="a URL such as http://127.0.0.1:8000/metrics",
                    fix="the URL argument")
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def fetch(url: str, *, timeout: float = 5.0) -> str:
    """GET the page as text; every network failure is a `UsageError` that names the URL and the reason."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "text/plain"})
    expected = "a running vLLM, SGLang or kvscope server that serves Prometheus metrics at this URL"
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only, checked above
            body = response.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise usage(f"{url} answered HTTP {exc.code} {exc.reason}", expected=expected, fix="the URL argument") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise usage(f"cannot reach {url}: {reason}", expected=expected, fix="the URL argument") from None
    if len(body) > MAX_BYTES:
        raise usage(f"{url} returned more than {MAX_BYTES // 1024**2} MiB", expected=expected, fix="the URL argument")
    return body.decode("utf-8", errors="replace")


def scrape(url: str, *, timeout: float = 5.0) -> Snapshot:
    return parse(fetch(url, timeout=timeout), source=f"the page at {url}")
