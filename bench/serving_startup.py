"""Benchmark: cold start of the model server, from exec to the first `GET /ping` 200.

    MLFLOW_DISABLE_TELEMETRY=true .venv/bin/python bench/serving_startup.py [--runs 5]
        [--format skops|cloudpickle|pickle] [--model-dir DIR] [--code-dir DIR]

Saves one scikit-learn LogisticRegression on 20 features with `mlflow.sklearn.save_model`
(signature and input example, as the registry stores models), then starts
`python -m serving --model-dir DIR ...` `--runs` times one after the other and measures, per run,
the time from just before `exec` to the first 200 on `/ping` (polled every 5 ms), and the CPU
time the server process had used by then (from /proc, Linux only). Prints each run, the medians
and minimums, and how the server loaded the model. A rollback starts such a process, so this is
the floor of a rollback's time to serve.

The machine's load matters more than anything here: compare numbers taken back to back, e.g.
this tree against a copy of an older `serving/` package (`--code-dir` names the folder that
holds that package). On a busy machine the CPU time varies much less than the wall time, and is
close to the wall time the same start takes on an idle one.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FEATURES = [f"f{i}" for i in range(20)]


def build_model(path: Path, serialization_format: str) -> None:
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(500, 20)), columns=FEATURES)
    y = (X["f0"] + X["f1"] - X["f2"] > 0).astype(np.int64)
    model = LogisticRegression(max_iter=500).fit(X, y)
    mlflow.sklearn.save_model(
        model,
        str(path),
        signature=infer_signature(X, model.predict(X)),
        input_example=X.iloc[:2],
        pip_requirements=["mlflow", "scikit-learn"],
        serialization_format=serialization_format,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (None where /proc is not available)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_start(
    model_dir: Path, log_path: Path, timeout: float, code_dir: Path = REPO
) -> tuple[float, float | None, str]:
    """Seconds from exec to /ping 200, CPU seconds used by then, the server's "ready" line."""
    port = free_port()
    args = [
        sys.executable, "-m", "serving", "--model-dir", str(model_dir),
        "--name", "bench", "--version", "1", "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    url = f"http://127.0.0.1:{port}/ping"
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(args, cwd=code_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while not ping(url):
                if proc.poll() is not None:
                    raise SystemExit(
                        f"server exited with {proc.returncode}:\n{log_path.read_text()}"
                    )
                if time.perf_counter() - started > timeout:
                    raise SystemExit(f"not ready after {timeout}s:\n{log_path.read_text()}")
                time.sleep(0.005)
            seconds = time.perf_counter() - started
            cpu = cpu_seconds(proc.pid)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    ready = re.search(r"ready: .*", log_path.read_text())
    return seconds, cpu, ready.group(0) if ready else "(no ready line)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--format", default="skops", choices=["skops", "cloudpickle", "pickle"])
    parser.add_argument("--model-dir", type=Path, help="serve this model instead of building one")
    parser.add_argument("--code-dir", type=Path, default=REPO, help="folder holding serving/")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    with tempfile.TemporaryDirectory(prefix="serving-startup-") as tmp:
        tmp_path = Path(tmp)
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = tmp_path / "model"
            build_model(model_dir, args.format)
        # One unmeasured start: fills the OS page cache and writes the .pyc files.
        one_start(model_dir, tmp_path / "warm.log", args.timeout, args.code_dir)
        times, cpus = [], []
        for i in range(args.runs):
            seconds, cpu, ready = one_start(
                model_dir, tmp_path / f"run-{i}.log", args.timeout, args.code_dir
            )
            times.append(seconds)
            cpus.append(cpu)
            cpu_text = f", {cpu:.2f}s CPU" if cpu is not None else ""
            print(f"run {i + 1}: {seconds:.3f}s{cpu_text}  ({ready})", flush=True)
    load = os.getloadavg()[0]
    print(
        f"exec -> /ping 200 over {args.runs} runs: median {statistics.median(times):.3f}s, "
        f"min {min(times):.3f}s (load average {load:.2f} on {os.cpu_count()} cores)"
    )
    if None not in cpus:
        print(
            f"CPU time of the server by then: median {statistics.median(cpus):.3f}s, "
            f"min {min(cpus):.3f}s"
        )


if __name__ == "__main__":
    main()
