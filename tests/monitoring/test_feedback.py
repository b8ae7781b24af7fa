"""Ground truth: POST /api/v1/deployments/{name}/feedback and the scores it yields,
compared with scikit-learn's on the same pairs (with ==, not approximately)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from audit.models import AuditEvent
from monitoring.models import FeedbackMinute, PendingLabel
from tests.monitoring.conftest import epoch, ingest, iso, record

pytestmark = pytest.mark.django_db

T0 = epoch(2025, 3, 1, 12, 0)


def _metric(api, name, metric, start, end, step, **extra):
    params = {"name": metric, "from": iso(start), "to": iso(end), "step": str(step), **extra}
    resp = api.get(f"/api/v1/deployments/{name}/metrics", params)
    assert resp.status_code == 200, resp.content
    return resp.json()["points"]


def _scores(api, name, names, start, end, step, **extra):
    return {m: _metric(api, name, m, start, end, step, **extra) for m in names}


def _feed(instance, outputs_list, *, start_seq=1, t=T0, spacing=1.0, version="1", prefix="r"):
    records = [
        record(start_seq + i, f"{prefix}{start_seq + i}", t + i * spacing, outputs, version=version)
        for i, outputs in enumerate(outputs_list)
    ]
    ingest(instance, records)
    return [r["request_id"] for r in records]


def test_binary_scores_equal_scikit_learns(api, fleet):
    rng = np.random.default_rng(7)
    y_pred = rng.integers(0, 2, 300).tolist()
    y_true = [p if rng.random() < 0.8 else 1 - p for p in y_pred]
    ids = _feed(fleet.instance(1), [[p] for p in y_pred], spacing=0.5)
    resp = api.post(
        "/api/v1/deployments/churn/feedback",
        [{"request_id": i, "label": t} for i, t in zip(ids, y_true, strict=False)],
    )
    assert resp.status_code == 200, resp.content
    assert resp.json()["matched"] == 300 and resp.json()["unknown"] == 0

    got = _scores(api, "churn", ["accuracy", "precision", "recall", "f1"], T0, T0 + 3600, 3600)
    assert got["accuracy"][0]["value"] == skm.accuracy_score(y_true, y_pred)
    assert got["precision"][0]["value"] == skm.precision_score(y_true, y_pred)
    assert got["recall"][0]["value"] == skm.recall_score(y_true, y_pred)
    assert got["f1"][0]["value"] == skm.f1_score(y_true, y_pred)
    assert got["accuracy"][0]["t"] == iso(T0)


def test_multiclass_scores_equal_scikit_learns_macro_average(api, fleet):
    rng = np.random.default_rng(3)
    classes = ["cat", "dog", "eel", "fox"]
    y_pred = [classes[i] for i in rng.integers(0, 4, 500)]
    y_true = [p if rng.random() < 0.6 else classes[rng.integers(0, 4)] for p in y_pred]
    y_true[0] = "gnu"  # a class the model never predicts still counts in the macro average
    ids = _feed(fleet.instance(1), [[p] for p in y_pred], spacing=0.2)
    api.post(
        "/api/v1/deployments/churn/feedback",
        [{"request_id": i, "label": t} for i, t in zip(ids, y_true, strict=False)],
    )
    got = _scores(api, "churn", ["accuracy", "precision", "recall", "f1"], T0, T0 + 600, 600)
    assert got["accuracy"][0]["value"] == skm.accuracy_score(y_true, y_pred)
    assert got["precision"][0]["value"] == skm.precision_score(
        y_true, y_pred, average="macro", zero_division=0
    )
    assert got["recall"][0]["value"] == skm.recall_score(
        y_true, y_pred, average="macro", zero_division=0
    )
    assert got["f1"][0]["value"] == skm.f1_score(y_true, y_pred, average="macro", zero_division=0)


def test_regression_scores_equal_scikit_learns(api, fleet):
    rng = np.random.default_rng(11)
    y_pred = rng.normal(50, 10, 400).tolist()
    y_true = (np.array(y_pred) + rng.normal(0, 3, 400)).tolist()
    ids = _feed(fleet.instance(1), [[p] for p in y_pred], spacing=0.3)
    api.post(
        "/api/v1/deployments/churn/feedback",
        [{"request_id": i, "label": t} for i, t in zip(ids, y_true, strict=False)],
    )
    got = _scores(api, "churn", ["mae", "rmse"], T0, T0 + 3600, 3600)
    assert got["mae"][0]["value"] == skm.mean_absolute_error(y_true, y_pred)
    assert got["rmse"][0]["value"] == skm.root_mean_squared_error(y_true, y_pred)
    assert (
        _metric(api, "churn", "accuracy", T0, T0 + 3600, 3600) == []
    )  # continuous values: no classes


def test_multi_row_requests_take_one_label_per_row(api, fleet):
    ids = _feed(fleet.instance(1), [[1, 0, 1], [0, 0]])
    resp = api.post(
        "/api/v1/deployments/churn/feedback",
        [
            {"request_id": ids[0], "label": [1, 1, 1]},
            {"request_id": ids[1], "label": 0},  # two rows, one label: cannot be paired
        ],
    )
    body = resp.json()
    assert (
        body["pairs"] == 3
        and body["mismatched"] == 1
        and body["mismatched_request_ids"] == [ids[1]]
    )
    got = _scores(api, "churn", ["accuracy", "recall"], T0, T0 + 60, 60)
    assert got["accuracy"][0]["value"] == skm.accuracy_score([1, 1, 1], [1, 0, 1])
    assert got["recall"][0]["value"] == skm.recall_score([1, 1, 1], [1, 0, 1])


def test_scores_are_per_window_and_per_model_version(api, fleet):
    # v1 in the first minute, v2 in the second; each window holds its own version's pairs.
    ids1 = _feed(fleet.instance(1), [[1]] * 4 + [[0]] * 4, t=T0, spacing=5)
    ids2 = _feed(fleet.instance(2), [[1]] * 5, t=T0 + 60, spacing=5, version="2", prefix="s")
    labels = [1, 1, 0, 0, 0, 0, 0, 0]
    api.post(
        "/api/v1/deployments/churn/feedback",
        [{"request_id": i, "label": t} for i, t in zip(ids1, labels, strict=False)]
        + [{"request_id": i, "label": 1} for i in ids2],
    )
    points = _metric(api, "churn", "accuracy", T0, T0 + 120, 60)
    assert [(p["t"], p["value"]) for p in points] == [(iso(T0), 6 / 8), (iso(T0 + 60), 1.0)]
    only_v1 = _metric(api, "churn", "accuracy", T0, T0 + 120, 120, version="1")
    assert only_v1 == [{"t": iso(T0), "value": 6 / 8}]
    both = _metric(api, "churn", "accuracy", T0, T0 + 120, 120)
    assert both[0]["value"] == skm.accuracy_score(labels + [1] * 5, [1] * 4 + [0] * 4 + [1] * 5)


def test_late_labels_update_the_windows_their_predictions_fell_in(api, fleet):
    early = _feed(fleet.instance(1), [[1], [1]], t=T0)  # window 12:00
    later = _feed(fleet.instance(1), [[0], [0]], start_seq=3, t=T0 + 3600)  # window 13:00
    api.post(
        "/api/v1/deployments/churn/feedback",
        [{"request_id": later[0], "label": 0}, {"request_id": later[1], "label": 0}],
    )
    hourly = _metric(api, "churn", "accuracy", T0, T0 + 7200, 3600)
    assert hourly == [{"t": iso(T0 + 3600), "value": 1.0}]
    # Labels for the 12:00 predictions arrive an hour late: they land in the 12:00 window.
    api.post(
        "/api/v1/deployments/churn/feedback",
        [{"request_id": early[0], "label": 1}, {"request_id": early[1], "label": 0}],
    )
    hourly = _metric(api, "churn", "accuracy", T0, T0 + 7200, 3600)
    assert hourly == [{"t": iso(T0), "value": 0.5}, {"t": iso(T0 + 3600), "value": 1.0}]
    # A corrected label replaces the earlier one; posting it twice changes nothing more.
    for _ in range(2):
        api.post("/api/v1/deployments/churn/feedback", [{"request_id": early[1], "label": 1}])
    assert _metric(api, "churn", "accuracy", T0, T0 + 3600, 3600) == [{"t": iso(T0), "value": 1.0}]
    assert FeedbackMinute.objects.filter(deployment=fleet.deployment).count() == 2


def test_unknown_request_ids_are_counted_and_applied_when_the_prediction_arrives(api, fleet):
    known = _feed(fleet.instance(1), [[1]])
    resp = api.post(
        "/api/v1/deployments/churn/feedback",
        [
            {"request_id": known[0], "label": 1},
            {"request_id": "not-pulled-yet", "label": 0},
            {"request_id": "never-seen", "label": 1},
        ],
    )
    assert resp.status_code == 200
    body = resp.json()
    assert (body["received"], body["matched"], body["pending"], body["unknown"]) == (3, 1, 2, 0)
    assert sorted(body["pending_request_ids"]) == ["never-seen", "not-pulled-yet"]
    assert PendingLabel.objects.filter(deployment=fleet.deployment).count() == 2
    # The prediction is pulled after its label came in: the label applies then.
    ingest(fleet.instance(1), [record(2, "not-pulled-yet", T0 + 1, [1])])
    assert _metric(api, "churn", "accuracy", T0, T0 + 60, 60) == [{"t": iso(T0), "value": 0.5}]
    assert list(PendingLabel.objects.values_list("request_id", flat=True)) == ["never-seen"]
    event = AuditEvent.objects.filter(action="monitoring.feedback", object_id="churn").first()
    assert event.after["pending"] == 2 and event.actor_label == "alice"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ([{"label": 1}], 400, "missing_request_id"),
        (
            [{"request_id": "a", "label": 1}, {"request_id": "", "label": 1}],
            400,
            "missing_request_id",
        ),
        ([{"request_id": "a"}], 400, "missing_label"),
        ({"request_id": "a", "label": 1}, 400, "invalid_feedback"),
        ([{"request_id": "a", "label": {"x": 1}}], 400, "invalid_feedback"),
        ([{"request_id": f"r{i}", "label": 1} for i in range(10_001)], 413, "too_many_items"),
    ],
)
def test_bad_feedback_is_refused_and_changes_nothing(api, fleet, body, status, code):
    ids = _feed(fleet.instance(1), [[1]])
    if isinstance(body, list) and body and "request_id" in body[0] and body[0]["request_id"] == "a":
        body[0]["request_id"] = ids[0]
    resp = api.post("/api/v1/deployments/churn/feedback", body)
    assert resp.status_code == status, resp.content
    assert resp.json()["error"]["code"] == code
    assert not FeedbackMinute.objects.exists() and not PendingLabel.objects.exists()


def test_ten_thousand_labels_in_one_call_are_accepted(api, fleet):
    ids = _feed(fleet.instance(1), [[i % 2] for i in range(10_000)], spacing=0.01)
    resp = api.post(
        "/api/v1/deployments/churn/feedback", [{"request_id": i, "label": 1} for i in ids]
    )
    assert resp.status_code == 200 and resp.json()["matched"] == 10_000
    assert _metric(api, "churn", "accuracy", T0, T0 + 600, 600)[0]["value"] == 0.5


def test_feedback_needs_the_monitoring_write_scope(api_as, user, fleet):
    ids = _feed(fleet.instance(1), [[1]])
    reader = api_as(user, ["read"])
    resp = reader.post("/api/v1/deployments/churn/feedback", [{"request_id": ids[0], "label": 1}])
    assert resp.status_code == 403
    writer = api_as(user, ["monitoring:write"])
    assert (
        writer.post(
            "/api/v1/deployments/churn/feedback", [{"request_id": ids[0], "label": 1}]
        ).status_code
        == 200
    )


def test_feedback_for_an_unknown_deployment_is_404(api, db):
    resp = api.post("/api/v1/deployments/nope/feedback", [{"request_id": "a", "label": 1}])
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("request_id", ["has space", "x" * 201, "tab\tin", "nul\x00", "é"])
def test_request_ids_the_server_would_not_accept_are_400(api, fleet, request_id):
    resp = api.post("/api/v1/deployments/churn/feedback", [{"request_id": request_id, "label": 1}])
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request_id"
