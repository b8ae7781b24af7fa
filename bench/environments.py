"""Benchmark: per-model environments, ours (deployments/environments.py + the local runtime)
against `mlflow models serve --env-manager uv`, on the same models in the same run.

    MLFLOW_DISABLE_TELEMETRY=true .venv/bin/python bench/environments.py [--models sklearn,xgboost,pytorch]

1. Builds a throw-away "trainer" environment with our builder (scikit-learn, XGBoost,
   torch==2.13.0 and mlflow-skinny: the control plane's venv has neither XGBoost nor torch)
   and saves one model per framework from it with MLflow's own flavor API (signature, input
   example), writing down the framework's own predictions on the example rows.
2. Per model, ours: a cold environment build (a new environments directory; uv's package
   cache as this host has it), then a warm deploy -> ready (the local runtime's prepare and
   start on the built environment, until /ping answers 200), and the first prediction's
   latency (checked against the framework's own predictions).
3. Per model, MLflow: `mlflow models serve --env-manager uv` with a new MLFLOW_ENV_ROOT, from
   launch to /ping 200 (its environment creation included: cold), then once more on the same
   env root (warm), and its first prediction's latency. MLflow's uv gets the same indexes,
   wheelhouse and index strategy through UV_* variables, so torch==2.13.0 resolves to the CPU
   wheel on disk for both (checked: no nvidia-* package in either torch environment).

Prints a table; the README's figures come from it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deployments import environments  # noqa: E402
from deployments.runtimes.base import InstanceSpec  # noqa: E402
from deployments.runtimes.local import LocalRuntime  # noqa: E402

TRAIN = r"""
import json, sys
from pathlib import Path
import numpy as np
import pandas as pd
import mlflow
from mlflow.models import infer_signature

out = Path(sys.argv[1])
which = sys.argv[2].split(",")
rng = np.random.default_rng(0)
X = pd.DataFrame(rng.normal(size=(400, 8)).astype("float32"), columns=[f"f{i}" for i in range(8)])
y = (X["f0"] + X["f1"] - X["f2"] > 0).astype("int64")
rows = X.iloc[:3]
expected = json.loads((out / "expected.json").read_text())["expected"] if (out / "expected.json").exists() else {}
if "sklearn" in which and not (out / "sklearn").exists():
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression
    m = LogisticRegression(max_iter=500).fit(X, y)
    import sklearn, skops
    # Pinned as the tests' model is: inferred, they would pick up torch from this process.
    mlflow.sklearn.save_model(m, str(out / "sklearn"), signature=infer_signature(X, m.predict(X)),
                              input_example=rows,
                              pip_requirements=[f"mlflow=={mlflow.__version__}",
                                                f"scikit-learn=={sklearn.__version__}",
                                                f"skops=={skops.__version__}"])
    expected["sklearn"] = m.predict(rows).tolist()
if "xgboost" in which and not (out / "xgboost").exists():
    import mlflow.xgboost
    import xgboost as xgb
    m = xgb.XGBClassifier(n_estimators=20, max_depth=3).fit(X, y)
    mlflow.xgboost.save_model(m, str(out / "xgboost"), signature=infer_signature(X, m.predict(X)),
                              input_example=rows)
    expected["xgboost"] = m.predict(rows).tolist()
if "pytorch" in which and not (out / "pytorch").exists():
    import mlflow.pytorch
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    net.eval()
    with torch.no_grad():
        pred = net(torch.tensor(X.values)).numpy()
    mlflow.pytorch.save_model(net, str(out / "pytorch"),
                              signature=infer_signature(X.values, pred),
                              input_example=rows.values)
    with torch.no_grad():
        expected["pytorch"] = net(torch.tensor(rows.values)).numpy().tolist()
