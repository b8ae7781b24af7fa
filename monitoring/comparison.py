"""A/B comparison of two model versions of one deployment over a window (a split, a canary,
a shadow: any window with traffic from two or more versions).

- accuracy from late labels (``FeedbackMinute`` confusion counts, classification): each
  variant's share of correct predictions with a 95 % Wilson interval; the difference
  (B − A) with Newcombe's hybrid score interval and a pooled two-proportion z-test;
- error rate (5xx share of ``TrafficMinute`` requests) the same way;
- latency p50/p95/p99 per variant from the minutes' histogram buckets.

Statistics are pure functions (no scipy: ``math.erfc``). No samples on either side gives no
verdict ("no data"), fewer than ``min_samples`` gives "inconclusive": never a pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from django.db.models import Sum

from deployments.models import Deployment

from .models import BUCKET_FIELDS, FeedbackMinute, TrafficMinute
from .scoring import latency_quantiles

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
MIN_SAMPLES = 30
ALPHA = 0.05


# --- statistics ----------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion; None without samples."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def difference_interval(
    x_a: int, n_a: int, x_b: int, n_b: int, z: float = Z95
) -> tuple[float, float] | None:
    """Newcombe's hybrid score interval (method 10) of p_b − p_a; None without samples."""
    wa, wb = wilson_interval(x_a, n_a, z), wilson_interval(x_b, n_b, z)
    if wa is None or wb is None:
        return None
    pa, pb = x_a / n_a, x_b / n_b
    d = pb - pa
    lower = d - math.sqrt((pb - wb[0]) ** 2 + (wa[1] - pa) ** 2)
    upper = d + math.sqrt((wb[1] - pb) ** 2 + (pa - wa[0]) ** 2)
    return max(-1.0, lower), min(1.0, upper)


