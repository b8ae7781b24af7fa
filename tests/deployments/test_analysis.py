"""The rollout analysis on synthetic windows: each check's edge, and no data never passes."""

from __future__ import annotations

import math

import pytest

from deployments.analysis import (
    Window,
    analyse,
    counters_delta,
    psi_of,
    validate_thresholds,
)
from serving.routing import LATENCY_BOUNDS_MS


def hist(ms: float, n: int) -> list[int]:
    """n requests that all took about ``ms``."""
    counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    index = next((i for i, b in enumerate(LATENCY_BOUNDS_MS) if ms <= b), len(LATENCY_BOUNDS_MS))
    counts[index] = n
    return counts


def window(n=200, errors=0, ms=10.0, preds=None, labeled=0, correct=0) -> Window:
    return Window(
        requests=n,
        errors=errors,
        latency_buckets=hist(ms, n),
        predictions=[i % 5 == 0 for i in range(n)] if preds is None else preds,
        labeled=labeled,
        correct=correct,
    )


def by_name(verdict):
    return {c.name: c for c in verdict.checks}


def test_identical_windows_pass_every_required_check():
    verdict = analyse(window(), window())
    assert verdict.decision == "pass", verdict.as_dict()
    assert by_name(verdict)["accuracy"].verdict == "skipped"


def test_too_few_requests_is_inconclusive_not_a_pass():
    verdict = analyse(window(), window(n=99))
    assert verdict.decision == "inconclusive"
    assert by_name(verdict)["error_rate"].verdict == "inconclusive"
    assert by_name(verdict)["error_rate"].value is None


def test_no_data_at_all_never_passes():
    verdict = analyse(Window(), Window())
    assert verdict.decision == "inconclusive"
    assert all(c.verdict in ("inconclusive", "skipped") for c in verdict.checks)
    # An empty candidate with a healthy baseline does not pass either.
    assert analyse(window(), Window()).decision == "inconclusive"


def test_nan_predictions_do_not_count_as_samples():
    nan_window = window(preds=[math.nan] * 200)
    verdict = analyse(window(), nan_window)
    assert by_name(verdict)["prediction_psi"].verdict == "inconclusive"
    assert verdict.decision == "inconclusive"


def test_error_rate_edge_is_one_percentage_point_over_the_baseline():
    at_edge = analyse(window(n=1000, errors=10), window(n=1000, errors=20))
    assert by_name(at_edge)["error_rate"].verdict == "pass"
    over = analyse(window(n=1000, errors=10), window(n=1000, errors=21))
    assert by_name(over)["error_rate"].verdict == "fail"
    assert over.decision == "fail" and "error_rate fail" in over.reason


def test_latency_edge_is_one_and_a_half_times_plus_five_ms():
    assert analyse(window(ms=20), window(ms=30)).decision == "pass"  # 30 <= 1.5*20+5
    slow = analyse(window(ms=20), window(ms=200))
    assert by_name(slow)["latency_p95"].verdict == "fail"
    assert by_name(slow)["latency_p99"].verdict == "fail"
    base_p95 = analyse(window(ms=20), window(ms=20)).checks[1].value
    assert by_name(slow)["latency_p95"].threshold == pytest.approx(1.5 * base_p95 + 5)


def test_flipped_labels_fail_on_divergence_and_similar_ones_pass():
    base = [1 if i % 5 == 0 else 0 for i in range(500)]
    flipped = [1 - v for v in base]
    verdict = analyse(window(n=500, preds=base), window(n=500, preds=flipped))
    assert by_name(verdict)["prediction_psi"].verdict == "fail"
    close = [1 if i % 5 == 0 or i % 97 == 0 else 0 for i in range(500)]
    assert (
        by_name(analyse(window(n=500, preds=base), window(n=500, preds=close)))[
            "prediction_psi"
        ].verdict
        == "pass"
    )


def test_psi_of_numbers_uses_the_baseline_deciles():
    base = [i / 1000 for i in range(1000)]
    assert psi_of(base, base)[0] == pytest.approx(0.0, abs=1e-9)
    shifted, kind = psi_of(base, [v + 0.5 for v in base])
    assert kind == "deciles" and shifted > 0.2


def test_accuracy_fails_only_when_significantly_worse():
    worse = analyse(
        window(labeled=400, correct=360), window(labeled=400, correct=300)
    )  # 90 % vs 75 %
    assert by_name(worse)["accuracy"].verdict == "fail"
    noise = analyse(window(labeled=400, correct=360), window(labeled=400, correct=352))
    assert by_name(noise)["accuracy"].verdict == "pass"


def test_thresholds_are_configurable_per_deployment():
    strict = {"max_error_rate_increase": 0.0, "min_samples": 10}
    verdict = analyse(window(n=50, errors=0), window(n=50, errors=1), strict)
    assert by_name(verdict)["error_rate"].verdict == "fail"
    with pytest.raises(ValueError, match="unknown analysis setting"):
        validate_thresholds({"max_errors": 1})
    with pytest.raises(ValueError, match="must be a number"):
        validate_thresholds({"max_psi": "x"})


def test_counter_deltas_survive_a_router_restart():
    start = {"requests": 100, "errors": 5, "latency_buckets": hist(10, 100)}
    now = {"requests": 150, "errors": 6, "latency_buckets": hist(10, 150)}
    assert counters_delta(now, start)["requests"] == 50
    restarted = {"requests": 20, "errors": 0, "latency_buckets": hist(10, 20)}
    assert counters_delta(restarted, start)["requests"] == 20
