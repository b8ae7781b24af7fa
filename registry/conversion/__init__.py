"""Verified ONNX conversion (and quantization) of a registered version, as a job kind.

``run(ctx)`` is the "convert" job's handler (the jobs framework gives it a JobContext: input,
owner, workdir, state, progress/log/checkpoint/cancelled/commit). It

1. builds (or reuses) the model's own environment plus the converter packages of its flavor
   (runner.conversion_environment: deployments/environments.py, the local runtime's builder);
2. runs worker/convert_model.py there, in the local runtime's sandbox: the model is loaded by
   its own framework in that process only, never in the web or worker process; the script
   converts, verifies the ONNX model against the original on rows built from the version's
   input example, drift reference and signature (rows.py), and benchmarks both;
3. on a passed verification, registers the ONNX model (MLflow onnx flavor) as a new version of
   the same registered model through registry.services (audited), tagged with its lineage
   (LINEAGE_TAGS), and returns ``{"version", "verification", "benchmark"}``. Right before
   registering it passes the job's commit point (``ctx.commit()``): a cancel asked before
   leaves nothing registered; one asked after is refused (409), the version is registered.

Failures raise errors.ConversionFailed (nothing registered). Resumable: a checkpoint after
the conversion (its report) and after the registration; a version already registered by this
job (tag ``controlplane.conversion.job``) is found again instead of registered twice.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .errors import ConversionCancelled, ConversionFailed

__all__ = [
    "ConversionCancelled",
    "ConversionFailed",
    "DEFAULT_TOLERANCES",
    "QUANTIZED_TOLERANCES",
    "run",
    "validate_input",
]

logger = logging.getLogger(__name__)

TARGETS = ("onnx",)
QUANTIZATIONS = ("dynamic-int8",)
VERIFY_ROWS = 512
BENCHMARK_SECONDS = 1.5  # each of the 4 measurements (1-row latency, 1,000-row throughput)
MAX_VERIFY_ROWS = 10_000
# Defaults (input "tolerances" overrides any of them). Errors are absolute, scaled by
# max(1, the largest |value| the original answered): float32 arithmetic in the converted model
# is what they allow for.
DEFAULT_TOLERANCES: dict[str, float] = {
    "label_agreement_min": 0.99,  # share of rows with the same predicted label
    "probability_max_abs_error": 1e-3,
    "max_abs_error": 1e-3,  # regression outputs and network outputs
    "mean_abs_error": 1e-4,
}
# With dynamic-int8 quantization: weights lose precision by design.
QUANTIZED_TOLERANCES: dict[str, float] = {
    "label_agreement_min": 0.95,
    "probability_max_abs_error": 0.05,
    "max_abs_error": 0.1,
    "mean_abs_error": 0.02,
}
TAG = "controlplane.conversion."
LINEAGE_TAGS = (
    "source_version",
    "flavor",
    "converter",
    "opset",
    "quantization",
    "verification",
    "benchmark",
    "job",
)


def validate_input(data: Any) -> dict:
    """The job input, normalized; ConversionFailed (a 400 at submission) when it is bad."""
    if not isinstance(data, dict):
        raise ConversionFailed("the input must be an object")
    known = {"model", "version", "target", "quantize", "opset", "tolerances", "rows"}
    known.update(("labelled_reference", "benchmark_seconds"))
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConversionFailed(f"unknown input field(s): {', '.join(unknown)}")
    target = data.get("target") or "onnx"
    if target not in TARGETS:
        raise ConversionFailed(f"target {target!r} is not supported (onnx)")
    quantize = data.get("quantize")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ConversionFailed(f"quantize {quantize!r} is not supported (null or dynamic-int8)")
    opset = data.get("opset")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool)):
        raise ConversionFailed("opset must be an integer or null")
    if opset is not None and not 7 <= opset <= 30:
        raise ConversionFailed("opset must be between 7 and 30")
    tolerances = dict(QUANTIZED_TOLERANCES if quantize else DEFAULT_TOLERANCES)
    given = data.get("tolerances") or {}
    if not isinstance(given, dict):
        raise ConversionFailed("tolerances must be an object")
    for key, value in given.items():
        if key not in DEFAULT_TOLERANCES:
            raise ConversionFailed(
                f"unknown tolerance {key!r} (one of {', '.join(DEFAULT_TOLERANCES)})"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (key == "label_agreement_min" and value > 1)
        ):
            raise ConversionFailed(f"tolerance {key} must be a number >= 0 (<= 1 for agreement)")
        tolerances[key] = float(value)
    rows = data.get("rows", VERIFY_ROWS)
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= MAX_VERIFY_ROWS:
        raise ConversionFailed(f"rows must be an integer from 1 to {MAX_VERIFY_ROWS}")
    labelled = data.get("labelled_reference")
    if labelled is not None:
        if (
            not isinstance(labelled, dict)
            or not isinstance(labelled.get("rows"), list)
            or not isinstance(labelled.get("labels"), list)
            or len(labelled["rows"]) != len(labelled["labels"])
            or not labelled["rows"]
            or len(labelled["rows"]) > MAX_VERIFY_ROWS
        ):
            raise ConversionFailed(
                "labelled_reference must be {rows: [[...]], labels: [...]} of the same length"
            )
    bench = data.get("benchmark_seconds", BENCHMARK_SECONDS)
    if isinstance(bench, bool) or not isinstance(bench, int | float) or not 0.05 <= bench <= 30:
        raise ConversionFailed("benchmark_seconds must be a number from 0.05 to 30")
    if not data.get("model") or data.get("version") in (None, ""):
        raise ConversionFailed("model and version are required")
    return {
        "model": str(data["model"]),
        "version": str(data["version"]),
        "target": target,
        "quantize": quantize,
        "opset": opset,
        "tolerances": tolerances,
        "rows": rows,
        "labelled_reference": labelled,
        "benchmark_seconds": float(bench),
    }


def _source(name: str, version: str):
    from controlplane.lib.errors import ApplicationError
    from registry import selectors

    try:
        model = selectors.registered_model_get(name=name)
        return selectors.model_version_get(model=model, version=version)
    except ApplicationError as exc:
        raise ConversionFailed(str(exc)) from None


def _reference_profile(mv) -> dict | None:
    from monitoring.models import DriftReference

    reference = DriftReference.objects.filter(model_version=mv, active=True).first()
    return reference.profile if reference is not None else None


def _already_registered(mv, job_id: int):
    from registry.models import ModelVersion

    for candidate in ModelVersion.objects.filter(model=mv.model).order_by("-version"):
        if (candidate.tags or {}).get(f"{TAG}job") == str(job_id):
            return candidate
    return None


def _result(version, report: dict) -> dict:
    return {
        "version": str(version),
        "verification": report["verification"],
        "benchmark": report["benchmark"],
        "converter": report["converter"],
        "opset": report["opset"],
        "quantization": report["quantization"],
        "conversion_seconds": report["conversion_seconds"],
    }


def run(ctx) -> dict:
    """The "convert" job: see the module docstring. Returns {"version", "verification",
    "benchmark", ...}; raises ConversionFailed."""
    from django.conf import settings

    from accounts.permissions import Right, user_can
    from deployments.model_files import ensure_model_files
    from registry import services

    from . import rows, runner

    data = validate_input(ctx.input)
    state = dict(ctx.state or {})
    if state.get("result"):
        return state["result"]
    if not user_can(ctx.owner, Right.REGISTRY_WRITE):
        raise ConversionFailed("the job's owner may not register versions (registry write)")
    source = _source(data["model"], data["version"])
    total = 4
    ctx.progress(0, total)
    model_dir, _sha = ensure_model_files(source.model.name, source.version)
    flavor = runner.model_flavor(Path(model_dir))
    ctx.log(f"{source}: {flavor} model; converting to {data['target']}")
    if data["quantize"] and flavor not in ("pytorch", "keras", "tensorflow"):
        raise ConversionFailed(
            f"{data['quantize']} quantization is for neural networks (PyTorch, Keras); "
            f"{source} is a {flavor} model"
        )
    spec = rows.input_spec(source.signature)
    verify_rows, origin = rows.verification_rows(
        spec=spec,
        example=source.input_example,
        profile=_reference_profile(source),
        n=data["rows"],
    )
    labels = None
    labelled = data["labelled_reference"]
    if labelled is not None:
        verify_rows = labelled["rows"] + verify_rows
        labels = labelled["labels"]
        origin["labelled_reference"] = len(labelled["rows"])
    ctx.log(
        "verification rows: "
        + ", ".join(f"{count} from {where.replace('_', ' ')}" for where, count in origin.items())
    )

    out_dir = Path(ctx.workdir) / "out"
    report = state.get("report")
    if not (report and report.get("ok") and (out_dir / "model" / "MLmodel").is_file()):
        resolved = runner.conversion_environment(Path(model_dir), flavor)
        python = runner.ensure_environment(
            runner.builder(Path(settings.DATA_DIR)), resolved, ctx.log, ctx.cancelled
        )
        ctx.progress(1, total)
        request = {
            "model_dir": str(model_dir),
            "out_dir": str(out_dir),
            "n_features": spec.n_features,
            "columns": spec.columns,
            "dtypes": spec.dtypes,
            "signature_inputs": spec.signature_inputs,
            "example_rows": rows.example_rows(source.input_example, spec)[:5] or verify_rows[:3],
            "rows": verify_rows,
            "labels": labels,
            "tolerances": data["tolerances"],
            "opset": data["opset"],
            "quantize": data["quantize"],
            "benchmark_seconds": data["benchmark_seconds"],
        }
        report = runner.run_worker(
            python=python,
            request=request,
            out_dir=out_dir,
            data_dir=Path(settings.DATA_DIR),
            job_id=int(ctx.job_id),
            log=ctx.log,
            cancelled=ctx.cancelled,
            labels=ctx.process_labels() if hasattr(ctx, "process_labels") else None,
        )
        if not report.get("ok"):
            stage = report.get("stage", "?")
            if report.get("traceback"):
                ctx.log(report["traceback"])
            raise ConversionFailed(f"{stage}: {report.get('reason', 'unknown failure')}")
        report["verification"]["rows_from"] = origin
        ctx.checkpoint({"stage": "converted", "report": report})
    ctx.progress(2, total)
    verification = report["verification"]
    ctx.log(f"verification passed: {json.dumps(_summary(verification))}")

    new = _already_registered(source, ctx.job_id)
    if new is None:
        # The commit point: raises JobCancelled if a cancel came first (nothing registered);
        # once it returns, a cancel is refused and the job ends with the version registered.
        # (Already passed on an attempt resuming a job whose worker died after it.)
        ctx.commit()
        tags = {
            f"{TAG}source_version": str(source.version),
            f"{TAG}flavor": flavor,
            f"{TAG}converter": report["converter"],
            f"{TAG}opset": str(report["opset"]),
            f"{TAG}quantization": report["quantization"] or "none",
            f"{TAG}verification": json.dumps(_summary(verification), sort_keys=True),
            f"{TAG}benchmark": json.dumps(report["benchmark"], sort_keys=True),
            f"{TAG}job": str(ctx.job_id),
        }
        quantized = f", {report['quantization']}" if report["quantization"] else ""
        new = services.model_version_register_converted(
            source=source,
            model_dir=out_dir / "model",
            tags=tags,
            description=f"ONNX conversion of v{source.version} ({report['converter']}{quantized})",
            actor=ctx.owner,
        )
    ctx.progress(3, total)
    result = _result(new.version, report)
    ctx.checkpoint({"stage": "registered", "report": report, "result": result})
    ctx.log(f"registered {new} (ONNX) from v{source.version}")
    ctx.progress(total, total)
    return result


def _summary(verification: dict) -> dict:
    """The verification figures kept on the version (no tolerances echo, rounded)."""
    keep = {}
    for key, value in verification.items():
        if key in ("tolerances", "failures"):
            continue
        keep[key] = round(value, 8) if isinstance(value, float) else value
    return keep


def lineage(mv) -> dict | None:
    """The conversion tags of a version, parsed ({} keys without the prefix), or None."""
    tags = mv.tags or {}
    if f"{TAG}source_version" not in tags:
        return None
    out: dict[str, Any] = {}
    for key in LINEAGE_TAGS:
        value = tags.get(f"{TAG}{key}")
        if key in ("verification", "benchmark") and value:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


FIGURES = (
    ("latency_p50_ms_1_row", "latency p50, 1 row (ms)"),
    ("rows_per_second_1000_rows", "throughput, 1,000 rows (rows/s)"),
    ("size_bytes", "size (bytes)"),
)


def _fmt(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def side_by_side(lineage_: dict) -> list[dict]:
    """Rows of {label, original, converted} from a converted version's benchmark."""
    bench = lineage_.get("benchmark") if isinstance(lineage_.get("benchmark"), dict) else {}
    rows = []
    for key, label in FIGURES:
        rows.append(
            {
                "label": label,
                "original": _fmt((bench.get("original") or {}).get(key)),
                "converted": _fmt((bench.get("converted") or {}).get(key)),
            }
        )
    return rows


