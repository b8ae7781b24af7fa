"""Reads of shadow traffic: the report comparing the candidate's answers with the primary's
on the same requests, and ``shadow_window`` (the figures the rollout analysis consumes).

The comparison is pure functions over pairs, testable without a server:
- agreement per output: a label (string, boolean) agrees when identical, a number when the
  two differ by at most ``ATOL`` (the largest difference is reported per output); a request
  agrees when every output of every row does. Only pairs both sides answered with a 2xx and
  a JSON body are compared; no compared pair gives no rate (None), never 1.0.
- error rate of each side (no answer, or a 5xx);
- latency percentiles of each side (nearest rank);
- the router's counters: mirrors sent and dropped (queue full), candidate errors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db.models import Q

from .models import Deployment, ShadowPair, ShadowRun

ATOL = 1e-6
REPORT_PAIRS = 2000  # the report (page, API, polled) compares the latest pairs of a run
WINDOW_PAIRS = 20_000  # shadow_window (the analysis) reads at most this many of its window
MAX_VALUES = 10_000  # leaves compared per answer at most (a huge tensor is not walked whole)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(values: list[float]) -> dict:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "n": len(values),
    }


def outputs_of(body: str) -> dict[str, list] | None:
    """The outputs of one answer as {output name: list of values, one per row}; None when
    the body is not a JSON answer. Shapes: ``{"predictions": [...]}`` (rows of scalars,
    lists or {column: value}), OIP v2 ``{"outputs": [{"name", "data"}]}``, columnar
    ``{"predictions": {column: [...]}}``, a bare list."""
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("outputs"), list):
        out = {}
        for i, item in enumerate(data["outputs"]):
            if isinstance(item, dict):
                out[str(item.get("name", i))] = list(item.get("data") or [])
        return out
    if isinstance(data, dict) and "predictions" in data:
        data = data["predictions"]
    if isinstance(data, dict):
        return {str(k): v if isinstance(v, list) else [v] for k, v in data.items()}
    if not isinstance(data, list):
        return {"predictions": [data]}
    if data and all(isinstance(row, dict) for row in data):
        columns: dict[str, list] = {}
        for row in data:
            for key, value in row.items():
                columns.setdefault(str(key), []).append(value)
        return columns
    return {"predictions": data}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def compare_values(a: Any, b: Any, budget: list[int]) -> tuple[bool, float | None]:
    """(do they agree, the largest absolute difference between numbers in them)."""
    budget[0] -= 1
    if budget[0] < 0:
        return a == b, None
    if _number(a) and _number(b):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b), None
        diff = abs(float(a) - float(b))
        return diff <= ATOL, diff
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return False, None
        agree, worst = True, None
        for x, y in zip(a, b, strict=True):
            ok, diff = compare_values(x, y, budget)
            agree = agree and ok
            if diff is not None:
                worst = diff if worst is None else max(worst, diff)
        return agree, worst
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return False, None
        agree, worst = True, None
        for key in a:
            ok, diff = compare_values(a[key], b[key], budget)
            agree = agree and ok
            if diff is not None:
                worst = diff if worst is None else max(worst, diff)
        return agree, worst
    return a == b, None


def _is_error(status: int | None) -> bool:
    return status is None or status >= 500


def compare_pairs(pairs: Iterable[dict]) -> dict:
    """The report over pairs ``{"primary_status", "primary_ms", "primary_body",
    "candidate_status", "candidate_ms", "candidate_body"}``."""
    n = 0
    errors = {"primary": 0, "candidate": 0}
    latencies: dict[str, list[float]] = {"primary": [], "candidate": []}
    compared = agreeing = 0
    per_output: dict[str, dict] = {}
    for pair in pairs:
        n += 1
        for side in ("primary", "candidate"):
            status = pair.get(f"{side}_status")
            if _is_error(status):
                errors[side] += 1
            ms = pair.get(f"{side}_ms")
            if ms is not None and status is not None:
                latencies[side].append(float(ms))
        ps, cs = pair.get("primary_status"), pair.get("candidate_status")
        if not (ps is not None and cs is not None and 200 <= ps < 300 and 200 <= cs < 300):
            continue
        po, co = (
            outputs_of(pair.get("primary_body") or ""),
            outputs_of(pair.get("candidate_body") or ""),
        )
        if po is None or co is None:
            continue
        compared += 1
        agree_all = po.keys() == co.keys()
        budget = [MAX_VALUES]
        for name in sorted(po.keys() | co.keys()):
            stats = per_output.setdefault(
                name, {"compared": 0, "agreeing": 0, "max_abs_diff": None}
            )
            stats["compared"] += 1
            if name not in po or name not in co:
                agree_all = False
                continue
            ok, diff = compare_values(po[name], co[name], budget)
            if ok:
                stats["agreeing"] += 1
            else:
                agree_all = False
            if diff is not None:
                worst = stats["max_abs_diff"]
                stats["max_abs_diff"] = diff if worst is None else max(worst, diff)
        if agree_all:
            agreeing += 1
    for stats in per_output.values():
        stats["rate"] = stats["agreeing"] / stats["compared"] if stats["compared"] else None
    return {
        "pairs": n,
        "compared": compared,
        "agreeing": agreeing,
        "agreement": agreeing / compared if compared else None,
        "outputs": per_output,
        "primary": {
            "errors": errors["primary"],
            "error_rate": errors["primary"] / n if n else None,
            "latency_ms": latency_summary(latencies["primary"]),
        },
        "candidate": {
            "errors": errors["candidate"],
            "error_rate": errors["candidate"] / n if n else None,
            "latency_ms": latency_summary(latencies["candidate"]),
        },
    }


def mirror_counters(run: ShadowRun) -> dict:
    """The router's counters summed over its restarts."""
    total = {"offered": 0, "sent": 0, "dropped": 0, "completed": 0, "errors": 0}
    for counts in (run.counters or {}).values():
        for key in total:
            total[key] += int(counts.get(key) or 0)
    total["lost"] = run.lost
    return total


