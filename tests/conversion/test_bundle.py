"""The edge bundle: an ONNX version as a zip that runs in a clean venv with onnxruntime and
numpy only (the venv cached under ~/.cache/controlplane/, keyed by its requirements)."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.django_db


def clean_python(requirements: list[str]) -> Path:
    """A venv with nothing but ``requirements`` (built once per requirement set)."""
    key = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "controlplane"
    venv = root / f"edge-bundle-{key}"
    python = venv / "bin" / "python"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".edge-bundle-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            subprocess.run([sys._base_executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", *requirements],
                check=True,
                timeout=600,
            )
            (venv / ".complete").touch()
    return python


@pytest.fixture
def onnx_version(framework_model, converter_user, register):
    """An ONNX version (skl2onnx, saved with mlflow.onnx by tests/frameworks' trainer)."""
    trained = framework_model("onnx")
    return register(trained.model_dir, converter_user), trained


def test_the_bundle_of_an_onnx_version_runs_in_a_clean_venv(
    onnx_version, converter_user, client, tmp_path
):
    mv, trained = onnx_version
    client.force_login(converter_user)
    url = f"/api/v1/models/{mv.model.name}/versions/{mv.version}/bundle"
    response = client.get(url)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "bundle")
    assert {"model.onnx", "signature.json", "input_example.json", "MANIFEST.sha256", "run.py"} <= (
        names
    )
    bundle = tmp_path / "bundle"
    manifest = dict(
        reversed(line.split("  ", 1))
        for line in (bundle / "MANIFEST.sha256").read_text().split("\n")
        if line
    )
    assert set(manifest) == names - {"MANIFEST.sha256"}
    for name, digest in manifest.items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
    requirements = (bundle / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in requirements] == ["onnxruntime", "numpy"]

    python = clean_python(requirements)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    (tmp_path / "rows.json").write_text(
        json.dumps({"columns": trained.columns, "data": trained.rows})
    )
    done = subprocess.run(
        [str(python), "-I", str(bundle / "run.py"), str(tmp_path / "rows.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    outputs = json.loads(done.stdout)["outputs"]
    assert outputs["label"] == trained.expected["predict"]["value"]
    np.testing.assert_allclose(
        outputs["probabilities"], trained.expected["predict_proba"]["value"], rtol=1e-6
    )
    example = subprocess.run(
        [str(python), "-I", str(bundle / "run.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert example.returncode == 0, example.stderr
    assert len(json.loads(example.stdout)["outputs"]["label"]) == 3  # the 3-row input example

    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b"\0")
    tampered = subprocess.run(
        [str(python), "-I", str(bundle / "run.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert tampered.returncode != 0 and "checksum mismatch: model.onnx" in tampered.stderr


def test_a_version_that_is_not_onnx_has_no_bundle(sklearn_models, converter_user, register, client):
    mv = register(sklearn_models["logreg"][0], converter_user)
    client.force_login(converter_user)
    response = client.get(f"/api/v1/models/{mv.model.name}/versions/{mv.version}/bundle")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "not_onnx"
    assert "not an ONNX model (flavors: sklearn)" in response.json()["error"]["message"]
