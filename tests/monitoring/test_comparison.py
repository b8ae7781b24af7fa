"""The A/B comparison (monitoring/comparison.py): statistics against published hand
computations (Newcombe 1998, Statistics in Medicine 17:857-872) and the window's figures
from real rows."""

from __future__ import annotations

import json
import math
import time

import pytest

from monitoring.comparison import (
    compare_proportions,
    difference_interval,
    two_proportion_z_test,
    version_comparison,
    wilson_interval,
)
from monitoring.models import FeedbackMinute, TrafficMinute


def close(pair, expected, tol=5e-5):
    return all(abs(x - y) < tol for x, y in zip(pair, expected, strict=True))


def test_wilson_intervals_match_newcombes_table():
    assert close(wilson_interval(81, 263), (0.2553, 0.3662))
    assert close(wilson_interval(15, 148), (0.0624, 0.1605))
    assert close(wilson_interval(0, 20), (0.0, 0.1611))
    assert close(wilson_interval(1, 29), (0.0061, 0.1718))
    assert wilson_interval(0, 0) is None  # no samples: no interval


def test_the_difference_interval_is_newcombes_method_10():
    # p_b − p_a with a = 48/80, b = 56/70: 0.2000, 95 % CI 0.0524 to 0.3339
    assert close(difference_interval(48, 80, 56, 70), (0.0524, 0.3339))
    assert close(difference_interval(3, 10, 9, 10), (0.1705, 0.8090))
    assert close(difference_interval(0, 20, 0, 10), (-0.1611, 0.2775))  # 0/10 − 0/20
    assert difference_interval(0, 0, 5, 10) is None


def test_the_two_proportion_z_test_by_hand():
    # pooled p = 104/150; se = sqrt(p(1-p)(1/80 + 1/70)); z = 0.2 / se
    pooled = 104 / 150
    se = math.sqrt(pooled * (1 - pooled) * (1 / 80 + 1 / 70))
    z, p = two_proportion_z_test(48, 80, 56, 70)
    assert z == pytest.approx(0.2 / se) and z == pytest.approx(2.6502, abs=1e-4)
    assert p == pytest.approx(0.00805, abs=1e-5)  # 2 × (1 − Φ(2.6502))
    assert two_proportion_z_test(10, 10, 20, 20) == (0.0, 1.0)  # no variance, no difference
    assert two_proportion_z_test(0, 0, 1, 2) is None


def test_verdicts_never_pass_on_no_data_or_few_samples():
    assert compare_proportions(0, 0, 0, 0).verdict == "no data"
    assert compare_proportions(10, 10, 0, 0).verdict == "no data"
    few = compare_proportions(5, 10, 9, 10)
    assert few.verdict == "inconclusive" and few.p_value is not None
    assert compare_proportions(480, 800, 560, 700).verdict == "b higher"
    assert compare_proportions(560, 700, 480, 800).verdict == "b lower"
    same = compare_proportions(50, 100, 52, 100)
    assert same.verdict == "no significant difference" and same.difference == pytest.approx(0.02)


def _minute(d, version, bucket, requests, errors, bucket_field="b03"):
    TrafficMinute.objects.create(
        deployment=d, model_version=version, bucket=bucket, requests=requests, errors=errors,
        latency_sum=0.0, **{bucket_field: requests},
    )  # fmt: skip


def _labels(d, version, bucket, correct, wrong):
    FeedbackMinute.objects.create(
        deployment=d, model_version=version, bucket=bucket, n=correct + wrong,
        confusion=[[json.dumps(1), json.dumps(1), correct], [json.dumps(1), json.dumps(0), wrong]],
    )  # fmt: skip


@pytest.mark.django_db
def test_two_versions_in_a_window_are_compared_on_accuracy_errors_and_latency(make_deployment):
    fleet = make_deployment("ab", (1, 2))
    d = fleet.deployment  # serves v2
    now = int(time.time()) // 60 * 60
    start, end = now - 3600, now + 60
    assert version_comparison(deployment=d, start=start, end=end) is None  # no traffic
    _minute(d, 2, now - 120, 700, 7, "b03")
    _minute(d, 2, now - 60, 100, 1, "b03")
    _minute(d, 1, now - 60, 800, 40, "b08")  # slower, more errors
    _minute(d, 0, now - 60, 1600, 48)  # the all-versions rollup row is not a variant
    _labels(d, 2, now - 120, 48, 32)  # 48/80
    _labels(d, 1, now - 60, 56, 14)  # 56/70
    result = version_comparison(deployment=d, start=start, end=end)
    assert result["versions"] == [1, 2] or result["versions"] == [2, 1]
    a, b = result["a"], result["b"]
    assert (a["version"], b["version"]) == (2, 1)  # baseline: the serving version
    assert (a["requests"], a["errors"], b["requests"], b["errors"]) == (800, 8, 800, 40)
    assert (a["correct"], a["labeled"], b["correct"], b["labeled"]) == (48, 80, 56, 70)
    assert close(result["accuracy"]["difference_ci"], (0.0524, 0.3339))
    assert result["accuracy"]["verdict"] == "b higher"
    assert result["errors"]["verdict"] == "b higher" and result["errors"]["p_value"] < 1e-4
    assert close(a["error_ci"], wilson_interval(8, 800), 1e-12)
    assert a["latency_ms"]["p50"] < b["latency_ms"]["p50"]
    # only one version labeled: accuracy has no verdict, errors still do
    FeedbackMinute.objects.filter(model_version=1).delete()
    result = version_comparison(deployment=d, start=start, end=end)
    assert result["accuracy"]["verdict"] == "no data" and result["b"]["accuracy"] is None


@pytest.mark.django_db
def test_the_monitoring_page_shows_the_comparison_only_with_two_versions(
    make_deployment, client_logged_in
):
    from django.urls import reverse

    fleet = make_deployment("abpage", (1, 2))
    d = fleet.deployment
    url = reverse("monitoring:deployment", kwargs={"name": d.name})
    now = int(time.time()) // 60 * 60
    _minute(d, 2, now - 60, 500, 5)
    page = client_logged_in.get(url).content.decode()
    assert 'id="ab-comparison"' not in page  # one version: nothing to compare
    _minute(d, 1, now - 60, 400, 40, "b07")
    _labels(d, 1, now - 60, 56, 14)
    page = client_logged_in.get(url).content.decode()
    assert 'id="ab-comparison"' in page and "v2 (A) and v1 (B)" in page
    assert (
        'id="chart-ab-latency"' in page
        and 'id="chart-ab-accuracy"' in page
        and 'id="chart-ab-errors"' in page
    )
    assert "0.0100 [" in page  # A's error rate 5/500 with its interval
    assert "no verdict: no data" in page  # A has no labels: accuracy gets no verdict
