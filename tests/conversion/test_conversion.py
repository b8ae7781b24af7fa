"""ONNX conversion as a job kind: real models, real converters in the model's own (built)
environment, sandboxed; the registered ONNX version predicts what the original does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from audit.models import AuditEvent
from registry import conversion
from registry.conversion import ConversionFailed
from registry.models import ModelVersion
from tests.conversion.conftest import data
from tests.conversion.context import FakeJobContext

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    # a loaded 2-core machine takes minutes to import torch in a fresh environment
    pytest.mark.timeout(900),
]


def _onnx_session(mv: ModelVersion):
    import onnxruntime

    from deployments.model_files import ensure_model_files

    model_dir, _ = ensure_model_files(mv.model.name, mv.version)
    return onnxruntime.InferenceSession(str(Path(model_dir) / "model.onnx"))


def _ctx(mv, user, tmp_path, **extra):
    extra.setdefault("benchmark_seconds", 0.2)
    return FakeJobContext(
        input={"model": mv.model.name, "version": str(mv.version), "target": "onnx", **extra},
        owner=user,
        workdir=tmp_path / "job",
    )


def test_a_scikit_learn_pipeline_converts_to_an_onnx_version_that_predicts_the_same(
    sklearn_models, converter_user, register, tmp_path, client
):
    model_dir, estimator = sklearn_models["logreg"]
    source = register(model_dir, converter_user)
    ctx = _ctx(source, converter_user, tmp_path)

    result = conversion.run(ctx)

    new = ModelVersion.objects.get(model=source.model, version=int(result["version"]))
    assert new.version == source.version + 1
    assert "onnx" in new.flavors
    lineage = conversion.lineage(new)
    assert lineage["source_version"] == str(source.version)
    assert lineage["converter"].startswith("skl2onnx ")
    assert lineage["verification"]["label_agreement"] == 1.0
    assert result["verification"]["passed"] is True
    bench = result["benchmark"]
    assert bench["converted"]["latency_p50_ms_1_row"] > 0
    assert bench["original"]["rows_per_second_1000_rows"] > 0
    # Independently of the job's own verification: the registered file, run here.
    session = _onnx_session(new)
    X, _ = data(50, 7)
    label, proba = session.run(None, {"input": X.to_numpy(np.float32)})
    assert (label == estimator.predict(X)).all()
    np.testing.assert_allclose(proba, estimator.predict_proba(X), atol=1e-5)
    assert proba.shape == (50, 2)  # ZipMap off: one tensor, not a list of dicts
    assert ctx.state["stage"] == "registered"
    event = AuditEvent.objects.get(action="version.convert")
    assert event.object_id == f"{source.model.name}/{new.version}"

    # side by side with its source on the version and compare pages
    client.force_login(converter_user)
    page = client.get(f"/models/{source.model.name}/versions/{new.version}/").content.decode()
    assert "Converted to ONNX from" in page and f">v{source.version}</a>" in page
    assert "Download the edge bundle" in page
    assert "latency p50, 1 row (ms)" in page
    source_page = client.get(f"/models/{source.model.name}/versions/{source.version}/")
    assert f"v{new.version}</a> <a" in source_page.content.decode()
    compare = client.get(
        f"/models/{source.model.name}/compare?versions={source.version},{new.version}"
    ).content.decode()
    assert "Conversion (ONNX)" in compare and "verification.label_agreement" in compare


def test_a_pytorch_mlp_converts_and_quantizes_with_the_accuracy_change_reported(
    framework_model, converter_user, register, tmp_path
):
    trained = framework_model("pytorch")
    source = register(trained.model_dir, converter_user)
    rows = np.asarray(trained.rows, dtype=np.float32)
    expected = np.asarray(trained.expected["predict"]["value"], dtype=np.float32)

    plain = conversion.run(_ctx(source, converter_user, tmp_path / "plain"))
    assert plain["verification"]["max_abs_error"] < 1e-4
    session = _onnx_session(ModelVersion.objects.get(model=source.model, version=plain["version"]))
    (out,) = session.run(None, {"input": rows})
    np.testing.assert_allclose(out, expected, atol=1e-5)

    labelled = {"rows": rows.tolist(), "labels": expected.argmax(axis=1).tolist()}
    ctx = _ctx(
        source, converter_user, tmp_path / "q", quantize="dynamic-int8", labelled_reference=labelled
    )
    quantized = conversion.run(ctx)
    print("\n".join(ctx.logs))
    new = ModelVersion.objects.get(model=source.model, version=quantized["version"])
    lineage = conversion.lineage(new)
    assert lineage["quantization"] == "dynamic-int8"
    assert lineage["source_version"] == str(source.version)
    accuracy = quantized["verification"]["accuracy"]
    assert accuracy["rows"] == len(rows) and accuracy["original"] == 1.0
    assert accuracy["change"] == accuracy["converted"] - accuracy["original"]
    # int8 weights: close to the float model, not equal
    assert (
        0
        < quantized["verification"]["max_abs_error"]
        < 0.1 * quantized["verification"]["error_scale"]
    )
    q_session = _onnx_session(new)
    (q_out,) = q_session.run(None, {"input": rows})
    assert np.abs(q_out - expected).max() < 0.2
    assert any(n.op_type.startswith(("DynamicQuantize", "MatMulInteger")) for n in _nodes(new))


def _nodes(mv):
    import onnx

    from deployments.model_files import ensure_model_files

    model_dir, _ = ensure_model_files(mv.model.name, mv.version)
    return onnx.load(str(Path(model_dir) / "model.onnx")).graph.node


def test_a_verification_that_fails_registers_nothing(
    sklearn_models, converter_user, register, tmp_path
):
    source = register(sklearn_models["logreg"][0], converter_user)
    # float32 arithmetic in onnxruntime: probabilities a few 1e-8 away, never exactly equal
    ctx = _ctx(source, converter_user, tmp_path, tolerances={"probability_max_abs_error": 0})
    with pytest.raises(
        ConversionFailed, match=r"verify: verification failed: probability max abs error .* > 0"
    ):
        conversion.run(ctx)
    assert ModelVersion.objects.filter(model=source.model).count() == 1
    assert "result" not in ctx.state


def test_an_estimator_the_converter_does_not_support_fails_with_the_converters_reason(
    sklearn_models, converter_user, register, tmp_path
):
    source = register(sklearn_models["hgb"][0], converter_user)
    with pytest.raises(ConversionFailed) as failure:
        conversion.run(_ctx(source, converter_user, tmp_path))
    message = str(failure.value)
    assert message.startswith("convert: ")
    assert "TreeEnsembleClassifier" in message  # skl2onnx's own words
    assert ModelVersion.objects.filter(model=source.model).count() == 1


def test_quantizing_a_tree_model_is_refused_before_any_work(
    sklearn_models, converter_user, register, tmp_path
):
    source = register(sklearn_models["forest"][0], converter_user)
    with pytest.raises(ConversionFailed, match="for neural networks"):
        conversion.run(_ctx(source, converter_user, tmp_path, quantize="dynamic-int8"))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"target": "tflite"}, "target 'tflite'"),
        ({"quantize": "int4"}, "quantize 'int4'"),
        ({"tolerances": {"max_abs_error": -1}}, "must be a number"),
        ({"tolerances": {"nope": 1}}, "unknown tolerance"),
        ({"opset": "17"}, "opset must be an integer"),
        ({"surprise": 1}, "unknown input field"),
    ],
)
def test_bad_input_is_refused_with_a_reason(bad, message):
    with pytest.raises(ConversionFailed, match=message):
        conversion.validate_input({"model": "m", "version": "1", **bad})


def test_defaults_are_documented_and_overridable():
    data = conversion.validate_input(
        {"model": "m", "version": "1", "tolerances": {"max_abs_error": 0.5}}
    )
    assert data["tolerances"] == {**conversion.DEFAULT_TOLERANCES, "max_abs_error": 0.5}
    quantized = conversion.validate_input(
        {"model": "m", "version": "1", "quantize": "dynamic-int8"}
    )
    assert quantized["tolerances"] == conversion.QUANTIZED_TOLERANCES


@pytest.mark.parametrize("framework", ["xgboost", "lightgbm"])
def test_a_gradient_boosted_tree_model_converts_with_onnxmltools(
    framework, framework_model, converter_user, register, tmp_path
):
    trained = framework_model(framework)
    source = register(trained.model_dir, converter_user)
    result = conversion.run(_ctx(source, converter_user, tmp_path))
    assert result["converter"].startswith("onnxmltools ")
    assert result["verification"]["label_agreement"] >= 0.99
    session = _onnx_session(ModelVersion.objects.get(model=source.model, version=result["version"]))
    label, proba = session.run(None, {"input": np.asarray(trained.rows, dtype=np.float32)})
    assert label.tolist() == trained.expected["predict"]["value"]
    np.testing.assert_allclose(proba, trained.expected["predict_proba"]["value"], atol=1e-5)
