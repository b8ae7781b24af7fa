"""Rollout analysis: is a candidate revision as good as its baseline over the same window?

One service for every strategy that compares two revisions (canary now, shadow next). The
core, ``analyse``, is pure: two ``Window``s (baseline, candidate) and thresholds in, a
verdict with each check's figures out, testable without a server. ``window_from`` builds a
window from the router's per-group counters (delta over the window) and the prediction log.

Checks (defaults in ``DEFAULTS``, each overridable per deployment in the strategy's
``"analysis": {...}``):

- ``error_rate``: candidate ≤ baseline + ``max_error_rate_increase`` (0.01 = 1 pp)
- ``latency_p95`` / ``latency_p99``: candidate ≤ ``latency_factor`` × baseline +
  ``latency_slack_ms`` (1.5×, 5 ms)
- ``prediction_psi``: population stability index of the predicted labels (≤ 20 distinct
  values) or of the numeric predictions over the baseline's deciles ≤ ``max_psi`` (0.2)
- ``accuracy``: where labels arrived for ≥ ``min_labels`` predictions of each, the upper 95 %
  bound of (candidate − baseline) accuracy must not be below −``max_accuracy_drop``; with
  fewer labels this check is ``skipped`` (labels arrive late; it neither passes nor blocks)

Each check needs ``min_samples`` requests (or predictions) of each variant, else it is
``inconclusive``. No data never passes: a missing or non-finite figure is inconclusive, and
the decision is ``pass`` only when every required check passes. ``fail`` when any fails.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from serving.routing import LATENCY_BOUNDS_MS, percentile

DEFAULTS: dict[str, float] = {
    "min_samples": 100,
    "max_error_rate_increase": 0.01,
    "latency_factor": 1.5,
    "latency_slack_ms": 5.0,
    "max_psi": 0.2,
    "min_labels": 30,
    "max_accuracy_drop": 0.0,
}
PASS, FAIL, INCONCLUSIVE, SKIPPED = "pass", "fail", "inconclusive", "skipped"
PSI_EPSILON = 1e-4
MAX_CATEGORIES = 20


@dataclass
class Window:
    """What one variant did in the analysis window."""

    requests: int = 0
    errors: int = 0
    latency_buckets: list[int] = field(default_factory=list)  # router histogram counts
    # One output per predicted row; None: not comparable (both variants serve the same
    # model version, so the prediction log cannot tell them apart): the check is skipped.
    predictions: list[Any] | None = field(default_factory=list)
    labeled: int = 0  # predictions whose label arrived
    correct: int = 0  # ... and were right


@dataclass
class Check:
    name: str
    value: float | None
    threshold: float | None
    verdict: str
    detail: str = ""

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "value": _round(self.value),
            "threshold": _round(self.threshold),
            "verdict": self.verdict,
            "detail": self.detail,
        }


@dataclass
class Verdict:
    decision: str  # pass | fail | inconclusive
    checks: list[Check]

    @property
    def reason(self) -> str:
        bad = (
            [c for c in self.checks if c.verdict == self.decision] if self.decision != PASS else []
        )
        if not bad:
            return "every check passed"
        return "; ".join(f"{c.name} {c.verdict}: {c.detail}" for c in bad)

    def as_dict(self) -> dict:
        return {
            "decision": self.decision,
            "reason": self.reason,
            "checks": [c.as_dict() for c in self.checks],
        }


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 6)


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def thresholds(overrides: dict | None) -> dict[str, float]:
    """DEFAULTS with a deployment's overrides (validated by ``validate_thresholds``)."""
    return {**DEFAULTS, **(overrides or {})}


