"""ONNX conversion as a job kind: real models, real converters in the model's own (built)
environment, sandboxed; the registered ONNX version predicts what the original does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from registry import conversion
from registry.models import ModelVersion
from tests.conversion.conftest import data
from tests.conversion.context import FakeJobContext

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _onnx_session(mv: ModelVersion):
    import onnxruntime

    from deployments.model_files import ensure_model_files

    model_dir, _ = ensure_model_files(mv.model.name, mv.version)
    return onnxruntime.InferenceSession(str(Path(model_dir) / "model.onnx"))


def _ctx(mv, user, tmp_path, **extra):
    return FakeJobContext(
        input={"model": mv.model.name, "version": str(mv.version), "target": "onnx", **extra},
        owner=user,
        workdir=tmp_path / "job",
    )


def test_a_scikit_learn_pipeline_converts_to_an_onnx_version_that_predicts_the_same(
    sklearn_models, converter_user, register, tmp_path
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
