"""Ground truth: labels posted for earlier predictions, paired with what the model said, and
the confusion counts of each minute (recomputed from the pairs whenever labels arrive)."""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record
from controlplane.lib.errors import ApplicationError
from deployments.models import Deployment

from ..models import (
    FeedbackMinute,
    FeedbackPair,
    PendingLabel,
    Prediction,
)

logger = logging.getLogger(__name__)

FEEDBACK_MAX_ITEMS = 10_000
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")  # what the model server accepts as X-Request-Id


@dataclass
class FeedbackResult:
    received: int
    matched: int
    pending: int  # kept; applied when their predictions are collected
    pending_request_ids: list[str]
    unknown: int  # not kept: their labels waited past the retention period
    unknown_request_ids: list[str]
    mismatched: int
    mismatched_request_ids: list[str]
    pairs: int


def feedback_validate(items: Any) -> list[dict]:
    """The shape rules of a feedback call; the API answers 400 (413 when too many)."""
    if not isinstance(items, list):
        raise ApplicationError(
            'the body must be a JSON list of {"request_id", "label"}', code="invalid_feedback"
        )
    if len(items) > FEEDBACK_MAX_ITEMS:
        raise ApplicationError(
            f"at most {FEEDBACK_MAX_ITEMS} items per call; got {len(items)}",
            code="too_many_items",
            status_code=413,
        )
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApplicationError(
                f"item {i} is not an object", code="invalid_feedback", details={"index": i}
            )
        request_id = item.get("request_id")
        if not isinstance(request_id, str) or not request_id.strip():
            raise ApplicationError(
                f"item {i} has no request_id", code="missing_request_id", details={"index": i}
            )
        if not REQUEST_ID.match(request_id):
            raise ApplicationError(
                f"item {i}: a request_id is 1 to 200 printable ASCII characters",
                code="invalid_request_id",
                details={"index": i},
            )
        if "label" not in item or item["label"] is None:
            raise ApplicationError(
                f"item {i} has no label", code="missing_label", details={"index": i}
            )
        label = item["label"]
        values = label if isinstance(label, list) else [label]
        if not all(isinstance(v, str | int | float | bool) for v in values) or any(
            isinstance(v, float) and not math.isfinite(v) for v in values
        ):
            raise ApplicationError(
                f"item {i}: a label is a number, a string, a boolean or a list of them",
                code="invalid_feedback",
                details={"index": i},
            )
        if any(isinstance(v, str) and (len(v) > 1000 or "\x00" in v) for v in values):
            raise ApplicationError(
                f"item {i}: a label is at most 1000 characters, without NUL",
                code="invalid_feedback",
                details={"index": i},
            )
    return items


def _row_output(value: Any) -> Any:
    """The predicted value of one row, if it is a scalar (or wraps one)."""
    if isinstance(value, dict):
        for key in ("label", "prediction", "predicted_label", "class"):
            if key in value:
                return _row_output(value[key])
        return _row_output(next(iter(value.values()))) if len(value) == 1 else None
    if isinstance(value, list):
        return _row_output(value[0]) if len(value) == 1 else None
    return value


def _categorical(value: Any) -> str:
    if isinstance(value, bool | str):
        return json.dumps(value)
    if isinstance(value, int):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return json.dumps(int(value))
    return ""