def verification_items(lineage_: dict) -> list[tuple[str, str]]:
    verification = lineage_.get("verification")
    if not isinstance(verification, dict):
        return []
    return [
        (key.replace("_", " "), _fmt(value) if not isinstance(value, dict) else json.dumps(value))
        for key, value in sorted(verification.items())
    ]


def comparison_rows(ordered: list) -> list[dict]:
    """The compare page's "Conversion" rows: per version its lineage and figures; a source
    version shows the figures measured for it by a conversion among ``ordered``."""
    lineages = [lineage(mv) for mv in ordered]
    if not any(lineages):
        return []
    originals: dict[str, dict] = {}
    for item in lineages:
        if item and isinstance(item.get("benchmark"), dict):
            originals.setdefault(str(item["source_version"]), item["benchmark"].get("original"))
    rows = []

    def add(key: str, values: list) -> None:
        rows.append({"key": key, "values": values, "differs": len({repr(v) for v in values}) > 1})

    for key in ("source_version", "converter", "opset", "quantization"):
        add(key, [item.get(key) if item else None for item in lineages])
    for key in ("label_agreement", "max_abs_error", "probability_max_abs_error"):
        add(
            f"verification.{key}",
            [
                _fmt((item.get("verification") or {}).get(key)) if item else None
                for item in lineages
            ],
        )
    for key, label in FIGURES:
        values = []
        for mv, item in zip(ordered, lineages, strict=True):
            if item and isinstance(item.get("benchmark"), dict):
                values.append(_fmt((item["benchmark"].get("converted") or {}).get(key)))
            else:
                values.append(_fmt((originals.get(str(mv.version)) or {}).get(key)))
        add(label, values)
    return rows


def conversions_of(mv) -> list:
    """Versions of mv's model converted from mv."""
    from registry.models import ModelVersion

    return [
        other
        for other in ModelVersion.objects.filter(model=mv.model).order_by("version")
        if (other.tags or {}).get(f"{TAG}source_version") == str(mv.version)
    ]
