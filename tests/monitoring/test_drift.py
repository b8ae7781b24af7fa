"""Drift: population stability index per feature of pulled inputs against the reference
(the input example logged with the model, or an uploaded dataset), per hourly window."""

from __future__ import annotations

import math

import pytest

from audit.models import AuditEvent
from monitoring.models import DriftHour, DriftReference, Prediction
from tests.monitoring.conftest import epoch, ingest, iso, record

pytestmark = pytest.mark.django_db

T0 = epoch(2025, 3, 1, 12, 0)
EPS = 1e-4


@pytest.fixture(autouse=True)
def _small_references_judged(settings):
    # These tests compute PSI against the 4-row input example; the minimum reference size
    # (CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS) is tested in test_ux.py.
    settings.CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS = 1


def psi(expected, actual):
    return sum(
        (max(a, EPS) - max(e, EPS)) * math.log(max(a, EPS) / max(e, EPS))
        for e, a in zip(expected, actual, strict=False)
    )


def drift(api, start, end, step, **extra):
    resp = api.get(
        "/api/v1/deployments/churn/metrics",
        {"name": "drift_psi", "from": iso(start), "to": iso(end), "step": str(step), **extra},
    )
    assert resp.status_code == 200, resp.content
    return resp.json()["points"]


def inputs_records(rows: list[tuple[float, float]], *, t: float, seq: int = 1) -> list[dict]:
    return [
        record(seq + i, f"q{seq + i}", t + i, [0], inputs={"f0": [a], "f1": [b]})
        for i, (a, b) in enumerate(rows)
    ]


def test_inputs_like_the_input_example_do_not_drift_and_shifted_ones_do(api, fleet):
    # The example's f1 is 1, 2, 3, 4: bins split at 1.5, 2.5, 3.5, a quarter of it in each.
    same = [(0.1, 1.0), (0.5, 2.0), (0.9, 3.0), (0.3, 4.0)] * 5
    ingest(fleet.instance(1), inputs_records(same, t=T0))
    assert drift(api, T0, T0 + 3600, 3600) == [{"t": iso(T0), "value": 0.0}]
    reference = DriftReference.objects.get()
    assert reference.source == "input_example" and reference.n_rows == 4

    # The next hour every f1 is 4 (the top bin) and f0 stays where it was.
    shifted = [(0.1, 4.0), (0.5, 4.0), (0.9, 4.0), (0.3, 4.0)] * 5
    ingest(fleet.instance(1), inputs_records(shifted, t=T0 + 3600, seq=21))
    expected_f1 = psi([0.25] * 4, [0, 0, 0, 1])
    hourly = drift(api, T0, T0 + 7200, 3600)
    assert [p["t"] for p in hourly] == [iso(T0), iso(T0 + 3600)]
    assert hourly[1]["value"] == pytest.approx(expected_f1)
    assert drift(api, T0 + 3600, T0 + 7200, 3600, feature="f0")[0]["value"] == 0.0
    # Both hours together: half of f1 in the top bin.
    assert drift(api, T0, T0 + 7200, 7200)[0]["value"] == pytest.approx(
        psi([0.25] * 4, [0.125, 0.125, 0.125, 0.625])
    )


def test_an_uploaded_reference_dataset_replaces_the_example_for_later_windows(api, fleet):
    model = fleet.deployment.model.name
    data = {"columns": ["f0", "f1"], "data": [[x / 100, 10.0 + (x % 2)] for x in range(100)]}
    resp = api.client.put(
        f"/api/v1/models/{model}/versions/1/drift-reference",
        data=data,
        content_type="application/json",
        headers=api.headers,
    )
    assert resp.status_code == 201, resp.content
    assert (
        resp.json()["source"] == "dataset"
        and resp.json()["n_rows"] == 100
        and resp.json()["features"] == ["f0", "f1"]
    )
    assert (
        api.get(f"/api/v1/models/{model}/versions/1/drift-reference").json()["source"] == "dataset"
    )
    assert AuditEvent.objects.filter(action="monitoring.drift_reference").exists()
    # f1 of the dataset is 10 or 11 (split at 10.5, half each); live inputs are all 10.
    rows = [(x / 20, 10.0) for x in range(20)]
    ingest(fleet.instance(1), inputs_records(rows, t=T0))
    value = drift(api, T0, T0 + 3600, 3600, feature="f1")[0]["value"]
    assert value == pytest.approx(psi([0.5, 0.5], [1.0, 0.0]))
    assert DriftReference.objects.filter(active=True).count() == 1


def test_bad_reference_datasets_are_400(api, fleet):
    model = fleet.deployment.model.name
    for body in ([1, 2, 3], {"columns": ["a"], "data": [[1, 2]]}, {"x": {"nested": 1}}):
        resp = api.client.put(
            f"/api/v1/models/{model}/versions/1/drift-reference",
            data=body,
            content_type="application/json",
            headers=api.headers,
        )
        assert resp.status_code == 400, body
    assert (
        api.client.put(
            f"/api/v1/models/{model}/versions/9/drift-reference",
            data={"a": [1]},
            content_type="application/json",
            headers=api.headers,
        ).status_code
        == 404
    )


def test_records_without_inputs_and_probe_requests_count_for_nothing(api, fleet):
    ingest(
        fleet.instance(1),
        [
            record(1, "a", T0, [1]),  # inputs not sampled
            record(2, "cp-probe-123", T0 + 1, [1], inputs={"f0": [9.0], "f1": [9.0]}),
        ],
    )
    assert not DriftHour.objects.exists()
    assert list(Prediction.objects.values_list("request_id", flat=True)) == ["a"]
    assert drift(api, T0, T0 + 3600, 3600) == []
