"""ONNX conversion, measured: for a logistic regression, a random forest, a gradient boosting
classifier (scikit-learn) and a small PyTorch MLP, in one run:

  - conversion time (the "convert" job handler, registry.conversion.run, end to end: the
    model's environment with the converters, the sandboxed conversion script, verification,
    in-job benchmark, registration of the new version) and the verification result;
  - served latency (c=1, p50) and throughput (c=16, req/s) of the original and the converted
    version deployed side by side: real model servers (`python -m serving`, as the local
    runtime starts them, each in the environment the local runtime would pick for it), on
    loopback TCP so that wrk can load them, one 1-row request per call.

Usage:
    CONTROLPLANE_PORT_RANGE=35500-35999 .venv/bin/python bench/convert.py [--seconds 5]

Runs against its own data directory (a temporary SQLite database and MLflow store). Prints a
markdown table. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("CONTROLPLANE_DATA_DIR", tempfile.mkdtemp(prefix="bench-convert-"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.test")


def _serving_bench():
    """bench/serving.py's wrk and process helpers (by path: its name is the package's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_bench", ROOT / "bench" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ports() -> list[int]:
    low, high = (
        int(p) for p in os.environ.get("CONTROLPLANE_PORT_RANGE", "35500-35999").split("-")
    )
    import socket

    free = []
    for port in range(low, high + 1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        free.append(port)
        if len(free) >= 8:
            break
    return free


def train_sklearn(workdir: Path) -> dict[str, Path]:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tests.conversion.conftest import data, save_sklearn

    X, y = data(2000, 0)
    models = {
        "logistic regression": make_pipeline(StandardScaler(), LogisticRegression()),
        "random forest": RandomForestClassifier(n_estimators=100, max_depth=10, random_state=0),
        "gradient boosting": GradientBoostingClassifier(n_estimators=100, random_state=0),
    }
    return {
        name: save_sklearn(model.fit(X, y), workdir / name.replace(" ", "-"), X)
        for name, model in models.items()
    }


def server_python(model_dir: Path) -> str:
    """The interpreter the local runtime would serve this model with (environment "auto")."""
    from django.conf import settings

    from deployments import environments
    from deployments.runtimes import environment_builder

    resolved = environments.resolve(model_dir)
    if environments.shared_interpreter_serves(resolved)[0]:
        return sys.executable
    return str(environment_builder(str(settings.DATA_DIR)).ensure(resolved).python)


def serve(model_dir: Path, port: int, logs: Path) -> subprocess.Popen:
    wait_ready = _serving_bench().wait_ready

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true")
    log = open(logs / f"server-{port}.log", "wb")
    proc = subprocess.Popen(
        [server_python(model_dir), "-m", "serving", "--model-dir", str(model_dir),
         "--name", "bench", "--version", "1", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}/ping", proc, timeout=600)
    return proc


def load(port: int, body: str, seconds: float) -> dict:
    run_wrk = _serving_bench().run_wrk

    url = f"http://127.0.0.1:{port}/invocations"
    run_wrk(url, body, 2, 1.0)  # warm-up
    one = run_wrk(url, body, 1, seconds)
    many = run_wrk(url, body, 16, seconds)
    return {"p50_ms": one["p50"], "rps_c16": many["rps"], "errors": one["errors"] + many["errors"]}


def body_for(mv) -> str:
    from registry.conversion import rows

    spec = rows.input_spec(mv.signature)
    row = (rows.example_rows(mv.input_example, spec) or [[0.1] * spec.n_features])[0]
    if spec.columns:
        return json.dumps({"dataframe_split": {"columns": spec.columns, "data": [row]}})
    return json.dumps({"inputs": [row]})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0, help="per load measurement")
    args = parser.parse_args()

    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from django.contrib.auth import get_user_model

    from registry import conversion, services
    from registry.models import ModelVersion

    stop = _serving_bench().stop
    from tests.conftest import with_roles, zip_dir
    from tests.conversion.context import FakeJobContext
    from tests.frameworks.conftest import cache_root, train

    workdir = Path(tempfile.mkdtemp(prefix="bench-convert-work-"))
    user = get_user_model().objects.create_user(username="bench")
    user = with_roles(user, "model-developer", "deployer")
    models = train_sklearn(workdir)
    cache_root().mkdir(parents=True, exist_ok=True)
    models["PyTorch MLP"] = train("pytorch", cache_root()).model_dir

    results = []
    free = ports()
    for index, (name, model_dir) in enumerate(models.items()):
        source = services.model_version_register(
            model_name=f"bench-{index}",
            archive=io.BytesIO(zip_dir(Path(model_dir))),
            actor=user,
            create_model=True,
        )
        ctx = FakeJobContext(
            input={"model": source.model.name, "version": str(source.version), "target": "onnx"},
            owner=user,
            workdir=workdir / f"job-{index}",
        )
        started = time.monotonic()
        try:
            result = conversion.run(ctx)
        except conversion.ConversionFailed as exc:
            results.append({"model": name, "error": str(exc)})
            continue
        seconds = time.monotonic() - started
        converted = ModelVersion.objects.get(model=source.model, version=result["version"])
        from deployments.model_files import ensure_model_files

        served = {}
        procs = []
        try:
            for label, mv, port in (
                ("original", source, free[2 * index % len(free)]),
                ("onnx", converted, free[(2 * index + 1) % len(free)]),
            ):
                directory, _ = ensure_model_files(mv.model.name, mv.version)
                procs.append(serve(Path(directory), port, workdir))
                served[label] = load(port, body_for(source), args.seconds)
        finally:
            for proc in procs:
                stop(proc)
        verification = result["verification"]
        agreement = verification.get("label_agreement", verification.get("argmax_agreement"))
        results.append(
            {
                "model": name,
                "conversion_s": seconds,
                "converter": result["converter"],
                "verified": verification["passed"],
                "agreement": agreement,
                "max_abs": verification.get(
                    "probability_max_abs_error", verification.get("max_abs_error")
                ),
                "served": served,
                "in_job": result["benchmark"],
            }
        )
    print_table(results)
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nraw results: {workdir / 'results.json'}")
    return 0


def print_table(results: list[dict]) -> None:
    print(
        "| model | converter | conversion (s) | verified (agreement, max abs err) | "
        "p50 c=1 original / ONNX (ms) | req/s c=16 original / ONNX | "
        "in-job 1-row p50 original / ONNX (ms) | in-job 1,000-row rows/s original / ONNX |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        o, c = r["served"]["original"], r["served"]["onnx"]
        jo, jc = r["in_job"]["original"], r["in_job"]["converted"]
        agreement = f"{r['agreement']:.4f}" if r["agreement"] is not None else "-"
        print(
            f"| {r['model']} | {r['converter']} | {r['conversion_s']:.1f} | "
            f"{'yes' if r['verified'] else 'no'} ({agreement}, {r['max_abs']:.2g}) | "
            f"{o['p50_ms']:.2f} / {c['p50_ms']:.2f} | {o['rps_c16']:.0f} / {c['rps_c16']:.0f} | "
            f"{jo['latency_p50_ms_1_row']:.3f} / {jc['latency_p50_ms_1_row']:.3f} | "
            f"{jo['rows_per_second_1000_rows']:.0f} / {jc['rows_per_second_1000_rows']:.0f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