def validate_thresholds(overrides: Any) -> dict[str, float]:
    """The ``analysis`` object of a strategy: known keys, non-negative finite numbers.
    Raises ValueError with a message for the API."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ValueError("analysis must be an object")
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown analysis setting(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(DEFAULTS)}"
        )
    out = {}
    for key, value in overrides.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"analysis.{key} must be a number")
        if value < 0:
            raise ValueError(f"analysis.{key} must not be negative")
        out[key] = value
    if "min_samples" in out and out["min_samples"] < 1:
        raise ValueError("analysis.min_samples must be at least 1")
    return out


def _error_rate(b: Window, c: Window, t: dict) -> Check:
    n = t["min_samples"]
    if b.requests < n or c.requests < n:
        return Check("error_rate", None, None, INCONCLUSIVE,
                     f"{c.requests}/{b.requests} requests (candidate/baseline), need {n:g} each")  # fmt: skip
    rb, rc = b.errors / b.requests, c.errors / c.requests
    limit = rb + t["max_error_rate_increase"]
    ok = rc <= limit + 1e-12
    return Check("error_rate", rc, limit, PASS if ok else FAIL,
                 f"candidate {rc:.2%} vs baseline {rb:.2%} (limit {limit:.2%})")  # fmt: skip


def _latency(name: str, q: float, b: Window, c: Window, t: dict) -> Check:
    n = t["min_samples"]
    nb, nc = sum(b.latency_buckets), sum(c.latency_buckets)
    if nb < n or nc < n:
        return Check(name, None, None, INCONCLUSIVE,
                     f"{nc}/{nb} timed requests (candidate/baseline), need {n:g} each")  # fmt: skip
    pb, pc = percentile(b.latency_buckets, q), percentile(c.latency_buckets, q)
    if not _finite(pb, pc):
        return Check(name, None, None, INCONCLUSIVE, "no latency figure")
    limit = t["latency_factor"] * pb + t["latency_slack_ms"]
    ok = pc <= limit
    return Check(name, pc, limit, PASS if ok else FAIL,
                 f"candidate {pc:.1f} ms vs baseline {pb:.1f} ms (limit {limit:.1f} ms)")  # fmt: skip


def _flatten(outputs: Iterable[Any]) -> list[Any]:
    """One value per row: a 2-D row (probabilities) becomes its argmax, an object its
    first field; scalars stay."""
    out = []
    for value in outputs:
        if isinstance(value, list):
            if value and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                value = max(range(len(value)), key=value.__getitem__)
            else:
                continue
        elif isinstance(value, dict):
            if not value:
                continue
            value = next(iter(value.values()))
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out.append(value)
    return out


def _psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, PSI_EPSILON), max(a, PSI_EPSILON)
        total += (a - e) * math.log(a / e)
    return total


def psi_of(baseline: Sequence[Any], candidate: Sequence[Any]) -> tuple[float, str]:
    """PSI between two prediction samples: of labels when they are categorical (or few
    distinct numbers), else of numbers over the baseline's deciles."""
    values = set(baseline) | set(candidate)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numeric or len(values) <= MAX_CATEGORIES:
        keys = sorted(values, key=repr)
        cb, cc = Counter(baseline), Counter(candidate)
        return (
            _psi([cb[k] / len(baseline) for k in keys], [cc[k] / len(candidate) for k in keys]),
            "labels",
        )
    ordered = sorted(baseline)
    edges = sorted(
        {ordered[min(len(ordered) - 1, int(len(ordered) * i / 10))] for i in range(1, 10)}
    )

    def shares(sample: Sequence[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for v in sample:
            lo, hi = 0, len(edges)
            while lo < hi:
                mid = (lo + hi) // 2
                if v <= edges[mid]:
                    hi = mid
                else:
                    lo = mid + 1
            counts[lo] += 1
        return [n / len(sample) for n in counts]

    return _psi(shares(baseline), shares(candidate)), "deciles"


def _divergence(b: Window, c: Window, t: dict) -> Check:
    n = t["min_samples"]
    if b.predictions is None or c.predictions is None:
        return Check("prediction_psi", None, t["max_psi"], SKIPPED,
                     "both variants serve the same model version")  # fmt: skip
    pb, pc = _flatten(b.predictions), _flatten(c.predictions)
    if len(pb) < n or len(pc) < n:
        return Check("prediction_psi", None, None, INCONCLUSIVE,
                     f"{len(pc)}/{len(pb)} predictions (candidate/baseline), need {n:g} each")  # fmt: skip
    value, kind = psi_of(pb, pc)
    if not _finite(value):
        return Check("prediction_psi", None, None, INCONCLUSIVE, "PSI is not a number")
    ok = value <= t["max_psi"]
    return Check("prediction_psi", value, t["max_psi"], PASS if ok else FAIL,
                 f"PSI of {kind} {value:.3f} (limit {t['max_psi']:g})")  # fmt: skip


def _accuracy(b: Window, c: Window, t: dict) -> Check:
    n = t["min_labels"]
    if b.labeled < n or c.labeled < n:
        return Check("accuracy", None, None, SKIPPED,
                     f"{c.labeled}/{b.labeled} labels (candidate/baseline), need {n:g} each")  # fmt: skip
    ab, ac = b.correct / b.labeled, c.correct / c.labeled
    se = math.sqrt(ab * (1 - ab) / b.labeled + ac * (1 - ac) / c.labeled)
    upper = (ac - ab) + 1.96 * se
    limit = -t["max_accuracy_drop"]
    ok = upper >= limit
    return Check("accuracy", ac - ab, limit, PASS if ok else FAIL,
                 f"candidate {ac:.1%} vs baseline {ab:.1%}, difference ≤ {upper:+.1%} at 95 %")  # fmt: skip


def analyse(baseline: Window, candidate: Window, overrides: dict | None = None) -> Verdict:
    """Compare two windows. ``fail`` if any check fails; ``pass`` only if every required
    check passes (accuracy may be skipped); otherwise ``inconclusive``."""
    t = thresholds(overrides)
    checks = [
        _error_rate(baseline, candidate, t),
        _latency("latency_p95", 0.95, baseline, candidate, t),
        _latency("latency_p99", 0.99, baseline, candidate, t),
        _divergence(baseline, candidate, t),
        _accuracy(baseline, candidate, t),
    ]
    verdicts = {c.verdict for c in checks}
    if FAIL in verdicts:
        decision = FAIL
    elif all(c.verdict in (PASS, SKIPPED) for c in checks):
        decision = PASS
    else:
        decision = INCONCLUSIVE
    return Verdict(decision, checks)


# --- windows from the router's counters and the prediction log --------------------------


def counters_delta(now: dict | None, start: dict | None) -> dict:
    """The router's counters of one group over the window. A router restarted inside the
    window counts from zero again: then its whole count is the window's."""
    now = now or {}
    start = start or {}
    buckets_now = list(now.get("latency_buckets") or [])
    buckets_start = list(start.get("latency_buckets") or [0] * len(buckets_now))
    requests = int(now.get("requests", 0)) - int(start.get("requests", 0))
    restarted = (
        requests < 0
        or len(buckets_start) != len(buckets_now)
        or any(a < b for a, b in zip(buckets_now, buckets_start, strict=False))
    )
    if restarted:
        return {
            "requests": int(now.get("requests", 0)),
            "errors": int(now.get("errors", 0)),
            "latency_buckets": buckets_now,
        }
    return {
        "requests": requests,
        "errors": int(now.get("errors", 0)) - int(start.get("errors", 0)),
        "latency_buckets": [a - b for a, b in zip(buckets_now, buckets_start, strict=True)],
    }


def window_from(
    counters: dict, predictions: list[Any], labeled: int = 0, correct: int = 0
) -> Window:
    if (
        counters.get("latency_buckets")
        and len(counters["latency_buckets"]) != len(LATENCY_BOUNDS_MS) + 1
    ):
        counters = {**counters, "latency_buckets": []}  # another router build: no latency figure
    return Window(
        requests=int(counters.get("requests", 0)),
        errors=int(counters.get("errors", 0)),
        latency_buckets=list(counters.get("latency_buckets") or []),
        predictions=predictions,
        labeled=labeled,
        correct=correct,
    )
