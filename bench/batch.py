"""Batch scoring throughput: a batch job against the single-request path and against
``mlflow models predict``, on the same CSV file, in one run.

1. **batch job**: ``POST /api/v1/batch-jobs``'s service and the job's runner (what the Celery
   worker runs): the file is read once, scored in chunks through a private model server in
   the model's environment, written as CSV with the id column. Wall time includes reading,
   the server's start and writing the output; "scoring" is the time in scoring requests.
2. **single requests**: one ``/invocations`` request with the whole file is refused (413,
   the server's 16 MiB body limit), so the same model server is sent one CSV request per
   chunk of the same size, in a loop (one client, keep-alive), as a script would.
3. **mlflow models predict** on the same file (``--env-manager local``, CSV in, JSON out).

A scikit-learn logistic regression over 20 features (the tests' model). Runs on a fresh
data directory (SQLite, a local MLflow store) and prints one table. Not a test.

Usage: CONTROLPLANE_PORT_RANGE=35000-35499 .venv/bin/python bench/batch.py [--rows 1000000]
       [--chunk-rows 10000] [--skip-mlflow]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup_django(data_dir: Path) -> None:
    os.environ.update(
        DJANGO_SETTINGS_MODULE="controlplane.settings.base",
        CONTROLPLANE_DATA_DIR=str(data_dir),
        MLFLOW_DISABLE_TELEMETRY="true",
        CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES=str(4 * 1024**3),
    )
    for key in ("DATABASE_URL", "MLFLOW_TRACKING_URI"):
        os.environ.pop(key, None)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def make_model(directory: Path):
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    import sklearn
    import skops
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(200, 20)), columns=[f"f{i}" for i in range(20)])
    y = (X["f0"] + X["f1"] > 0).astype(int)
    model = LogisticRegression(max_iter=200).fit(X, y)
    mlflow.sklearn.save_model(
        model,
        str(directory),
        signature=infer_signature(X, model.predict(X)),
        input_example=X.head(3),
        pip_requirements=[
            f"scikit-learn=={sklearn.__version__}",
            f"mlflow=={mlflow.__version__}",
            f"skops=={skops.__version__}",
        ],
    )


def make_csv(path: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(1)
    with pa.OSFile(str(path), "wb") as sink:
        writer = None
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            cols = {"id": pa.array(np.arange(start + 1, start + n + 1))}
            for i in range(20):
                cols[f"f{i}"] = pa.array(np.round(rng.normal(size=n), 5))
            table = pa.table(cols)
            if writer is None:
                writer = pacsv.CSVWriter(sink, table.schema)
            writer.write_table(table)
        writer.close()


def bench_job(csv: Path, model: str, user, chunk_rows: int) -> dict:
    from jobs import services
    from jobs.models import Job

    staged = csv.parent / "staged.csv"
    shutil.copy(csv, staged)
    t0 = time.monotonic()
    job = services.batch_job_submit(
        actor=user,
        model=model,
        version=1,
        upload=staged,
        upload_name="input.csv",
        keep_columns=["id"],
        format="csv",
        chunk_rows=chunk_rows,
    )
    state = services.job_run(job_id=job.pk)
    wall = time.monotonic() - t0
    job = Job.objects.get(pk=job.pk)
    if state != "succeeded":
        raise SystemExit(f"the batch job {state}: {job.error}")
    return {"wall": wall, "scoring": job.result["scoring_seconds"], "rows": job.result["scored"]}


def bench_requests(csv: Path, model_dir: Path, chunk_rows: int, port: int) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import requests

    env = {**os.environ, "PYTHONPATH": str(ROOT), "SERVING_LOG_INPUT_SAMPLE": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--name", "bench",
         "--version", "1", "--host", "127.0.0.1", "--port", str(port),
         "--max-batch-size", str(chunk_rows), "--max-batch-delay-ms", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        session = requests.Session()
        session.trust_env = False
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if session.get(f"{url}/ping", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        whole = session.post(
            f"{url}/invocations",
            data=csv.read_bytes(),
            headers={"Content-Type": "text/csv"},
            timeout=300,
        ).status_code
        table = pacsv.read_csv(csv).drop(["id"])
        t0 = time.monotonic()
        rows = 0
        for start in range(0, table.num_rows, chunk_rows):
            sink = io.BytesIO()
            pacsv.write_csv(table.slice(start, chunk_rows), sink)
            resp = session.post(
                f"{url}/invocations",
                data=sink.getvalue(),
                headers={"Content-Type": "text/csv"},
                timeout=300,
            )
            resp.raise_for_status()
            rows += len(resp.json()["predictions"])
        seconds = time.monotonic() - t0
        del pa
        return {"wall": seconds, "scoring": seconds, "rows": rows, "whole_file_status": whole}
    finally:
        server.terminate()
        server.wait(30)


def bench_mlflow(csv: Path, model_dir: Path, out: Path) -> dict:
    t0 = time.monotonic()
    subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m", str(model_dir),
         "-i", str(csv), "-t", "csv", "-o", str(out), "--env-manager", "local"],
        check=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    import json

    body = json.loads(out.read_text())
    rows = len(body["predictions"] if isinstance(body, dict) else body)
    return {"wall": seconds, "scoring": None, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk-rows", type=int, default=10_000)
    parser.add_argument("--skip-mlflow", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        setup_django(work / "var")
        from django.contrib.auth import get_user_model
        from django.contrib.auth.models import Group

        from deployments.services import allocate_port
        from registry.services import model_version_register

        user = get_user_model().objects.create_user("bench", password="pw-bench-12345")
        user.groups.add(*Group.objects.filter(name__in=["model-developer", "deployer"]))
        user = get_user_model().objects.get(pk=user.pk)
        model_dir = work / "model"
        make_model(model_dir)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for f in model_dir.rglob("*"):
                if f.is_file():
                    zf.write(f, str(f.relative_to(model_dir)))
        buf.seek(0)
        model_version_register(
            model_name="bench-lr",
            archive=buf,
            archive_size=len(buf.getvalue()),
            actor=user,
            create_model=True,
        )
        csv = work / "input.csv"
        make_csv(csv, args.rows)
        size_mb = csv.stat().st_size / 1e6
        print(f"input: {args.rows} rows, {size_mb:.0f} MB CSV; chunks of {args.chunk_rows} rows")
        results = {"batch job": bench_job(csv, "bench-lr", user, args.chunk_rows)}
        results["single requests, one per chunk"] = bench_requests(
            csv, model_dir, args.chunk_rows, allocate_port()
        )
        if not args.skip_mlflow:
            results["mlflow models predict (local)"] = bench_mlflow(
                csv, model_dir, work / "out.json"
            )
        status = results["single requests, one per chunk"].pop("whole_file_status")
        print(f"one /invocations request with the whole file: HTTP {status}")
        print(
            f"\n{'path':34} {'rows':>9} {'wall s':>8} {'rows/s (wall)':>14} {'rows/s (scoring)':>17}"
        )
        for name, r in results.items():
            scoring = f"{r['rows'] / r['scoring']:,.0f}" if r["scoring"] else "—"
            print(
                f"{name:34} {r['rows']:>9} {r['wall']:>8.1f} {r['rows'] / r['wall']:>14,.0f} "
                f"{scoring:>17}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