def two_proportion_z_test(x_a: int, n_a: int, x_b: int, n_b: int) -> tuple[float, float] | None:
    """(z, two-sided p-value) of H0: p_a = p_b with the pooled standard error; None without
    samples. Both proportions 0 or both 1 (no variance): z 0, p-value 1."""
    if n_a <= 0 or n_b <= 0:
        return None
    pooled = (x_a + x_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0, 1.0
    z = (x_b / n_b - x_a / n_a) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


@dataclass
class ProportionComparison:
    a: dict
    b: dict
    difference: float | None
    difference_ci: tuple[float, float] | None
    z: float | None
    p_value: float | None
    verdict: str  # "no data", "inconclusive", "no significant difference", "b higher", "b lower"


def compare_proportions(
    x_a: int, n_a: int, x_b: int, n_b: int, *, min_samples: int = MIN_SAMPLES
) -> ProportionComparison:
    def side(x: int, n: int) -> dict:
        return {
            "successes": x,
            "n": n,
            "rate": x / n if n else None,
            "ci": wilson_interval(x, n),
        }

    a, b = side(x_a, n_a), side(x_b, n_b)
    if n_a == 0 or n_b == 0:
        return ProportionComparison(a, b, None, None, None, None, "no data")
    test = two_proportion_z_test(x_a, n_a, x_b, n_b)
    z, p_value = test if test else (None, None)
    difference = x_b / n_b - x_a / n_a
    ci = difference_interval(x_a, n_a, x_b, n_b)
    if min(n_a, n_b) < min_samples:
        verdict = "inconclusive"
    elif p_value is not None and p_value < ALPHA:
        verdict = "b higher" if difference > 0 else "b lower"
    else:
        verdict = "no significant difference"
    return ProportionComparison(a, b, difference, ci, z, p_value, verdict)


# --- the window's figures -------------------------------------------------------------------


def versions_with_traffic(*, deployment: Deployment, start: int, end: int) -> list[dict]:
    """Model versions that served requests in [start, end) (unix seconds), busiest first."""
    rows = (
        TrafficMinute.objects.filter(
            deployment_id=deployment.pk, bucket__gte=start, bucket__lt=end, model_version__gt=0
        )
        .values("model_version")
        .annotate(requests=Sum("requests"))
        .filter(requests__gt=0)
        .order_by("-requests", "model_version")
    )
    return [{"version": r["model_version"], "requests": r["requests"]} for r in rows]


def _traffic(deployment: Deployment, version: int, start: int, end: int) -> dict:
    agg = TrafficMinute.objects.filter(
        deployment_id=deployment.pk, model_version=version, bucket__gte=start, bucket__lt=end
    ).aggregate(
        requests=Sum("requests"), errors=Sum("errors"), **{f: Sum(f) for f in BUCKET_FIELDS}
    )
    buckets = np.array([[agg[f] or 0 for f in BUCKET_FIELDS]], dtype=np.float64)
    latency = {}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        value = float(latency_quantiles(buckets, q)[0])
        latency[name] = None if math.isnan(value) else round(value, 3)
    return {"requests": agg["requests"] or 0, "errors": agg["errors"] or 0, "latency_ms": latency}


def _labels(deployment: Deployment, version: int, start: int, end: int) -> tuple[int, int]:
    """(correct, labeled) predictions of ``version`` made in the window."""
    correct = total = 0
    for confusion in FeedbackMinute.objects.filter(
        deployment_id=deployment.pk, model_version=version, bucket__gte=start, bucket__lt=end
    ).values_list("confusion", flat=True):
        for y_true, y_pred, count in confusion:
            total += int(count)
            if _same_label(y_true, y_pred):
                correct += int(count)
    return correct, total


def _same_label(y_true, y_pred) -> bool:
    if y_true == y_pred:
        return True
    try:  # JSON texts of the same value ("1" and "1.0")
        return json.loads(y_true) == json.loads(y_pred)
    except (TypeError, ValueError):
        return False


def _as_dict(c: ProportionComparison) -> dict:
    return {
        "a": c.a,
        "b": c.b,
        "difference": c.difference,
        "difference_ci": c.difference_ci,
        "z": c.z,
        "p_value": c.p_value,
        "verdict": c.verdict,
    }


def version_comparison(
    *,
    deployment: Deployment,
    start: int,
    end: int,
    a: int | None = None,
    b: int | None = None,
    min_samples: int = MIN_SAMPLES,
) -> dict | None:
    """Compare versions ``a`` (baseline: by default the serving version) and ``b`` (by default
    the busiest other one) over [start, end); None when fewer than two versions had traffic."""
    versions = versions_with_traffic(deployment=deployment, start=start, end=end)
    seen = [v["version"] for v in versions]
    if len(seen) < 2 and (a is None or b is None):
        return None
    serving = deployment.serving_revision or deployment.desired_revision
    serving_version = serving.model_version.version if serving else None
    if a is None:
        a = serving_version if serving_version in seen else seen[0]
    if b is None:
        b = next(v for v in seen if v != a)
    variants = []
    for version in (a, b):
        traffic = _traffic(deployment, version, start, end)
        correct, labeled = _labels(deployment, version, start, end)
        variants.append(
            {
                "version": version,
                **traffic,
                "error_rate": traffic["errors"] / traffic["requests"]
                if traffic["requests"]
                else None,
                "error_ci": wilson_interval(traffic["errors"], traffic["requests"]),
                "labeled": labeled,
                "correct": correct,
                "accuracy": correct / labeled if labeled else None,
                "accuracy_ci": wilson_interval(correct, labeled),
            }
        )
    va, vb = variants
    accuracy = compare_proportions(
        va["correct"], va["labeled"], vb["correct"], vb["labeled"], min_samples=min_samples
    )
    errors = compare_proportions(
        va["errors"], va["requests"], vb["errors"], vb["requests"], min_samples=min_samples
    )
    return {
        "start": start,
        "end": end,
        "versions": seen,
        "a": va,
        "b": vb,
        "accuracy": _as_dict(accuracy),
        "errors": _as_dict(errors),
        "min_samples": min_samples,
    }
