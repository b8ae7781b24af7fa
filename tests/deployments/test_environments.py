"""Per-model environments: the resolver, the uv builder, and deployments on the local runtime
that serve each model from its own environment. Real uv builds (from this host's package
indexes and wheelhouse), real model servers, real MLflow. Builds are shared per session: the
session's data directory holds one environment per key, and uv's cache makes a rebuild cheap."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from deployments import environments
from deployments.environments import (
    COMPLETE_MARKER,
    EnvironmentBuilder,
    EnvironmentFailure,
    index_options,
    resolve,
)
from deployments.models import Deployment, DeploymentEvent, Instance, Revision
from deployments.reconciler import exit_cause
from deployments.runtimes import InstanceSpec, get_runtime, process
from tests.conftest import zip_dir
from tests.deployments.conftest import converge

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(600)]

TABULATE = "tabulate==0.10.0"  # small, pure Python, and not in the control plane's venv

# A custom pyfunc (MLflow's models-from-code) that needs tabulate to load and to predict.
TABULATE_MODEL = """
import mlflow.pyfunc
import mlflow.models


class Model(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import tabulate

        self.tabulate = tabulate

    def predict(self, context, model_input, params=None):
        return [f"tabulate {self.tabulate.__version__}: {row[0]}" for row in model_input.values]


mlflow.models.set_model(Model())
"""

FAILING_MODEL = """
import mlflow.pyfunc
import mlflow.models


class Model(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        raise RuntimeError("boom at load: this model cannot load")

    def predict(self, context, model_input, params=None):
        return [0] * len(model_input)


mlflow.models.set_model(Model())
"""


def _pyfunc(path: Path, code: str, requirements: list[str]) -> Path:
    import mlflow
    import mlflow.pyfunc

    path.parent.mkdir(parents=True, exist_ok=True)
    source = path.parent / f"{path.name}_model.py"
    source.write_text(code)
    mlflow.pyfunc.save_model(
        str(path),
        python_model=str(source),
        pip_requirements=[f"mlflow=={mlflow.__version__}", *requirements],
    )
    return path


@pytest.fixture(scope="session")
def tabulate_model_dir(tmp_path_factory) -> Path:
    return _pyfunc(tmp_path_factory.mktemp("models") / "tabulate", TABULATE_MODEL, [TABULATE])


@pytest.fixture(scope="session")
def missing_package_model_dir(tmp_path_factory) -> Path:
    return _pyfunc(
        tmp_path_factory.mktemp("models") / "missing",
        TABULATE_MODEL,
        ["nonexistent-package-xyz==1.0"],
    )


@pytest.fixture(scope="session")
def failing_model_dir(tmp_path_factory) -> Path:
    return _pyfunc(tmp_path_factory.mktemp("models") / "failing", FAILING_MODEL, [])


@pytest.fixture(scope="session")
def index():
    return index_options()


def _model_dir(
    tmp_path: Path, name: str, requirements: str | None, files: dict[str, str] | None = None
) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "MLmodel").write_text("flavors: {python_function: {}}\n")
    if requirements is not None:
        (path / "requirements.txt").write_text(requirements)
    for filename, text in (files or {}).items():
        (path / filename).write_text(text)
    return path


def _predict(endpoint: str, payload: dict) -> dict:
    req = urllib.request.Request(
        f"{endpoint}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _server_environment(d: Deployment) -> str:
    inst = Instance.objects.get(deployment=d, revision=d.serving_revision)
    info = process.inspect(inst.runtime_id)
    assert info is not None and info.alive
    return info.labels["CONTROLPLANE_ENVIRONMENT"]


def _deploy(api, registered, model_dir: Path, name: str, **body) -> dict:
    model = registered(name=name, payload=zip_dir(model_dir))
    resp = api.post("/api/v1/deployments", {"name": name, "model": model, "version": "1", **body})
    assert resp.status_code in (201, 202), resp.content
    return resp.json()


# --- the resolver ------------------------------------------------------------------------------


def test_environment_key_is_stable_and_order_insensitive(tmp_path):
    a = _model_dir(
        tmp_path,
        "a",
        "# written by MLflow\nscikit-learn==1.5.2\nmlflow==3.17.2\nnumpy==2.1.0 # pinned\n",
        files={"python_env.yaml": "python: 3.11.7\nbuild_dependencies: [pip==24.0]\n"},
    )
    b = _model_dir(
        tmp_path,
        "b",
        "numpy==2.1.0\n\nmlflow==3.17.2\nscikit-learn==1.5.2\nnumpy==2.1.0\n",
        files={"python_env.yaml": "python: '3.11.9'\nbuild_dependencies: [pip==24.0]\n"},
    )
    c = _model_dir(
        tmp_path,
        "c",
        "numpy==2.1.1\nmlflow==3.17.2\nscikit-learn==1.5.2\n",
        files={"python_env.yaml": "python: 3.11.7\nbuild_dependencies: [pip==24.0]\n"},
    )
    ra, rb, rc = resolve(a), resolve(b), resolve(c)
    assert ra.key == rb.key == resolve(a).key
    assert rc.key != ra.key
    assert ra.python == "3.11"
    assert ra.model_requirements == ("mlflow-skinny==3.17.2", "numpy==2.1.0", "scikit-learn==1.5.2")
    assert "httptools>=0.6" in ra.requirements  # what the model server needs, too
    assert list(ra.requirements) == sorted(ra.requirements)
    assert ra.install_requirements == tuple(sorted((*ra.requirements, "pip==24.0")))


def test_the_conda_pip_section_is_the_fallback(tmp_path):
    conda = (
        "dependencies:\n- python=3.11.4\n- pip<=24\n- pip:\n  - scikit-learn==1.5.2\n  - mlflow\n"
    )
    path = _model_dir(tmp_path, "conda", None, {"conda.yaml": conda})
    resolved = resolve(path)
    assert resolved.python == "3.11"
    assert resolved.model_requirements == ("mlflow-skinny", "scikit-learn==1.5.2")
    assert "conda.yaml (pip section)" in resolved.sources


@pytest.mark.parametrize(
    "line,says",
    [
        ("-r other.txt", "options and includes"),
        ("--index-url https://example.invalid/simple", "options and includes"),
        ("./wheels/thing-1.0-py3-none-any.whl", "not a plain requirement"),
        ("thing @ https://example.invalid/thing.whl", "URL requirements"),
    ],
)
def test_options_paths_and_urls_are_refused_with_a_clear_message(tmp_path, line, says):
    path = _model_dir(tmp_path, "bad", f"numpy==2.1.0\n{line}\n")
    with pytest.raises(EnvironmentFailure) as err:
        resolve(path)
    assert says in str(err.value) and "requirements.txt" in str(err.value)
    assert line.split()[0] in str(err.value)


def test_a_model_without_requirements_is_refused(tmp_path):
    with pytest.raises(EnvironmentFailure, match="declares no requirements"):
        resolve(_model_dir(tmp_path, "none", None))


def test_the_control_plane_interpreter_satisfies_only_what_it_has():
    import sklearn

    assert environments.unsatisfied([f"scikit-learn=={sklearn.__version__}"]) == []
    assert environments.unsatisfied(["scikit-learn<1"]) == ["scikit-learn<1"]
    assert environments.unsatisfied([TABULATE]) == [TABULATE]
    # a requirement for another platform needs nothing here
    assert environments.unsatisfied(['tabulate==0.10.0; sys_platform == "win32"']) == []


def test_host_pip_configuration_is_the_default_and_settings_override_it():
    host = {
        "find-links": "/opt/wheels",
        "extra-index-url": "file:///opt/pypi/simple file:///opt/pypi-more/simple",
        "cert": "/etc/ssl/certs/ca-certificates.crt",
        "constraint": "/etc/xdg/pip/constraints.txt",
    }
    options = index_options(host_config=host)
    assert options.find_links == ("/opt/wheels",)
    assert options.extra_index_urls == ("file:///opt/pypi/simple", "file:///opt/pypi-more/simple")
    assert options.cert == "/etc/ssl/certs/ca-certificates.crt"
    assert "--index-strategy" in options.uv_args()
    assert options.uv_env() == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}
    mine = index_options(
        index_url="none", extra_index_url="", find_links="/srv/a,/srv/b", host_config=host
    )
    assert mine.extra_index_urls == () and mine.find_links == ("/srv/a", "/srv/b")
    assert mine.uv_args()[0] == "--no-index" and mine.pip_args()[0] == "--no-index"


def test_torch_pin_resolves_to_the_cpu_wheel_on_disk_without_cuda(tmp_path, index):
    """torch==2.13.0 must come from the wheelhouse (2.13.0+cpu), never PyPI's CUDA build."""
    if not any(
        Path(link, "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").exists()
        for link in index.find_links
    ):
        pytest.skip("no torch CPU wheel in this host's wheelhouse")
    plan = EnvironmentBuilder(tmp_path, index=index).compile(["torch==2.13.0"])
    assert "torch==2.13.0+cpu" in plan
    assert not [p for p in plan if p.startswith(("nvidia-", "triton"))]


# --- the builder --------------------------------------------------------------------------------


def test_two_concurrent_prepares_of_the_same_key_build_once(tmp_path, index, sklearn_model_dir):
    builder = EnvironmentBuilder(tmp_path / "envs", index=index)
    resolved = resolve(sklearn_model_dir)
    results, errors = [], []

    def prepare():
        try:
            results.append(builder.ensure(resolved))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.built for r in results) == [False, True]
    assert builder.builds == 1
    assert results[0].python == results[1].python
    assert (builder.path(resolved.key) / COMPLETE_MARKER).is_file()
    # world-readable for servers run as another user
    env = builder.path(resolved.key)
    assert env.stat().st_mode & 0o755 == 0o755
    meta = env / environments.METADATA
    assert meta.stat().st_mode & 0o644 == 0o644
    assert any(p.startswith("scikit-learn==") for p in json.loads(meta.read_text())["packages"])


def _build_in_child(root: str, model_dir: str) -> None:
    builder = EnvironmentBuilder(root, index=index_options())
    builder.ensure(resolve(model_dir))


def _processes_naming(path: Path) -> list[str]:
    """Command lines of this host's live processes that mention ``path``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            found.append(cmdline)
    return found


def test_a_killed_build_is_rebuilt_not_used(tmp_path, index, tabulate_model_dir):
    root = tmp_path / "envs"
    resolved = resolve(tabulate_model_dir)
    builder = EnvironmentBuilder(root, index=index)
    # A builder killed mid-way: its temporary directory is left, nothing is complete.
    child = multiprocessing.get_context("fork").Process(
        target=_build_in_child, args=(str(root), str(tabulate_model_dir))
    )
    child.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(root.glob(".build-*/env/bin/python")):
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    # Its installer (uv venv or uv pip) dies with it: nothing keeps writing into the
    # directory that cleanup will remove (an orphaned `uv pip install` runs for seconds).
    deadline = time.monotonic() + 0.5
    while _processes_naming(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_naming(root) == []
    assert builder.complete(resolved.key) is None
    # And a directory at the final place without the marker (a copy, a crash after a rename).
    (root / resolved.key / "bin").mkdir(parents=True)
    (root / resolved.key / "bin" / "python").symlink_to(sys.executable)
    assert builder.complete(resolved.key) is None

    built = builder.ensure(resolved)
    assert built.built
    assert any(p.startswith("tabulate==0.10.0") for p in built.packages)
    assert (root / resolved.key / COMPLETE_MARKER).is_file()
    # the dead builder's temporary directory goes with the next cleanup
    removed = builder.cleanup(keep={resolved.key}, retention_seconds=0)
    assert removed and all(name.startswith(".build-") for name in removed)
    assert not list(root.glob(".build-*"))
    assert builder.complete(resolved.key) is not None


def test_cleanup_removes_unused_environments_after_the_retention(
    tmp_path, index, sklearn_model_dir
):
    builder = EnvironmentBuilder(tmp_path / "envs", index=index)
    key = builder.ensure(resolve(sklearn_model_dir)).key
    assert builder.cleanup(keep=set(), retention_seconds=3600) == []  # used just now
    assert builder.cleanup(keep={key}, retention_seconds=0) == []  # a revision uses it
    assert builder.cleanup(keep=set(), retention_seconds=0) == [key]
    assert not builder.path(key).exists()


# --- deployments on the local runtime ------------------------------------------------------------


def test_auto_reuses_the_control_plane_interpreter_for_the_sklearn_model(
    api, registered, sklearn_model_dir
):
    body = _deploy(api, registered, sklearn_model_dir, "env-auto-shared")
    assert body["environment"] == "auto"
    d = converge("env-auto-shared")
    assert _server_environment(d) == "shared"
    assert d.desired_revision.spec["environment"] == "auto"
    messages = list(
        DeploymentEvent.objects.filter(deployment=d, kind="environment").values_list(
            "message", flat=True
        )
    )
    assert any("no build" in m for m in messages), messages


def test_auto_builds_for_a_model_needing_a_package_the_control_plane_lacks(
    api, registered, tabulate_model_dir
):
    _deploy(api, registered, tabulate_model_dir, "env-auto-built")
    d = converge("env-auto-built", timeout=240)
    key = resolve(tabulate_model_dir).key
    assert _server_environment(d) == key
    out = _predict(d.endpoint, {"dataframe_split": {"columns": ["x"], "data": [[1], [2]]}})
    assert out == {"predictions": ["tabulate 0.10.0: 1", "tabulate 0.10.0: 2"]}
    messages = " | ".join(
        DeploymentEvent.objects.filter(deployment=d, kind="environment").values_list(
            "message", flat=True
        )
    )
    assert "lacks tabulate==0.10.0" in messages
    assert "tabulate" in messages and ("built in" in messages or "reused" in messages)


def test_a_requirement_that_does_not_exist_fails_the_revision_within_seconds(
    api, registered, missing_package_model_dir
):
    started = time.monotonic()
    _deploy(api, registered, missing_package_model_dir, "env-missing")
    d = converge("env-missing", until=lambda d: d.status == Deployment.Status.FAILED, timeout=120)
    elapsed = time.monotonic() - started
    revision = Revision.objects.get(pk=d.desired_revision_id)
    assert revision.state == Revision.State.FAILED
    assert "nonexistent-package-xyz" in revision.failure
    assert "not found" in revision.failure or "No solution" in revision.failure
    assert "nonexistent-package-xyz" in d.status_message
    # failed at the build: no server ever started, so nothing restarted
    assert not Instance.objects.filter(deployment=d).exists()
    assert not DeploymentEvent.objects.filter(deployment=d, kind="crash").exists()
    assert elapsed < 60, elapsed
    body = api.get("/api/v1/deployments/env-missing").json()
    assert body["status"] == "failed" and "nonexistent-package-xyz" in body["status_message"]


def test_a_model_failing_at_load_keeps_its_log_readable_after_its_revision_failed(
    api, registered, failing_model_dir
):
    _deploy(api, registered, failing_model_dir, "env-load-fails", environment="shared")
    d = converge(
        "env-load-fails", until=lambda d: d.status == Deployment.Status.FAILED, timeout=180
    )
    revision = Revision.objects.get(pk=d.desired_revision_id)
    assert "crash-looped" in revision.failure
    assert "(log: env-load-fails-r1-0)" in revision.failure
    assert not Instance.objects.filter(deployment=d).exists()  # its instances are gone...
    logs = api.get("/api/v1/deployments/env-load-fails/logs?tail=200").json()["instances"]
    failed = [item for item in logs if item["failed"]]
    assert [item["name"] for item in failed] == ["env-load-fails-r1-0"]
    assert "boom at load" in failed[0]["logs"]  # ...and their log is still there


def test_the_servers_fatal_record_is_preferred_to_the_last_log_line():
    log = (
        "2026-12-01 INFO serving: loading\nTraceback (most recent call last):\n"
        "ModuleNotFoundError: No module named 'xgboost'\n"
        'SERVING-FATAL {"type": "ModuleNotFoundError", "message": "No module named '
        '\'xgboost\'", "phase": "load"}\n'
        "2026-12-01 INFO serving: stopped\n"
    )
    assert exit_cause(log) == "ModuleNotFoundError: No module named 'xgboost' (during load)"
    assert exit_cause("a\nserving: stopped\n") == "serving: stopped"
    assert exit_cause("SERVING-FATAL {not json}\nlast words\n") == "last words"


def test_isolated_deploys_the_sklearn_model_from_its_own_environment(
    api, registered, sklearn_model_dir
):
    import mlflow.sklearn
    import numpy as np

    body = _deploy(api, registered, sklearn_model_dir, "env-isolated", environment="isolated")
    assert body["environment"] == "isolated"
    d = converge("env-isolated", timeout=240)
    key = resolve(sklearn_model_dir).key
    assert _server_environment(d) == key
    inst = Instance.objects.get(deployment=d, revision=d.serving_revision)
    pid = process.parse_id(inst.runtime_id)[0]
    argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    assert argv0 == str(get_runtime("local").environments.path(key) / "bin" / "python")
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(5, 20)).round(6).tolist()
    out = _predict(
        d.endpoint,
        {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": rows}},
    )
    import pandas as pd

    model = mlflow.sklearn.load_model(str(sklearn_model_dir))
    expected = model.predict(pd.DataFrame(rows, columns=[f"f{i}" for i in range(20)]))
    assert out["predictions"] == expected.tolist()


def test_environment_and_predict_method_are_validated_stored_and_passed(
    api, registered, sklearn_model_dir
):
    model = registered(name="env-validate", payload=zip_dir(sklearn_model_dir))
    resp = api.post(
        "/api/v1/deployments",
        {"name": "env-bad", "model": model, "version": "1", "environment": "conda"},
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "invalid_environment"
    assert "auto, isolated, shared" in error["message"]
    assert not Deployment.objects.filter(name="env-bad").exists()
    resp = api.post(
        "/api/v1/deployments",
        {"name": "env-bad", "model": model, "version": "1", "predict_method": "rm -rf"},
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_predict_method"
    assert not Deployment.objects.filter(name="env-bad").exists()

    body = _deploy(
        api,
        registered,
        sklearn_model_dir,
        "env-method",
        predict_method="predict",
        environment="shared",
    )
    assert body["predict_method"] == "predict" and body["environment"] == "shared"
    d = converge("env-method")
    inst = Instance.objects.get(deployment=d, revision=d.serving_revision)
    pid = process.parse_id(inst.runtime_id)[0]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"SERVING_PREDICT_METHOD=predict" in environ
    assert d.desired_revision.spec["predict_method"] == "predict"

    resp = api.patch("/api/v1/deployments/env-method", {"environment": "bogus"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_environment"
    resp = api.patch(
        "/api/v1/deployments/env-method", {"environment": "auto", "predict_method": None}
    )
    assert resp.status_code in (200, 202), resp.content
    assert resp.json()["environment"] == "auto" and resp.json()["predict_method"] is None
    spec = Deployment.objects.get(name="env-method").desired_revision.spec
    assert spec["environment"] == "auto" and spec["predict_method"] is None
    assert Revision.objects.filter(deployment=d).count() == 2


def test_the_cleanup_task_keeps_what_revisions_use(api, registered, tabulate_model_dir, settings):
    from deployments.reconciler import cleanup_environments, environments_in_use

    _deploy(api, registered, tabulate_model_dir, "env-keep")
    converge("env-keep", timeout=240)
    key = resolve(tabulate_model_dir).key
    assert key in environments_in_use()
    settings.CONTROLPLANE_ENV_RETENTION_DAYS = 0
    builder = get_runtime("local").environments
    stray = builder.root / ("0" * 64)
    (stray / "bin").mkdir(parents=True)
    removed = cleanup_environments()
    assert "0" * 64 in removed and key not in removed
    assert builder.complete(key) is not None
    shutil.rmtree(stray, ignore_errors=True)
    # the periodic task does the same, and is scheduled where every periodic task is
    from django.conf import settings as django_settings

    from deployments.tasks import environments_cleanup

    (stray / "bin").mkdir(parents=True)
    assert environments_cleanup() == 1 and not stray.exists()
    assert builder.complete(key) is not None
    schedule = django_settings.CELERY_BEAT_SCHEDULE["deployments-environments-cleanup"]
    assert schedule["task"] == "deployments.tasks.environments_cleanup"


def test_a_local_instance_spec_defaults_to_the_shared_interpreter(sklearn_model_dir):
    runtime = get_runtime("local")
    spec = InstanceSpec(
        deployment="x",
        revision=1,
        ordinal=0,
        model_name="m",
        model_version="1",
        model_dir=str(sklearn_model_dir),
        model_sha256="",
        port=0,
    )
    assert runtime.interpreter(spec) == (runtime.python, "shared")


def test_the_ui_creates_with_an_environment_and_shows_it_with_the_phase(
    client_logged_in, registered, sklearn_model_dir
):
    model = registered(name="env-ui", payload=zip_dir(sklearn_model_dir))
    form = {
        "name": "env-ui",
        "model": model,
        "version": "1",
        "alias": "",
        "runtime": "local",
        "replicas": "1",
        "environment": "isolated",
        "predict_method": "predict",
    }
    page = client_logged_in.get("/deployments/new")
    assert b'name="environment"' in page.content and b'name="predict_method"' in page.content
    bad = client_logged_in.post("/deployments/new", {**form, "environment": "conda"})
    assert bad.status_code == 400 and not Deployment.objects.filter(name="env-ui").exists()
    resp = client_logged_in.post("/deployments/new", form)
    assert resp.status_code == 302, resp.content
    d = Deployment.objects.get(name="env-ui")
    assert (d.environment, d.predict_method) == ("isolated", "predict")
    assert d.desired_revision.spec["environment"] == "isolated"
    Deployment.objects.filter(pk=d.pk).update(
        phase="preparing environment", phase_started_at=d.created_at
    )
    detail = client_logged_in.get("/deployments/env-ui/").content.decode()
    assert "preparing environment" in detail and 'id="dep-phase-elapsed"' in detail
    assert "isolated" in detail and "<code>predict</code>" in detail


def test_the_version_page_shows_the_requirements_as_deployments_resolve_them(
    client_logged_in, registered, tabulate_model_dir, sklearn_model_dir
):
    from django.urls import reverse

    tab = registered(name="env-page-tab", payload=zip_dir(tabulate_model_dir))
    page = client_logged_in.get(reverse("registry:version-detail", args=[tab, 1])).content.decode()
    assert "tabulate==0.10.0" in page and "mlflow-skinny==" in page
    assert "lacks tabulate==0.10.0" in page
    skl = registered(name="env-page-skl", payload=zip_dir(sklearn_model_dir))
    page = client_logged_in.get(reverse("registry:version-detail", args=[skl, 1])).content.decode()
    assert (
        "runs on this control plane&#x27;s Python" in page
        or "runs on this control plane's Python" in page
    )


def _fake_env(builder: EnvironmentBuilder, key: str) -> Path:
    """A complete-looking environment of two small packages, on this interpreter."""
    env = builder.path(key)
    site = env / "lib" / f"python{environments.current_python()}" / "site-packages"
    (site / "pkg" / "tests").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (site / "pkg" / "tests" / "test_pkg.py").write_text("def test(): pass\n")
    (env / "bin").mkdir()
    (env / "bin" / "python").symlink_to(sys.executable)
    # a real venv: its interpreter's site-packages is this one (and its .pth files would run)
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    (env / "pyvenv.cfg").write_text(f"home = {os.path.dirname(base)}\n")
    (env / COMPLETE_MARKER).write_text(key)
    return site


def test_bytecode_is_compiled_in_the_background_for_servers_that_cannot_write_it(tmp_path):
    """Sandboxed servers run as a uid that cannot write __pycache__: after the env is complete
    its modules are compiled (world-readable, test suites left out), once, and a prepare of an
    env whose compile never finished starts it again."""
    builder = EnvironmentBuilder(tmp_path / "envs", bytecode="background")
    key = "b" * 64
    site = _fake_env(builder, key)
    # a package's .pth file runs at interpreter start-up: the compile must not start one
    ran = tmp_path / "pth-ran"
    (site / "evil.pth").write_text(f"import pathlib; pathlib.Path({str(ran)!r}).touch()\n")
    (tmp_path / "envs" / ".locks").mkdir(parents=True, exist_ok=True)
    assert not builder.bytecode_ready(key)
    builder._start_bytecode(key)  # what ensure() does for a complete env without the marker
    assert builder.wait_bytecode(key, timeout=60)
    compiled = list((site / "pkg" / "__pycache__").glob("__init__.cpython-*.pyc"))
    assert len(compiled) == 1 and compiled[0].stat().st_mode & 0o644 == 0o644
    assert not (site / "pkg" / "tests" / "__pycache__").exists()
    assert (builder.path(key) / environments.BYTECODE_MARKER).is_file()
    assert not ran.exists()
    first = builder._compiling[key]
    assert first.wait(timeout=30) == 0
    # done: a later prepare starts nothing
    builder._start_bytecode(key)
    assert builder._compiling[key] is first
    # "off": nothing compiled
    off = EnvironmentBuilder(tmp_path / "off", bytecode="off")
    _fake_env(off, key)
    off._start_bytecode(key)
    assert key not in off._compiling and not off.bytecode_ready(key)
    with pytest.raises(ValueError, match="bytecode must be one of"):
        EnvironmentBuilder(tmp_path, bytecode="sometimes")