(out / "expected.json").write_text(json.dumps({"rows": rows.values.tolist(), "expected": expected}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(
    address: str | int, method: str, path: str, body: bytes | None = None, timeout: float = 120
) -> tuple[int, bytes]:
    """One HTTP request to ``address``: a port on 127.0.0.1, "host:port" or "unix:/path" (a
    sandboxed server's socket)."""
    if isinstance(address, str) and address.startswith("unix:"):
        conn = _UnixConnection(address[5:], timeout)
    else:
        host, _, port = str(address).rpartition(":")
        conn = http.client.HTTPConnection(host or "127.0.0.1", int(port), timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ping(address: str | int, proc: subprocess.Popen | None, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if request(address, "GET", "/ping", timeout=1)[0] == 200:
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no /ping 200 on {address} within {timeout}s")


def first_prediction(
    address: str | int, rows: list, columns: list[str] | None
) -> tuple[float, object]:
    payload = (
        {"dataframe_split": {"columns": columns, "data": rows}} if columns else {"inputs": rows}
    )
    body = json.dumps(payload).encode()
    started = time.monotonic()
    status, data = request(address, "POST", "/invocations", body)
    latency = (time.monotonic() - started) * 1000
    if status != 200:
        raise RuntimeError(f"/invocations answered {status}: {data[:300]!r}")
    answer = json.loads(data)
    return latency, answer.get("predictions", answer)


def close(expected, got) -> bool:
    flat = lambda v: [x for r in v for x in (r if isinstance(r, list) else [r])]  # noqa: E731
    if isinstance(got, list) and got and isinstance(got[0], dict):
        got = [list(r.values()) for r in got]
    a, b = flat(expected), flat(got)
    return len(a) == len(b) and all(
        abs(float(x) - float(y)) < 1e-5 for x, y in zip(a, b, strict=True)
    )


def uv_env(index: environments.IndexOptions) -> dict[str, str]:
    """Our index settings for another program's uv (MLflow's env manager)."""
    env = {"UV_PYTHON_DOWNLOADS": "never", "UV_INDEX_STRATEGY": "unsafe-best-match"}
    if index.find_links:
        env["UV_FIND_LINKS"] = " ".join(index.find_links)
    if index.extra_index_urls:
        env["UV_INDEX"] = " ".join(index.extra_index_urls)
    if index.constraints:
        env["UV_CONSTRAINT"] = " ".join(index.constraints)
    env.update(index.uv_env())
    return env


def run_ours(model_dir: Path, root: Path, index, rows, columns, expected) -> dict:
    # bytecode "off" first: one warm start without bytecode on disk (what a sandboxed server
    # paid at every start before), then the background compile, then warm starts with it.
    builder = environments.EnvironmentBuilder(root, index=index, bytecode="off")
    resolved = environments.resolve(model_dir)
    started = time.monotonic()
    built = builder.ensure(resolved)
    cold = time.monotonic() - started
    nvidia = [p for p in built.packages if p.lower().startswith("nvidia")]
    torch = [p for p in built.packages if p.lower().startswith("torch==")]
    runtime = LocalRuntime(
        state_dir=root / "instances",
        owner="bench-environments",
        code_root=REPO,
        admin_token=lambda name: "bench-token-0123456789",
        environments=builder,
    )
    results = {}

    def deploy(label: str, revision: int) -> None:
        port = free_port()
        spec = InstanceSpec(
            deployment="bench",
            revision=revision,
            ordinal=0,
            model_name=model_dir.name,
            model_version="1",
            model_dir=str(model_dir),
            model_sha256="",
            port=port,
            environment="isolated",
        )
        t0 = time.monotonic()
        runtime.prepare(spec)
        status = runtime.start(spec)
        try:
            ready = wait_ping(status.address, None, 300) - t0
            latency, got = first_prediction(status.address, rows, columns)
        finally:
            runtime.stop(status.runtime_id, timeout=5)
        results[label] = (ready, latency, close(expected, got))

    deploy("no_bytecode", 1)
    builder.bytecode = "background"
    t0 = time.monotonic()
    builder.ensure(resolved)  # reuse: starts the compile, as a prepare does
    builder.wait_bytecode(built.key, timeout=1200)
    bytecode = time.monotonic() - t0
    deploy("warm_1", 2)
    deploy("warm_2", 3)
    warm = min(results["warm_1"][0], results["warm_2"][0])
    return {
        "cold_build": cold,
        "bytecode": bytecode,
        "packages": len(built.packages),
        "torch": torch,
        "nvidia": nvidia,
        "sandboxed": runtime.sandboxed,
        "no_bytecode_ready": results["no_bytecode"][0],
        "warm_ready": warm,
        "first_prediction_ms": results["warm_2"][1],
        "exact": all(r[2] for r in results.values()),
    }


MLFLOW_PREPARE = r"""
import sys, time
from mlflow.pyfunc.backend import PyFuncBackend
started = time.monotonic()
PyFuncBackend({}, env_manager="uv", env_root_dir=sys.argv[2]).prepare_env(sys.argv[1], capture_output=True)
print(f"{time.monotonic() - started:.3f}")
"""


def mlflow_env(index, env_root: Path) -> dict[str, str]:
    return {
        **os.environ,
        **uv_env(index),
        "MLFLOW_ENV_ROOT": str(env_root),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }


def mlflow_prepare(model_dir: Path, env_root: Path, index) -> float:
    """MLflow's own uv env manager creating the model's environment, as `mlflow models serve
    --env-manager uv` does before it starts (PyFuncBackend.prepare_env), timed in-process."""
    out = subprocess.run(
        [sys.executable, "-c", MLFLOW_PREPARE, str(model_dir), str(env_root)],
        env=mlflow_env(index, env_root),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def run_mlflow(model_dir: Path, env_root: Path, index, rows, columns, expected) -> dict:
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    env = mlflow_env(index, env_root)
    out = {}
    for label in ("cold", "warm"):
        port = free_port()
        log = open(env_root.parent / f"mlflow-{model_dir.name}-{label}.log", "w")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [
                mlflow_bin,
                "models",
                "serve",
                "-m",
                str(model_dir),
                "--env-manager",
                "uv",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                "1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out[f"{label}_ready"] = wait_ping(port, proc, 1200) - t0
            latency, got = first_prediction(port, rows, columns)
            out[f"{label}_prediction_ms"] = latency
            out[f"{label}_exact"] = close(expected, got)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    freeze = subprocess.run(
        [
            sys.executable,
            "-m",
            "uv",
            "pip",
            "freeze",
            "--python",
            str(next(env_root.glob("*/bin/python"))),
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    out["nvidia"] = [p for p in freeze if p.lower().startswith("nvidia")]
    out["torch"] = [p for p in freeze if p.lower().startswith("torch==")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sklearn,xgboost,pytorch")
    parser.add_argument("--work", default=None, help="keep files here (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=2, help="cold builds of each (default 2)")
    parser.add_argument(
        "--no-mlflow-serve", action="store_true", help="skip `mlflow models serve` cold/warm"
    )
    args = parser.parse_args()
    which = args.models.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-env-"))
    work.mkdir(parents=True, exist_ok=True)
    index = environments.index_options()
    print(f"work dir {work}; indexes {index}", flush=True)

    import mlflow
    import sklearn
    import skops

    trainer_reqs = [
        f"mlflow-skinny=={mlflow.__version__}",
        f"scikit-learn=={sklearn.__version__}",
        f"skops=={skops.__version__}",
        "pandas",
        "numpy",
        "cloudpickle",
    ]
    if "xgboost" in which:
        trainer_reqs.append("xgboost<3.4")  # 3.4 needs Python 3.12
    if "pytorch" in which:
        trainer_reqs.append("torch==2.13.0")
    trainer = environments.EnvironmentBuilder(work / "trainer-envs", index=index).ensure(
        environments.ResolvedEnvironment(
            python=None, model_requirements=tuple(sorted(trainer_reqs)), serving_requirements=()
        )
    )
    print(f"trainer env: {len(trainer.packages)} packages in {trainer.seconds:.1f} s", flush=True)
    models = work / "models"
    subprocess.run(
        [str(trainer.python), "-c", TRAIN, str(models), ",".join(which)],
        check=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    data = json.loads((models / "expected.json").read_text())
    rows = data["rows"]

    table = []
    for name in which:
        model_dir = models / name
        columns = None if name == "pytorch" else [f"f{i}" for i in range(8)]  # a tensor model
        reqs = (model_dir / "requirements.txt").read_text().split()
        print(f"\n{name}: requirements {reqs}", flush=True)
        # Cold builds, ours and MLflow's alternating, each in a new directory (uv's cache as
        # this host has it, the same for both): the best of --rounds each.
        ours_cold, theirs_cold = [], []
        for i in range(args.rounds):
            builder = environments.EnvironmentBuilder(
                work / f"cold-{name}-{i}", index=index, bytecode="off"
            )
            t0 = time.monotonic()
            builder.ensure(environments.resolve(model_dir))
            ours_cold.append(time.monotonic() - t0)
            theirs_cold.append(mlflow_prepare(model_dir, work / f"mlflow-prep-{name}-{i}", index))
            print(f"  round {i + 1}: cold build ours {ours_cold[-1]:.2f} s, "
                  f"MLflow uv {theirs_cold[-1]:.2f} s", flush=True)  # fmt: skip
            shutil.rmtree(work / f"cold-{name}-{i}", ignore_errors=True)
            shutil.rmtree(work / f"mlflow-prep-{name}-{i}", ignore_errors=True)
        ours = run_ours(
            model_dir, work / f"envs-{name}", index, rows, columns, data["expected"][name]
        )
        ours["cold_builds"], ours["mlflow_prepares"] = ours_cold, theirs_cold
        print(f"  ours   {ours}", flush=True)
        theirs = {}
        if not args.no_mlflow_serve:
            theirs = run_mlflow(
                model_dir, work / f"mlflow-{name}", index, rows, columns, data["expected"][name]
            )
            print(f"  mlflow {theirs}", flush=True)
        table.append((name, ours, theirs))

    print(f"\nCold environment build, best of {args.rounds} alternating rounds (uv cache warm "
          "for both): ours = EnvironmentBuilder.ensure on a new root; MLflow = "
          "PyFuncBackend(env_manager='uv').prepare_env, what `mlflow models serve --env-manager "
          "uv` runs before it starts.\n")  # fmt: skip
    print("| model | ours: cold build | MLflow uv: cold env creation | ours/MLflow |")
    print("|---|---:|---:|---:|")
    for name, o, _t in table:
        a, b = min(o["cold_builds"]), min(o["mlflow_prepares"])
        print(f"| {name} ({o['packages']} packages) | {a:.2f} s | {b:.2f} s | {a / b:.2f} |")
    sandboxed = all(o["sandboxed"] for _, o, _ in table)
    print(f"\nDeploy -> ready on the local runtime ({'sandboxed' if sandboxed else 'not sandboxed'}"
          "), prepare to the first /ping 200:\n")  # fmt: skip
    print("| model | bytecode compile (background, after the build) | warm deploy -> ready "
          "without bytecode | warm deploy -> ready with bytecode | first prediction | exact |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|")
    for name, o, _t in table:
        print(f"| {name} | {o['bytecode']:.1f} s | {o['no_bytecode_ready']:.2f} s "
              f"| {o['warm_ready']:.2f} s | {o['first_prediction_ms']:.0f} ms | {o['exact']} |")  # fmt: skip
    if not args.no_mlflow_serve:
        print("\n| model | MLflow: cold serve -> ready | MLflow: warm serve -> ready "
              "| MLflow: first prediction | exact |")  # fmt: skip
        print("|---|---:|---:|---:|---|")
        for name, _o, t in table:
            print(f"| {name} | {t['cold_ready']:.1f} s | {t['warm_ready']:.2f} s "
                  f"| {t['warm_prediction_ms']:.0f} ms | {t['cold_exact'] and t['warm_exact']} |")  # fmt: skip
    for name, o, t in table:
        if o["torch"] or t.get("torch"):
            print(f"{name}: ours {o['torch']} nvidia {o['nvidia']}; "
                  f"mlflow {t.get('torch')} nvidia {t.get('nvidia')}")  # fmt: skip
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
