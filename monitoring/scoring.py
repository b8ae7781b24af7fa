"""Pure computations: scores from ground truth, latency percentiles from histograms,
population stability index, integer apportioning. No database, no Django.

Classification and regression scores reproduce scikit-learn's arithmetic operation for
operation (the same divisions, the same numpy reductions in the same order), so they are
equal to ``sklearn.metrics`` on the same pairs, not merely close. The tests check that
with ``==``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from serving.metrics import LATENCY_BUCKETS

N_BUCKETS = len(LATENCY_BUCKETS) + 1
PSI_EPSILON = 1e-4
PSI_BINS = 10
MAX_CATEGORIES = 50

# --- classification -------------------------------------------------------------------------


def _label_sort_key(value: Any) -> tuple:
    # scikit-learn sorts the labels; mixed kinds (which it refuses) are ordered by kind here.
    if isinstance(value, bool | int | float):
        return (0, value, "")
    return (1, 0, str(value))


def classification_scores(confusion: Mapping[tuple[str, str], int]) -> dict[str, float] | None:
    """accuracy, precision, recall, f1 from ``{(y_true JSON, y_pred JSON): count}``.

    Binary with positive class 1 when every label is 0 or 1 (scikit-learn's default
    ``average="binary"``); otherwise macro-averaged over the labels seen in either column
    (``average="macro"``). A division by zero gives 0.0, as scikit-learn's default does.
    """
    total = sum(confusion.values())
    if total <= 0:
        return None
    decoded: dict[str, Any] = {}
    for true_key, pred_key in confusion:
        for key in (true_key, pred_key):
            if key not in decoded:
                decoded[key] = json.loads(key)
    correct = sum(count for (t, p), count in confusion.items() if decoded[t] == decoded[p])
    accuracy = float(np.float64(correct) / np.float64(total))

    labels = sorted({_hashable(v) for v in decoded.values()}, key=_label_sort_key)
    binary = all(isinstance(v, int | bool) and v in (0, 1) for v in labels)
    classes = [1] if binary else labels
    index = {label: i for i, label in enumerate(classes)}
    tp = np.zeros(len(classes), dtype=np.int64)
    pred_sum = np.zeros(len(classes), dtype=np.int64)
    true_sum = np.zeros(len(classes), dtype=np.int64)
    for (t, p), count in confusion.items():
        vt, vp = _hashable(decoded[t]), _hashable(decoded[p])
        it, ip = index.get(vt), index.get(vp)
        if ip is not None:
            pred_sum[ip] += count
        if it is not None:
            true_sum[it] += count
            if vt == vp:
                tp[it] += count
    precision = _divide(tp.astype(np.float64), pred_sum.astype(np.float64))
    recall = _divide(tp.astype(np.float64), true_sum.astype(np.float64))
    beta2 = 1.0
    f1 = _divide(
        (1 + beta2) * tp.astype(np.float64), beta2 * true_sum.astype(np.float64) + pred_sum
    )
    return {
        "accuracy": accuracy,
        "precision": float(np.average(precision)),
        "recall": float(np.average(recall)),
        "f1": float(np.average(f1)),
    }


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    mask = denominator == 0.0
    denominator = denominator.copy()
    denominator[mask] = 1
    result = numerator / denominator
    result[mask] = 0.0
    return result


# --- regression -----------------------------------------------------------------------------


def regression_scores(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float] | None:
    """mae and rmse, as ``mean_absolute_error`` and ``root_mean_squared_error`` compute them."""
    if len(y_true) == 0:
        return None
    t = np.asarray(y_true, dtype=np.float64).reshape((-1, 1))
    p = np.asarray(y_pred, dtype=np.float64).reshape((-1, 1))
    mae = np.average(np.average(np.abs(p - t), axis=0))
    rmse = np.average(np.sqrt(np.average((t - p) ** 2, axis=0)))
    return {"mae": float(mae), "rmse": float(rmse)}


# --- latency ---------------------------------------------------------------------------------


def latency_quantiles(buckets: np.ndarray, q: float) -> np.ndarray:
    """Quantile ``q`` in milliseconds for each row of non-cumulative bucket counts, by linear
    interpolation within the bucket (Prometheus' ``histogram_quantile``). NaN for empty rows;
    the largest finite bound when the quantile falls in the +Inf bucket."""
    buckets = np.atleast_2d(np.asarray(buckets, dtype=np.float64))
    cumulative = np.cumsum(buckets, axis=1)
    total = cumulative[:, -1]
    rank = q * total
    idx = np.argmax(cumulative >= rank[:, None], axis=1)
    upper_bounds = np.array([*LATENCY_BUCKETS, LATENCY_BUCKETS[-1]], dtype=np.float64)
    lower_bounds = np.array([0.0, *LATENCY_BUCKETS], dtype=np.float64)
    rows = np.arange(len(idx))
    below = np.where(idx > 0, cumulative[rows, np.maximum(idx - 1, 0)], 0.0)
    inside = buckets[rows, idx]
    lower, upper = lower_bounds[idx], upper_bounds[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(inside > 0, (rank - below) / inside, 1.0)
    value = lower + (upper - lower) * fraction
    value = np.where(idx == N_BUCKETS - 1, LATENCY_BUCKETS[-1], value)
    return np.where(total > 0, value * 1000.0, np.nan)


# --- drift -----------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def build_profile(columns: Mapping[str, Sequence[Any]]) -> dict[str, dict]:
    """Bins per feature from a reference sample: deciles for numbers (or the midpoints
    between distinct values when there are few), the most common values for the rest."""
    profile: dict[str, dict] = {}
    for feature, raw in columns.items():
        values = [v for v in raw if v is not None]
        if not values:
            continue
        if all(_is_number(v) and abs(v) < 1e300 for v in values):
            data = np.asarray(values, dtype=np.float64)
            data = data[np.isfinite(data)]
            if data.size == 0:
                continue
            distinct = np.unique(data)
            if distinct.size > PSI_BINS:
                edges = np.unique(np.quantile(data, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
            elif distinct.size > 1:
                edges = (distinct[:-1] + distinct[1:]) / 2
            else:
                edges = distinct
            counts = np.bincount(
                np.searchsorted(edges, data, side="right"), minlength=edges.size + 1
            )
            profile[feature] = {
                "kind": "numeric",
                "edges": [float(e) for e in edges],
                "expected": (counts / counts.sum()).tolist(),
            }
        else:
            keys = [_category(v) for v in values]
            frequency: dict[str, int] = {}
            for key in keys:
                frequency[key] = frequency.get(key, 0) + 1
            categories = sorted(sorted(frequency), key=lambda k: -frequency[k])[:MAX_CATEGORIES]
            counts = [frequency[c] for c in categories]
            counts.append(len(keys) - sum(counts))  # everything else
            profile[feature] = {
                "kind": "categorical",
                "categories": categories,
                "expected": [c / len(keys) for c in counts],
            }
    return profile


def _category(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def bin_counts(spec: Mapping[str, Any], values: Iterable[Any]) -> list[int]:
    """Counts of ``values`` in the bins of one feature's profile (values of the wrong kind
    and missing values are not counted)."""
    if spec["kind"] == "numeric":
        numbers = [v for v in values if _is_number(v) and abs(v) < 1e300]
        counts = np.zeros(len(spec["edges"]) + 1, dtype=np.int64)
        if numbers:
            data = np.asarray(numbers, dtype=np.float64)
            data = data[np.isfinite(data)]
            idx = np.searchsorted(np.asarray(spec["edges"], dtype=np.float64), data, side="right")
            counts += np.bincount(idx, minlength=counts.size)
        return counts.tolist()
    index = {c: i for i, c in enumerate(spec["categories"])}
    other = len(spec["categories"])
    counts = [0] * (other + 1)
    for value in values:
        if value is None:
            continue
        counts[index.get(_category(value), other)] += 1
    return counts


def psi(expected: Sequence[float], counts: Sequence[int]) -> float | None:
    """Population stability index of observed ``counts`` against ``expected`` shares.
    Empty bins are floored at 1e-4 on both sides so the logarithm stays finite."""
    total = sum(counts)
    if total <= 0:
        return None
    value = 0.0
    for e, c in zip(expected, counts, strict=True):
        a = max(c / total, PSI_EPSILON)
        e = max(e, PSI_EPSILON)
        value += (a - e) * math.log(a / e)
    return value


# --- apportioning ------------------------------------------------------------------------------


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split an integer ``total`` in proportion to ``weights`` (largest remainder): the parts
    are integers and add up to ``total`` exactly."""
    if not weights:
        return []
    weight_sum = float(sum(weights))
    if weight_sum <= 0:
        parts = [0] * len(weights)
        parts[-1] = total
        return parts
    raw = [total * w / weight_sum for w in weights]
    parts = [math.floor(r) for r in raw]
    short = total - sum(parts)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - parts[i]), -i))
    for i in order[:short]:
        parts[i] += 1
    return parts
