"""REST API under load: list and promote endpoints with 1,000 models x 20 versions.

Starts the real control plane (`python -m controlplane.run`: gunicorn, Celery,
an MLflow server) on a fresh data directory, seeds the registry, then drives
the API with concurrent keep-alive clients and prints requests/s, p50 and p95,
plus the number of SQL queries per list request at two page sizes (it must
not grow with the rows).

Seeding: every model and version is in the control plane's tables; the
models that the promote benchmark moves aliases on are also registered in
MLflow for real (promotion writes the MLflow alias), the others only in the
mirror, because registering 20,000 versions through MLflow takes hours.

Usage: DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_api .venv/bin/python bench/api_load.py
       [--models 1000] [--versions 20] [--clients 8] [--seconds 10]
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def drive(port: int, token: str, make_request, *, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(idx: int) -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        n = 0
        while time.monotonic() < stop:
            method, path, body = make_request(idx, n)
            n += 1
            headers = {"Authorization": f"Bearer {token}"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            t0 = time.perf_counter()
            try:
                conn.request(
                    method,
                    path,
                    body=json.dumps(body) if body is not None else None,
                    headers=headers,
                )
                resp = conn.getresponse()
                resp.read()
                ok = resp.status < 400
            except OSError:
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    errors += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {
        "rps": len(latencies) / seconds,
        "p50": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p95": latencies[int(len(latencies) * 0.95) - 1] * 1000 if latencies else float("nan"),
        "errors": errors,
        "n": len(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument(
        "--mlflow-models", type=int, default=8, help="models also registered in MLflow (promote)"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()

    from tests.support import free_port, wait_http

    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    port, mlflow_port = free_port(), free_port()
    os.environ.update(
        CONTROLPLANE_DATA_DIR=str(work / "var"),
        PORT=str(port),
        MLFLOW_PORT=str(mlflow_port),
        MLFLOW_DISABLE_TELEMETRY="true",
        CONTROLPLANE_ADMIN_PASSWORD="bench-password-1",
        WEB_CONCURRENCY=os.environ.get("WEB_CONCURRENCY", "2"),
    )
    db = os.environ.get("DATABASE_URL", "sqlite (embedded)")
    if db.startswith("postgres"):  # a fresh database for the run
        name = db.rsplit("/", 1)[1]
        subprocess.run(
            ["psql", db.rsplit("/", 1)[0] + "/postgres", "-qc", f"DROP DATABASE IF EXISTS {name}"],
            check=True,
        )
        subprocess.run(
            ["psql", db.rsplit("/", 1)[0] + "/postgres", "-qc", f"CREATE DATABASE {name}"],
            check=True,
        )
    log = open(work / "controlplane.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.run"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=180, proc=proc)
        os.environ["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
        os.environ["MLFLOW_TRACKING_USERNAME"] = "controlplane"  # make run's own credential
        os.environ["MLFLOW_TRACKING_PASSWORD_FILE"] = str(
            work / "var" / "mlflow" / "auth" / "controlplane.password"
        )
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.base")
        import django

        django.setup()
        from django.contrib.auth import get_user_model
        from django.db import connection
        from django.test import Client
        from django.test.utils import CaptureQueriesContext

        from accounts.services import api_token_create
        from registry.mlflow_store import get_store
        from registry.models import ModelVersion, RegisteredModel

        admin = get_user_model().objects.get(username="admin")
        token = api_token_create(user=admin, name="bench").plaintext
        t0 = time.monotonic()
        models = RegisteredModel.objects.bulk_create(
            [
                RegisteredModel(
                    name=f"model-{i:04d}", tags={"team": f"t{i % 10}"}, created_by=admin
                )
                for i in range(args.models)
            ]
        )
        ModelVersion.objects.bulk_create(
            [
                ModelVersion(
                    model=m,
                    version=v,
                    source=f"runs:/{'0' * 32}/model",
                    metrics={"auc": 0.8 + v / 1000},
                    params={"C": str(v)},
                    flavors=["python_function", "sklearn"],
                )
                for m in models
                for v in range(1, args.versions + 1)
            ],
            batch_size=5000,
        )
        client = get_store().client
        stub = work / "stub"
        stub.mkdir()
        (stub / "MLmodel").write_text("flavors:\n  python_function: {}\n")
        run = client.create_run(client.create_experiment("bench"))
        client.log_artifacts(run.info.run_id, str(stub), "model")
        for m in models[: args.mlflow_models]:
            client.create_registered_model(m.name)
            for _ in range(args.versions):
                client.create_model_version(
                    m.name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
                )
        seed_s = time.monotonic() - t0

        test_client = Client()
        headers = {"Authorization": f"Bearer {token}"}
        queries = {}
        for size in (10, 200):
            with CaptureQueriesContext(connection) as ctx:
                resp = test_client.get(
                    f"/api/v1/models?page_size={size}", headers=headers, HTTP_HOST="127.0.0.1"
                )
            assert resp.status_code == 200, resp.content
            queries[size] = len(ctx.captured_queries)

        targets = [m.name for m in models[: args.mlflow_models]]
        results = {
            "GET /api/v1/models (page of 50)": drive(
                port,
                token,
                lambda i, n: ("GET", f"/api/v1/models?page={(n % 20) + 1}", None),
                clients=args.clients,
                seconds=args.seconds,
            ),
            "GET /api/v1/models?search=": drive(
                port,
                token,
                lambda i, n: ("GET", f"/api/v1/models?search=model-0{n % 100:02d}", None),
                clients=args.clients,
                seconds=args.seconds,
            ),
            "GET /api/v1/models/{name}/versions": drive(
                port,
                token,
                lambda i, n: ("GET", f"/api/v1/models/model-{n % args.models:04d}/versions", None),
                clients=args.clients,
                seconds=args.seconds,
            ),
            "POST /api/v1/models/{name}/aliases/staging": drive(
                port,
                token,
                lambda i, n: (
                    "POST",
                    f"/api/v1/models/{targets[i % len(targets)]}/aliases/staging",
                    {"version": str(n % args.versions + 1), "reason": f"bench {n}"},
                ),
                clients=args.clients,
                seconds=args.seconds,
            ),
        }
        print(
            f"\nseeded {args.models} models x {args.versions} versions in {seed_s:.1f}s; database: "
            f"{'PostgreSQL' if db.startswith('postgres') else 'SQLite'}; {args.clients} concurrent clients, "
            f"{args.seconds:.0f}s each; gunicorn {os.environ['WEB_CONCURRENCY']} workers x 4 threads"
        )
        print(
            f"SQL queries per GET /api/v1/models: page_size=10 -> {queries[10]}, page_size=200 -> {queries[200]}"
        )
        print("| endpoint | req/s | p50 ms | p95 ms | errors |")
        print("|---|---:|---:|---:|---:|")
        for name, r in results.items():
            print(f"| {name} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['errors']} |")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
