"""Upload inputs an attacker (or an unlucky operator) controls: zip bombs, odd entry
names, YAML alias bombs, oversized metadata; and what failed or abandoned uploads
leave behind (nothing, after the sweep)."""

from __future__ import annotations

import io
import os
import time
import tracemalloc
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
from django.conf import settings
from django.test import override_settings

from audit.models import AuditEvent
from registry.archives import load_yaml
from registry.mlflow_store import UPLOAD_EXPERIMENT, UPLOAD_TAG, get_store
from registry.models import ModelVersion
from registry.services import upload_leftovers_sweep

pytestmark = pytest.mark.django_db

MLMODEL = b"flavors:\n  python_function:\n    loader_module: mlflow.sklearn\n"
GIB = 1024**3


@pytest.fixture
def model(api, model_name):
    assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
    return model_name


def archive(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in entries.items():
            zf.writestr(name, content)
    return buf.getvalue()


def _upload_runs(*, all_stages: bool = False) -> list:
    from mlflow.entities import ViewType

    client = get_store().client
    experiment = client.get_experiment_by_name(UPLOAD_EXPERIMENT)
    if experiment is None:
        return []
    view = ViewType.ALL if all_stages else ViewType.ACTIVE_ONLY
    return client.search_runs([experiment.experiment_id], run_view_type=view)


def _tmp_entries() -> list[Path]:
    root = Path(settings.CONTROLPLANE_UPLOAD_TMP_DIR)
    return sorted(root.iterdir()) if root.is_dir() else []


def _refused(resp, status: int, fragment: str, model: str) -> None:
    assert resp.status_code == status, resp.content
    error = resp.json()["error"]
    assert error["code"] == "invalid_archive", error
    assert fragment in error["message"], error["message"]
    assert ModelVersion.objects.filter(model__name=model).count() == 0


# --- zip bombs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gib_mlmodel_zip(tmp_path_factory) -> bytes:
    """About 1 MB on the wire; its MLmodel entry expands to 1 GiB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    chunk = b"\n" * (1024 * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("MLmodel", "w", force_zip64=True) as dst:
            dst.write(MLMODEL)
            for _ in range(1024):
                dst.write(chunk)
    data = path.read_bytes()
    assert len(data) < 2 * 1024 * 1024
    return data


def test_a_1mb_archive_whose_mlmodel_expands_to_1gib_is_refused_without_using_the_memory(
    api, model, gib_mlmodel_zip
):
    runs_before = len(_upload_runs())
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        resp = api.upload(f"/api/v1/models/{model}/versions", gib_mlmodel_zip)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _refused(resp, 413, "expands", model)
    assert peak - baseline < 100 * 1024 * 1024, f"peak {(peak - baseline) / 2**20:.1f} MiB"
    assert len(_upload_runs()) == runs_before


def test_an_mlmodel_over_1mib_is_refused_by_its_declared_size(api, model):
    # Barely compressible, so the ratio check does not catch it first.
    big = MLMODEL + b"#" + os.urandom(1024 * 1024).hex().encode()
    _refused(
        api.upload(f"/api/v1/models/{model}/versions", archive({"MLmodel": big})),
        413,
        "MLmodel is",
        model,
    )


def test_an_entry_with_a_bomb_ratio_is_refused_even_under_the_total_limit(api, model):
    payload = archive({"MLmodel": MLMODEL, "weights.bin": b"\0" * (50 * 1024 * 1024)})
    _refused(api.upload(f"/api/v1/models/{model}/versions", payload), 413, "times", model)


def test_a_ratio_limit_can_be_raised_for_very_compressible_models(api, model):
    payload = archive({"MLmodel": MLMODEL, "weights.bin": b"\0" * (3 * 1024 * 1024)})
    with override_settings(CONTROLPLANE_UPLOAD_MAX_RATIO=100_000):
        resp = api.upload(f"/api/v1/models/{model}/versions", payload)
    # Past the archive checks: MLflow refuses it later only if it is not a model.
    assert resp.status_code == 201, resp.content


# --- entry names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        ({"MLmodel": MLMODEL, "..%2fevil.txt": b"x"}, "'%' escape"),
        ({"MLmodel": MLMODEL, "a/..%2F..%2Fevil.txt": b"x"}, "'%' escape"),
        ({"MLmodel": MLMODEL, "%2e%2e/evil.txt": b"x"}, "'%' escape"),
        ({"MLmodel": MLMODEL, "data%20file.csv": b"x"}, "'%' escape"),
        ({"MLmodel": MLMODEL, "./MLmodel": b"flavors: {evil: {}}\n"}, "name the same file"),
        ({"MLmodel": MLMODEL, "a/b.txt": b"1", "a//b.txt": b"2"}, "name the same file"),
        ({"MLmodel": MLMODEL, "a/./b.txt": b"1", "a/b.txt": b"2"}, "name the same file"),
    ],
)
def test_escaped_and_duplicate_entry_names_are_refused(api, model, entries, fragment):
    runs_before = len(_upload_runs())
    _refused(api.upload(f"/api/v1/models/{model}/versions", archive(entries)), 400, fragment, model)
    assert len(_upload_runs()) == runs_before


# --- YAML -------------------------------------------------------------------------------------


def _alias_bomb() -> bytes:
    lines = [MLMODEL.decode(), 'x0: &x0 ["aaaaaaaaaaaaaaaa","aaaaaaaaaaaaaaaa","aaaaaaaaaaaaaaaa"]']
    for i in range(1, 12):
        refs = ",".join([f"*x{i - 1}"] * 9)
        lines.append(f"x{i}: &x{i} [{refs}]")
    lines.append("signature:\n  inputs: *x11\n")
    return "\n".join(lines).encode()


def test_a_3kb_yaml_alias_bomb_is_refused_and_nothing_is_stored(api, model):
    bomb = _alias_bomb()
    assert len(bomb) < 3 * 1024
    runs_before = len(_upload_runs())
    resp = api.upload(f"/api/v1/models/{model}/versions", archive({"MLmodel": bomb}))
    _refused(resp, 400, "anchors and aliases", model)
    assert len(_upload_runs()) == runs_before
    assert api.get(f"/api/v1/models/{model}/versions").json()["count"] == 0


def test_the_yaml_loader_refuses_anchors_deep_nesting_and_size_but_reads_plain_yaml():
    assert load_yaml(MLMODEL, max_bytes=1000) == {
        "flavors": {"python_function": {"loader_module": "mlflow.sklearn"}}
    }
    with pytest.raises(ValueError, match="anchors"):
        load_yaml(b"a: &x 1\nb: 2\n", max_bytes=1000)
    with pytest.raises(ValueError, match="larger than"):
        load_yaml(b"a: 1\n" * 300, max_bytes=1000)
    with pytest.raises(ValueError, match="nested too deeply|not valid YAML"):
        load_yaml(b"[" * 20000 + b"]" * 20000, max_bytes=100_000)
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml(b"!!python/object/apply:os.system ['true']", max_bytes=1000)


# --- what one version may hold ---------------------------------------------------------------


def test_a_version_over_the_signature_bound_is_refused_and_its_run_and_files_deleted(
    api, model, model_zip
):
    active_before = {r.info.run_id for r in _upload_runs()}
    all_before = {r.info.run_id for r in _upload_runs(all_stages=True)}
    with override_settings(CONTROLPLANE_VERSION_MAX_SIGNATURE_BYTES=200):
        resp = api.upload(f"/api/v1/models/{model}/versions", model_zip)
    assert resp.status_code == 400, resp.content
    assert "CONTROLPLANE_VERSION_MAX_SIGNATURE_BYTES" in resp.json()["error"]["message"]
    assert ModelVersion.objects.filter(model__name=model).count() == 0
    # The run this upload created is deleted, files included; no temp files are left.
    assert {r.info.run_id for r in _upload_runs()} == active_before
    new_runs = [r for r in _upload_runs(all_stages=True) if r.info.run_id not in all_before]
    assert len(new_runs) == 1 and new_runs[0].info.lifecycle_stage == "deleted"
    artifacts = Path(urlparse(new_runs[0].info.artifact_uri).path)
    assert not artifacts.exists() or not any(artifacts.rglob("*"))
    assert get_store().client.search_model_versions(f"name='{model}'") == []
    assert _tmp_entries() == []


def test_a_version_over_the_requirements_bound_is_refused(api, model, model_zip):
    with override_settings(CONTROLPLANE_VERSION_MAX_REQUIREMENTS=2):
        resp = api.upload(f"/api/v1/models/{model}/versions", model_zip)
    assert resp.status_code == 400, resp.content
    assert "CONTROLPLANE_VERSION_MAX_REQUIREMENTS" in resp.json()["error"]["message"]
    assert ModelVersion.objects.filter(model__name=model).count() == 0


def test_more_tags_than_the_bound_are_refused(api, model, model_zip):
    import json

    tags = {f"k{i}": "v" for i in range(settings.CONTROLPLANE_VERSION_MAX_TAGS + 1)}
    resp = api.upload(f"/api/v1/models/{model}/versions", model_zip, tags=json.dumps(tags))
    assert resp.status_code == 400, resp.content
    assert resp.json()["error"]["code"] == "invalid_tags"
    resp = api.post("/api/v1/models", {"name": model + "-x", "tags": tags})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_tags"


# --- abandoned uploads -------------------------------------------------------------------------


def _abandoned_run(*, age_seconds: float, upload_tag: bool = True, sklearn_model_dir: Path) -> str:
    """What a worker killed mid-upload leaves: a RUNNING run with files."""
    store = get_store()
    experiment_id = store._upload_experiment_id(create=True)
    run = store.client.create_run(
        experiment_id,
        start_time=int((time.time() - age_seconds) * 1000),
        tags={UPLOAD_TAG: "true"} if upload_tag else {},
    )
    store.client.log_artifacts(run.info.run_id, str(sklearn_model_dir), "model")
    return run.info.run_id


def test_the_sweep_deletes_upload_runs_left_running_for_an_hour_and_old_temp_files(
    sklearn_model_dir,
):
    client = get_store().client
    stale = _abandoned_run(age_seconds=2 * 3600, sklearn_model_dir=sklearn_model_dir)
    fresh = _abandoned_run(age_seconds=60, sklearn_model_dir=sklearn_model_dir)
    not_ours = _abandoned_run(
        age_seconds=2 * 3600, upload_tag=False, sklearn_model_dir=sklearn_model_dir
    )
    root = Path(settings.CONTROLPLANE_UPLOAD_TMP_DIR)
    old_dir, new_file = root / "upload-old", root / "tmpabc.upload.zip"
    (old_dir / "model").mkdir(parents=True)
    (old_dir / "model" / "model.pkl").write_bytes(b"x" * 1000)
    new_file.write_bytes(b"y")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(old_dir, (two_hours_ago, two_hours_ago))
    stale_files = Path(urlparse(client.get_run(stale).info.artifact_uri).path)
    assert any(stale_files.rglob("MLmodel"))

    result = upload_leftovers_sweep()

    assert result.runs_deleted == 1 and result.temp_entries_deleted == 1
    assert client.get_run(stale).info.lifecycle_stage == "deleted"
    assert not any(stale_files.rglob("*"))
    assert client.get_run(fresh).info.lifecycle_stage == "active"
    assert client.get_run(not_ours).info.lifecycle_stage == "active"
    assert not old_dir.exists() and new_file.exists()
    event = AuditEvent.objects.get(action="upload.sweep")
    assert event.after["runs"] == [stale] and event.actor_label == "system:upload-sweep"
    # Idempotent: a second pass finds nothing.
    again = upload_leftovers_sweep()
    assert again.runs_deleted == 0 and again.temp_entries_deleted == 0
    new_file.unlink()
    get_store().delete_run(fresh)
    get_store().delete_run(not_ours)


def test_the_sweep_is_a_periodic_task():
    from controlplane.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["registry-upload-sweep"]
    app.loader.import_default_modules()
    assert entry["task"] in app.tasks
    assert entry["schedule"] <= settings.CONTROLPLANE_UPLOAD_STALE_SECONDS


def _lie_about_size(payload: bytes, name: str, declared: int) -> bytes:
    """Rewrite the central directory so ``name`` claims ``declared`` bytes."""
    import struct

    data = bytearray(payload)
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46 : pos + 46 + name_len] == name.encode():
            struct.pack_into("<I", data, pos + 24, declared)
            return bytes(data)
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(f"{name} not in the central directory")


def test_an_entry_longer_than_it_declares_is_read_no_further_than_declared(api, model):
    padding = b"#" + b"x" * (8 * 1024 * 1024) + b"\n"  # 8 MiB, compresses ~1000 times
    honest = archive({"MLmodel": MLMODEL + padding})
    with override_settings(CONTROLPLANE_UPLOAD_MAX_RATIO=100_000):
        assert api.upload(f"/api/v1/models/{model}/versions", honest).status_code == 413
        lying = _lie_about_size(honest, "MLmodel", 1000)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            resp = api.upload(f"/api/v1/models/{model}/versions", lying)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    _refused(resp, 400, "MLmodel", model)
    assert peak < 5 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


def test_an_alias_bomb_registered_from_a_run_is_refused_and_the_version_undone(
    api, model, tmp_path
):
    store = get_store()
    experiment = store.client.get_experiment_by_name("tests-inputs")
    if experiment is None:
        root = Path(store.artifact_root) / "tests-inputs"
        root.mkdir(parents=True, exist_ok=True)
        experiment_id = store.client.create_experiment("tests-inputs", root.as_uri())
    else:
        experiment_id = experiment.experiment_id
    run_id = store.client.create_run(experiment_id).info.run_id
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "MLmodel").write_bytes(_alias_bomb())
    store.client.log_artifacts(run_id, str(tmp_path / "m"), "model")
    store.client.set_terminated(run_id)

    resp = api.post(f"/api/v1/models/{model}/versions", {"source": f"runs:/{run_id}/model"})
    assert resp.status_code == 400, resp.content
    assert "anchors and aliases" in resp.json()["error"]["message"]
    assert ModelVersion.objects.filter(model__name=model).count() == 0
    assert store.client.search_model_versions(f"name='{model}'") == []