PAIR_FIELDS = (
    "primary_status",
    "primary_ms",
    "primary_body",
    "candidate_status",
    "candidate_ms",
    "candidate_body",
)


def _pairs(
    run: ShadowRun,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = REPORT_PAIRS,
):
    qs = ShadowPair.objects.filter(run=run)
    if since is not None:
        qs = qs.filter(ts__gte=since)
    if until is not None:
        qs = qs.filter(ts__lt=until)
    rows = list(qs.order_by("-ts", "-id").values(*PAIR_FIELDS, "ts")[:limit])
    rows.reverse()
    return rows


def shadow_report(*, run: ShadowRun) -> dict:
    return {**compare_pairs(_pairs(run)), "mirror": mirror_counters(run)}


def shadow_latest(*, deployment: Deployment) -> ShadowRun | None:
    """The active shadow, else the last one (stopped or promoted), for the page."""
    return (
        ShadowRun.objects.select_related("revision__model_version")
        .filter(deployment=deployment)
        .order_by("-created_at", "-id")
        .first()
    )


def shadow_summary(*, deployment: Deployment) -> dict | None:
    """The ``shadow`` field of ``GET /api/v1/deployments/{name}``: the active shadow (None
    when there is none) with its report."""
    run = shadow_latest(deployment=deployment)
    if run is None or run.state != ShadowRun.State.ACTIVE:
        return None
    return run_summary(run)


def run_summary(run: ShadowRun) -> dict:
    return {
        "version": str(run.revision.model_version.version),
        "revision": run.revision.number,
        "revision_state": run.revision.state,
        "fraction": run.fraction,
        "state": run.state,
        "mirroring": run.mirroring_since is not None and run.state == ShadowRun.State.ACTIVE,
        "mirroring_since": run.mirroring_since.isoformat() if run.mirroring_since else None,
        "created_at": run.created_at.isoformat(),
        "report": shadow_report(run=run),
    }


def shadow_window(deployment: Deployment, since: datetime, until: datetime) -> dict:
    """The shadow figures of one window for the rollout analysis: per variant (``baseline`` =
    the primary, ``candidate`` = the shadow) the request count, error count, latencies (ms,
    in request order) and their percentiles, and the paired outputs (parsed answers, None
    where an answer was not a JSON body). The shadow run is the latest one that mirrored in
    the window; ``run`` is None when there is none (no data: never a pass)."""
    run = (
        ShadowRun.objects.select_related("revision__model_version")
        .filter(deployment=deployment, mirroring_since__lt=until)
        .filter(Q(ended_at__isnull=True) | Q(ended_at__gt=since))
        .order_by("-mirroring_since", "-id")
        .first()
    )
    empty = {"requests": 0, "errors": 0, "latencies_ms": [], "latency_ms": latency_summary([])}
    if run is None:
        return {"run": None, "baseline": dict(empty), "candidate": dict(empty), "pairs": []}
    rows = _pairs(run, since, until, WINDOW_PAIRS)
    out: dict[str, Any] = {
        "run": {
            "id": run.pk,
            "revision": run.revision.number,
            "version": str(run.revision.model_version.version),
            "fraction": run.fraction,
            "state": run.state,
        },
        "since": since.isoformat(),
        "until": until.isoformat(),
        "mirror": mirror_counters(run),
        "comparison": compare_pairs(rows),
    }
    for variant, side in (("baseline", "primary"), ("candidate", "candidate")):
        latencies = [
            float(r[f"{side}_ms"])
            for r in rows
            if r[f"{side}_ms"] is not None and r[f"{side}_status"] is not None
        ]
        out[variant] = {
            "requests": len(rows),
            "errors": sum(1 for r in rows if _is_error(r[f"{side}_status"])),
            "latencies_ms": latencies,
            "latency_ms": latency_summary(latencies),
        }
    out["pairs"] = [
        {
            "ts": r["ts"].isoformat(),
            "baseline": outputs_of(r["primary_body"]) if r["primary_status"] else None,
            "candidate": outputs_of(r["candidate_body"]) if r["candidate_status"] else None,
        }
        for r in rows
    ]
    return out
