"""Uploading zipped MLflow models: accepted archives, and each bad-archive case."""

from __future__ import annotations

import io
import stat
import zipfile

import pytest
from django.test import override_settings

from audit.models import AuditEvent
from registry.mlflow_store import get_store
from registry.models import ModelVersion

pytestmark = pytest.mark.django_db


@pytest.fixture
def model(api, model_name):
    assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
    return model_name


def archive(entries: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in entries.items():
            zf.writestr(name, content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


MLMODEL = b"flavors:\n  python_function:\n    loader_module: mlflow.sklearn\n"


def test_upload_registers_a_version_with_its_signature(api, model, model_zip):
    resp = api.upload(f"/api/v1/models/{model}/versions", model_zip, description="uploaded")
    assert resp.status_code == 201, resp.content
    body = resp.json()
    assert body["version"] == "1" and body["description"] == "uploaded"
    assert [c["name"] for c in body["signature"]["inputs"]][:2] == ["f0", "f1"]
    assert body["input_example"] is not None
    # MLflow holds the files: the version downloads with its MLmodel.
    files = {p.name for p in get_store().download_version(model, 1, _tmp()).iterdir()}
    assert {"MLmodel", "model.skops"} <= files or {"MLmodel", "model.pkl"} <= files
    assert AuditEvent.objects.filter(action="version.register", object_id=f"{model}/1").exists()


def _tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp())


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (archive({"MLmodel": MLMODEL, "../evil.txt": b"x"}), "escapes the archive"),
        (archive({"MLmodel": MLMODEL, "a/../../evil.txt": b"x"}), "escapes the archive"),
        (archive({"MLmodel": MLMODEL, "./../evil.txt": b"x"}), "escapes the archive"),
        (archive({"MLmodel": MLMODEL, "/../evil.txt": b"x"}), "absolute path"),
        (archive({"MLmodel": MLMODEL, "..\\evil.txt": b"x"}), "backslash"),
        (archive({"MLmodel": MLMODEL, "/etc/cron.d/evil": b"x"}), "absolute path"),
        (archive({"MLmodel": MLMODEL, "C:/evil": b"x"}), "absolute path"),
        (archive({"MLmodel": MLMODEL, "a\\..\\..\\evil": b"x"}), "backslash"),
        (archive({"MLmodel": MLMODEL}, symlinks={"link": "/etc/passwd"}), "symbolic link"),
        (archive({"model.pkl": b"x"}), "MLmodel not found"),
        (archive({"model/MLmodel": MLMODEL}), "zip the model directory's contents"),
        (archive({"MLmodel": b"flavors: [unclosed"}), "not valid YAML"),
        (archive({"MLmodel": b"just a string"}), "no 'flavors'"),
        (b"this is not a zip", "not a valid zip"),
    ],
)
def test_bad_archives_are_refused_before_anything_is_written(api, model, payload, fragment):
    runs_before = _upload_runs()
    resp = api.upload(f"/api/v1/models/{model}/versions", payload)
    assert resp.status_code == 400, resp.content
    error = resp.json()["error"]
    assert error["code"] == "invalid_archive"
    assert fragment in error["message"]
    assert ModelVersion.objects.filter(model__name=model).count() == 0
    assert _upload_runs() == runs_before  # nothing reached MLflow


def _upload_runs() -> int:
    client = get_store().client
    experiment = client.get_experiment_by_name("controlplane-uploads")
    return 0 if experiment is None else len(client.search_runs([experiment.experiment_id]))


def test_too_many_entries_is_refused(api, model):
    payload = archive({"MLmodel": MLMODEL, **{f"f{i}": b"" for i in range(20)}})
    with override_settings(CONTROLPLANE_UPLOAD_MAX_ENTRIES=10):
        resp = api.upload(f"/api/v1/models/{model}/versions", payload)
    assert resp.status_code == 400
    assert "entries" in resp.json()["error"]["message"]


def test_oversized_archive_is_a_413(api, model, model_zip):
    with override_settings(CONTROLPLANE_UPLOAD_MAX_BYTES=1000):
        resp = api.upload(f"/api/v1/models/{model}/versions", model_zip)
    assert resp.status_code == 413
    assert ModelVersion.objects.filter(model__name=model).count() == 0


def test_zip_bomb_is_refused_by_its_uncompressed_size(api, model):
    payload = archive({"MLmodel": MLMODEL, "big": b"\0" * 5_000_000})
    with override_settings(CONTROLPLANE_UPLOAD_MAX_UNCOMPRESSED_BYTES=1_000_000):
        resp = api.upload(f"/api/v1/models/{model}/versions", payload)
    assert resp.status_code == 413


def test_source_and_artifact_together_are_refused(api, model, model_zip):
    resp = api.upload(f"/api/v1/models/{model}/versions", model_zip, source="runs:/abc/model")
    assert resp.status_code == 400


def test_upload_never_unpickles_the_model(api, model, make_model_zip, tmp_path, sklearn_model_dir):
    """A pickle that would run code when loaded is stored, not loaded."""
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "MLmodel").write_bytes(
        b"flavors:\n  python_function:\n    loader_module: mlflow.sklearn\n    model_path: model.pkl\n"
        b"  sklearn:\n    pickled_model: model.pkl\n    serialization_format: cloudpickle\n"
    )
    (tmp_path / "m" / "model.pkl").write_bytes(pickle.dumps(Evil()))
    from tests.conftest import zip_dir

    resp = api.upload(f"/api/v1/models/{model}/versions", zip_dir(tmp_path / "m"))
    assert resp.status_code == 201, resp.content
    assert not marker.exists()