def _numeric(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _pairs_for(prediction: Prediction, label: Any) -> list[FeedbackPair] | None:
    outputs = prediction.outputs if isinstance(prediction.outputs, list) else [prediction.outputs]
    if isinstance(label, list):
        if len(label) != len(outputs):
            return None
        labels = label
    else:
        if len(outputs) != 1:
            return None
        labels = [label]
    pairs = []
    for row, (output, truth) in enumerate(zip(outputs, labels, strict=True)):
        predicted = _row_output(output)
        if predicted is None:
            return None
        y_true, y_pred = _categorical(truth), _categorical(predicted)
        if not (y_true and y_pred):
            y_true = y_pred = ""
        t_num, p_num = _numeric(truth), _numeric(predicted)
        if t_num is None or p_num is None:
            t_num = p_num = None
        pairs.append(
            FeedbackPair(
                prediction=prediction,
                deployment_id=prediction.deployment_id,
                model_version=prediction.model_version,
                ts=prediction.ts,
                row=row,
                y_true=y_true,
                y_pred=y_pred,
                y_true_num=t_num,
                y_pred_num=p_num,
            )
        )
    return pairs


def _label_predictions(
    deployment_id: int, labels: dict[str, Any]
) -> tuple[set[str], list[str], int, set]:
    """Replace the pairs of the predictions these labels belong to. Returns the matched
    request ids, the mismatched ones, the pairs written and the (version, minute) windows touched."""
    matched: set[str] = set()
    mismatched: list[str] = []
    windows: set[tuple[int, int]] = set()
    new_pairs: list[FeedbackPair] = []
    relabeled: list[int] = []
    ids = list(labels)
    for i in range(0, len(ids), 500):
        for prediction in Prediction.objects.filter(
            deployment_id=deployment_id, request_id__in=ids[i : i + 500]
        ):
            matched.add(prediction.request_id)
            pairs = _pairs_for(prediction, labels[prediction.request_id])
            if pairs is None:
                mismatched.append(prediction.request_id)
                continue
            relabeled.append(prediction.pk)
            new_pairs.extend(pairs)
            windows.add((prediction.model_version, int(prediction.ts.timestamp()) // 60 * 60))
    if relabeled:
        for i in range(0, len(relabeled), 500):
            FeedbackPair.objects.filter(prediction_id__in=relabeled[i : i + 500]).delete()
            Prediction.objects.filter(pk__in=relabeled[i : i + 500]).update(
                labeled_at=timezone.now()
            )
        FeedbackPair.objects.bulk_create(new_pairs, batch_size=1000)
        _feedback_windows_refresh(deployment_id, windows)
    return matched, mismatched, len(new_pairs), windows


def _feedback_windows_refresh(deployment_id: int, windows: set[tuple[int, int]]) -> None:
    """Recompute the confusion counts of these (version, minute) windows from their pairs:
    level-triggered, so applying the same labels twice gives the same windows."""
    by_version: dict[int, list[int]] = defaultdict(list)
    for version, minute in windows:
        by_version[version].append(minute)
    for version, minutes in by_version.items():
        minutes.sort()
        spans: list[list[int]] = []
        for minute in minutes:
            if spans and minute - spans[-1][1] <= 3600:
                spans[-1][1] = minute
            else:
                spans.append([minute, minute])
        wanted = set(minutes)
        confusion: dict[int, Counter] = defaultdict(Counter)
        for first, last in spans:
            rows = (
                FeedbackPair.objects.filter(
                    deployment_id=deployment_id,
                    model_version=version,
                    ts__gte=datetime.fromtimestamp(first, tz=UTC),
                    ts__lt=datetime.fromtimestamp(last + 60, tz=UTC),
                )
                .exclude(y_true="")
                .values_list("ts", "y_true", "y_pred")
            )
            for ts, y_true, y_pred in rows:
                minute = int(ts.timestamp()) // 60 * 60
                if minute in wanted:
                    confusion[minute][(y_true, y_pred)] += 1
        FeedbackMinute.objects.filter(
            deployment_id=deployment_id, model_version=version, bucket__in=minutes
        ).delete()
        FeedbackMinute.objects.bulk_create(
            [
                FeedbackMinute(
                    deployment_id=deployment_id,
                    model_version=version,
                    bucket=minute,
                    n=sum(counts.values()),
                    confusion=[[t, p, c] for (t, p), c in sorted(counts.items())],
                )
                for minute, counts in confusion.items()
            ]
        )


def _apply_pending_labels(deployment_id: int, request_ids: set[str]) -> None:
    ids = list(request_ids)
    pending: dict[str, Any] = {}
    for i in range(0, len(ids), 500):
        pending.update(
            PendingLabel.objects.filter(
                deployment_id=deployment_id, request_id__in=ids[i : i + 500]
            ).values_list("request_id", "label")
        )
    if not pending:
        return
    matched, _mismatched, _pairs, _windows = _label_predictions(deployment_id, pending)
    done = list(matched)
    for i in range(0, len(done), 500):
        PendingLabel.objects.filter(
            deployment_id=deployment_id, request_id__in=done[i : i + 500]
        ).delete()


@transaction.atomic
def feedback_record(
    *, deployment: Deployment, items: list[dict], actor: AbstractBaseUser | None
) -> FeedbackResult:
    """Ground truth for earlier predictions. Labels for predictions not pulled yet are kept
    (for CONTROLPLANE_PREDICTION_RETENTION_DAYS) and applied when they arrive: reported as
    pending. A label posted again after waiting longer than that is dropped and reported as
    unknown: its prediction expired (or never existed)."""
    items = feedback_validate(items)
    labels = {item["request_id"]: item["label"] for item in items}  # the last label of an id wins
    matched, mismatched, pairs, windows = _label_predictions(deployment.pk, labels)
    unmatched = [rid for rid in labels if rid not in matched]
    expired: set[str] = set()
    if unmatched:
        cutoff = timezone.now() - timedelta(days=settings.CONTROLPLANE_PREDICTION_RETENTION_DAYS)
        existing: dict[str, datetime] = {}
        for i in range(0, len(unmatched), 500):
            existing.update(
                PendingLabel.objects.filter(
                    deployment=deployment, request_id__in=unmatched[i : i + 500]
                ).values_list("request_id", "received_at")
            )
        expired = {rid for rid, received in existing.items() if received < cutoff}
        for i in range(0, len(expired), 500):
            PendingLabel.objects.filter(
                deployment=deployment, request_id__in=sorted(expired)[i : i + 500]
            ).delete()
        PendingLabel.objects.bulk_create(
            [
                PendingLabel(deployment=deployment, request_id=rid, label=labels[rid])
                for rid in unmatched
                if rid not in existing
            ],
            batch_size=1000,
        )
        for rid in existing.keys() - expired:
            PendingLabel.objects.filter(deployment=deployment, request_id=rid).update(
                label=labels[rid], received_at=timezone.now()
            )
    pending = [rid for rid in unmatched if rid not in expired]
    unknown = [rid for rid in unmatched if rid in expired]
    result = FeedbackResult(
        received=len(items),
        matched=len(matched) - len(mismatched),
        pending=len(pending),
        pending_request_ids=pending[:100],
        unknown=len(unknown),
        unknown_request_ids=unknown[:100],
        mismatched=len(mismatched),
        mismatched_request_ids=mismatched[:100],
        pairs=pairs,
    )
    audit_record(
        actor=actor,
        action="monitoring.feedback",
        object_type="deployment",
        object_id=deployment.name,
        object_repr=deployment.name,
        after={
            "received": result.received,
            "matched": result.matched,
            "pending": result.pending,
            "unknown": result.unknown,
            "mismatched": result.mismatched,
            "pairs": pairs,
            "windows": len(windows),
        },
        system="monitoring",
    )
    return result
