"""Drift references (from the input example logged with a model version, or an uploaded
dataset) and the hourly counts of pulled inputs in their bins."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from audit.services import audit_record
from controlplane.lib.errors import ApplicationError
from deployments.models import Deployment
from registry.models import ModelVersion

from .. import scoring
from ..models import (
    DriftHour,
    DriftReference,
)

logger = logging.getLogger(__name__)

REFERENCE_MAX_ROWS = 100_000


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


def _hour(ts: float) -> int:
    return int(ts // 3600 * 3600)


def example_columns(example: Any) -> dict[str, list] | None:
    """``{column: [values]}`` from an input example or a dataset in one of MLflow's JSON
    shapes (split, records, columns), or None."""
    if isinstance(example, dict):
        for key in ("dataframe_split", "dataframe_records", "inputs", "instances"):
            if key in example and len(example) == 1:
                return example_columns(example[key])
        if isinstance(example.get("columns"), list) and isinstance(example.get("data"), list):
            columns = [str(c) for c in example["columns"]]
            out: dict[str, list] = {c: [] for c in columns}
            for row in example["data"]:
                if not isinstance(row, list) or len(row) != len(columns):
                    return None
                for c, v in zip(columns, row, strict=True):
                    out[c].append(v)
            return out
        if example and all(isinstance(v, list) for v in example.values()):
            return {str(k): list(v) for k, v in example.items()}
        if example and all(not isinstance(v, dict | list) for v in example.values()):
            return {str(k): [v] for k, v in example.items()}
        return None
    if isinstance(example, list) and example and all(isinstance(r, dict) for r in example):
        out = defaultdict(list)
        for row in example:
            for k, v in row.items():
                out[str(k)].append(v)
        return dict(out)
    return None


def _reference_for(model_version_id: int) -> DriftReference | None:
    reference = DriftReference.objects.filter(
        model_version_id=model_version_id, active=True
    ).first()
    if reference is not None:
        return reference
    mv = ModelVersion.objects.filter(pk=model_version_id).first()
    columns = example_columns(mv.input_example) if mv else None
    profile = scoring.build_profile(columns) if columns else {}
    if not profile:
        return None
    try:
        with transaction.atomic():  # a savepoint: a concurrent creator may win the constraint
            return DriftReference.objects.create(
                model_version=mv,
                source=DriftReference.Source.INPUT_EXAMPLE,
                active=True,
                n_rows=max(len(v) for v in columns.values()),
                profile=profile,
            )
    except IntegrityError:
        pass
    return DriftReference.objects.filter(model_version_id=model_version_id, active=True).first()


def _drift_count(
    deployment_id: int, inputs_by_version: dict[int, list[tuple[float, dict]]]
) -> None:
    deployment = Deployment.objects.filter(pk=deployment_id).values("model_id").first()
    if deployment is None:
        return
    versions = dict(
        ModelVersion.objects.filter(
            model_id=deployment["model_id"], version__in=list(inputs_by_version)
        ).values_list("version", "pk")
    )
    additions: dict[tuple[int, int, int, str], list[int]] = {}
    totals: dict[tuple[int, int, int, str], int] = defaultdict(int)
    for version, entries in inputs_by_version.items():
        if version not in versions:
            continue
        reference = _reference_for(versions[version])
        if reference is None:
            continue
        by_hour: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for ts, inputs in entries:
            hour = _hour(ts)
            for feature, values in inputs.items():
                if feature in reference.profile and isinstance(values, list):
                    by_hour[hour][feature].extend(values)
        for hour, features in by_hour.items():
            for feature, values in features.items():
                counts = scoring.bin_counts(reference.profile[feature], values)
                key = (version, reference.pk, hour, feature)
                additions[key] = counts
                totals[key] = sum(counts)
    if not additions:
        return
    DriftHour.objects.bulk_create(
        [
            DriftHour(
                deployment_id=deployment_id,
                model_version=v,
                reference_id=r,
                bucket=h,
                feature=f,
                counts=[0] * len(c),
                n=0,
            )
            for (v, r, h, f), c in additions.items()
        ],
        ignore_conflicts=True,
    )
    hours = {k[2] for k in additions}
    rows = (
        DriftHour.objects.select_for_update()
        .filter(
            deployment_id=deployment_id,
            bucket__in=hours,
            reference_id__in={k[1] for k in additions},
        )
        .order_by("pk")
    )
    changed = []
    for row in rows:
        key = (row.model_version, row.reference_id, row.bucket, row.feature)
        if key in additions:
            add = additions[key]
            row.counts = (
                [a + b for a, b in zip(row.counts, add, strict=False)] if row.counts else add
            )
            row.n += totals[key]
            changed.append(row)
    DriftHour.objects.bulk_update(changed, ["counts", "n"], batch_size=500)


REFERENCE_MAX_BYTES = 50 * 1024 * 1024


def _csv_value(text: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        return text if text != "" else None
    return (
        int(number)
        if number.is_integer() and "." not in text and "e" not in text.lower()
        else number
    )


def dataset_from_file(*, content: bytes, filename: str) -> Any:
    """A reference dataset from an uploaded file: CSV with a header row (numbers parsed as
    numbers), or JSON in one of the shapes ``drift_reference_upload`` takes."""
    if len(content) > REFERENCE_MAX_BYTES:
        raise ApplicationError(
            f"at most {REFERENCE_MAX_BYTES // (1024 * 1024)} MB",
            code="dataset_too_large",
            status_code=413,
        )
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApplicationError("the file is not UTF-8 text", code="invalid_dataset") from None
    if filename.lower().endswith(".json") or text.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ApplicationError(f"the file is not JSON: {exc}", code="invalid_dataset") from None
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2 or not rows[0]:
        raise ApplicationError(
            "a CSV reference needs a header row and at least one data row", code="invalid_dataset"
        )
    header = rows[0]
    data = []
    for number, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise ApplicationError(
                f"CSV line {number} has {len(row)} fields, the header {len(header)}",
                code="invalid_dataset",
            )
        data.append([_csv_value(v) for v in row])
    return {"columns": header, "data": data}


@transaction.atomic
def drift_reference_upload(
    *, model_version: ModelVersion, dataset: Any, actor: AbstractBaseUser | None
) -> DriftReference:
    """Make an uploaded dataset (MLflow split, records or columns JSON) the drift reference of
    a model version. Later windows are compared with it; earlier ones keep theirs."""
    columns = example_columns(dataset)
    if not columns:
        raise ApplicationError(
            'the dataset must be {"columns": [...], "data": [[...], ...]}, a list of records or {column: [values]}',
            code="invalid_dataset",
        )
    if _has_nul(columns):
        raise ApplicationError("the dataset contains NUL characters", code="invalid_dataset")
    n_rows = max(len(v) for v in columns.values())
    if n_rows > REFERENCE_MAX_ROWS:
        raise ApplicationError(
            f"at most {REFERENCE_MAX_ROWS} rows", code="dataset_too_large", status_code=413
        )
    profile = scoring.build_profile(columns)
    if not profile:
        raise ApplicationError("the dataset has no usable column", code="invalid_dataset")
    DriftReference.objects.filter(model_version=model_version, active=True).update(active=False)
    reference = DriftReference.objects.create(
        model_version=model_version,
        source=DriftReference.Source.DATASET,
        active=True,
        n_rows=n_rows,
        profile=profile,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    audit_record(
        actor=actor,
        action="monitoring.drift_reference",
        object_type="model_version",
        object_id=f"{model_version.model.name}/{model_version.version}",
        object_repr=str(model_version),
        after={"rows": n_rows, "features": sorted(profile)},
        system="monitoring",
    )
    return reference
