"""What the end-to-end benchmarks share: a real control plane started as `make run` starts it
(`python -m controlplane.run`: gunicorn, Celery worker and beat, MLflow server), an API token
for it, a small REST client, the benchmark model, and a cleanup that leaves no model server
behind. One place, so every benchmark measures the same product the same way.

    with control_plane("bench-deploy-", env={"CONTROLPLANE_RECONCILE_INTERVAL": "1"}) as cp:
        cp.api.call("POST", "/models", {"name": "bench"})

BENCH_DATABASE_URL, when set, is the control plane's database (else its embedded SQLite).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests.support import free_port, wait_http  # noqa: E402

ADMIN_PASSWORD = "bench-password-1"


class Api:
    """The control plane's REST API with a bearer token; exits the benchmark on an error."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token

    def call(self, method: str, path: str, body=None, *, files: bytes | None = None) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if files is not None:
            boundary = "benchboundary"
            data = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="artifact"; filename="m.zip"\r\n'
                    "Content-Type: application/zip\r\n\r\n"
                ).encode()
                + files
                + f"\r\n--{boundary}--\r\n".encode()
            )
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"{method} {path}: {exc.code} {exc.read()[:300]!r}") from None
        return json.loads(raw) if raw else {}


def build_model_zip(workdir: Path) -> bytes:
    """The benchmark model: a scikit-learn logistic regression over 20 float features, saved
    by MLflow's own flavor API, zipped for POST /models/{name}/versions."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    import sklearn
    import skops
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(500, 20)), columns=[f"f{i}" for i in range(20)])
    y = (X["f0"] > 0).astype(int)
    model = LogisticRegression().fit(X, y)
    path = workdir / "model"
    mlflow.sklearn.save_model(
        model,
        str(path),
        signature=infer_signature(X, model.predict(X)),
        input_example=X.head(2),
        pip_requirements=[
            f"scikit-learn=={sklearn.__version__}",
            f"mlflow=={mlflow.__version__}",
            f"skops=={skops.__version__}",
        ],
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(path.rglob("*")):
            if f.is_file():
                zf.write(f, str(f.relative_to(path)))
    return buf.getvalue()


@dataclass
class ControlPlane:
    work: Path  # the run's directory: var/ (data dir) and controlplane.log
    env: dict[str, str]  # the control plane's environment
    port: int
    mlflow_port: int
    api: Api
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.work / "controlplane.log"


def create_token(env: dict[str, str], mlflow_port: int, user: str = "admin") -> str:
    """A new API token for ``user`` (the admin `make run` creates), as an operator makes one."""
    out = subprocess.run(
        [sys.executable, "manage.py", "create_api_token", user],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"},
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def _kill_model_servers(work: Path, env: dict[str, str]) -> None:
    """SIGKILL whatever model servers and routers of this install are left (local runtime)."""
    owner = work / "var" / "install_id"
    if not owner.exists():
        return
    subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import os,signal;from deployments.runtimes import process;"
                f"[os.kill(p.pid, signal.SIGKILL) for p in process.find_labelled({owner.read_text().strip()!r})]"
            ),
        ],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "controlplane.settings.base"},
    )


@contextmanager
def control_plane(
    prefix: str, *, env: dict[str, str] | None = None, startup_timeout: float = 180
) -> Iterator[ControlPlane]:
    """A fresh control plane (own data directory and ports) for the block; stopped after it,
    with every model server it started."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    port, mlflow_port = free_port(), free_port()
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MLFLOW_TRACKING_URI")}
    full.update(
        CONTROLPLANE_DATA_DIR=str(work / "var"),
        PORT=str(port),
        MLFLOW_PORT=str(mlflow_port),
        CONTROLPLANE_ADMIN_PASSWORD=ADMIN_PASSWORD,
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    if os.environ.get("BENCH_DATABASE_URL"):
        full["DATABASE_URL"] = os.environ["BENCH_DATABASE_URL"]
    full.update(env or {})
    with open(work / "controlplane.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.run"],
            cwd=ROOT,
            env=full,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", timeout=startup_timeout, proc=proc)
            api = Api(f"http://127.0.0.1:{port}/api/v1", create_token(full, mlflow_port))
            yield ControlPlane(work, full, port, mlflow_port, api, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            _kill_model_servers(work, full)
