"""Benchmark: our model server (`python -m serving`) against `mlflow models serve`.

    MLFLOW_DISABLE_TELEMETRY=true .venv/bin/python bench/serving.py [--duration 10]

Builds one scikit-learn LogisticRegression on 20 features, serves it with both servers (one
after the other, one worker each, on 127.0.0.1), drives each with the same load generator at
concurrency 1, 16 and 64 with one-row JSON requests on keep-alive connections, then with
100-row requests (`--rows-concurrency`, default 4), and prints one markdown table. Our server
is also driven over gRPC (OIP v2 ModelInfer, one [1, 20] FP64 tensor in raw_input_contents,
one channel shared by the concurrent callers; `--no-grpc` skips it). The load generator is wrk
with a Lua script when installed (apt-get install wrk), else a small asyncio one in this file
(grpc.aio for gRPC); either shares the machine's cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FEATURES = [f"f{i}" for i in range(20)]


def build_model(path: Path) -> tuple[list[float], list[list[float]]]:
    """Train and save the model; return one input row and 100 rows."""
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
    )
    rows = [[round(v, 6) for v in r] for r in X.iloc[:100].to_numpy().tolist()]
    return rows[0], rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- load generators --------------------------------------------------------------------------


def run_wrk(url: str, body: str, concurrency: int, duration: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(body)}\n"
        )
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "--latency",
             "-s", script.name, url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(script.name)

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    requests_total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        errors += sum(int(g) for g in match.groups())
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": ms("50"),
        "p99": ms("99"),
        "errors": errors,
        "requests": requests_total,
    }


async def _python_load(
    host: str, port: int, path: str, body: bytes, concurrency: int, duration: float
) -> dict:
    request = (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), host.encode(), len(body), body)
    )
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
        writer.close()

    started = time.perf_counter()
    results = await asyncio.gather(*(worker() for _ in range(concurrency)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    errors += sum(1 for r in results if isinstance(r, Exception))
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": errors,
        "requests": len(latencies),
    }


def run_python(url: str, body: str, concurrency: int, duration: float) -> dict:
    match = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    host, port, path = match.group(1), int(match.group(2)), match.group(3)
    return asyncio.run(_python_load(host, port, path, body.encode(), concurrency, duration))


async def _grpc_load(target: str, row: list[float], concurrency: int, duration: float) -> dict:
    import grpc
    import numpy as np

    # by path: from bench/, `import serving` would find this file
    spec = importlib.util.spec_from_file_location(
        "grpc_predict_v2_pb2", REPO / "serving" / "grpc_predict_v2_pb2.py"
    )
    pb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb)

    request = pb.ModelInferRequest(model_name="bench")
    request.inputs.add(name="input-0", datatype="FP64", shape=[1, len(row)])
    request.raw_input_contents.append(np.asarray([row], dtype="<f8").tobytes())
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    # one channel (one HTTP/2 connection) shared by all callers, as gRPC clients are used
    channel = grpc.aio.insecure_channel(target)
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await infer(request, timeout=10)
            except grpc.aio.AioRpcError:
                errors += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    results = await asyncio.gather(*(worker() for _ in range(concurrency)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    errors += sum(1 for r in results if isinstance(r, Exception))
    await channel.close()
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": errors,
        "requests": len(latencies),
    }


def run_grpc(target: str, row: list[float], concurrency: int, duration: float) -> dict:
    try:
        import uvloop

        return uvloop.run(_grpc_load(target, row, concurrency, duration))
    except ImportError:
        return asyncio.run(_grpc_load(target, row, concurrency, duration))


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process (Linux /proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(pid: int | None, run) -> dict:
    """run()'s result plus the server's CPU microseconds per request (when pid is given):
    a figure that, unlike req/s, hardly depends on what else the machine runs."""
    before = process_cpu_seconds(pid) if pid else None
    result = run()
    after = process_cpu_seconds(pid) if pid else None
    result["cpu_us"] = None
    if before is not None and after is not None and result["requests"]:
        result["cpu_us"] = (after - before) / result["requests"] * 1e6
    return result


def batch_stats(metrics_url: str) -> tuple[float, float]:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    total = float(re.search(r"^serving_batch_size_sum ([\d.e+]+)$", text, re.MULTILINE).group(1))
    calls = float(re.search(r"^serving_batch_size_count ([\d.e+]+)$", text, re.MULTILINE).group(1))
    return total, calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument(
        "--concurrency", default="1,16,64", help="comma-separated (default 1,16,64)"
    )
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--workers", type=int, default=1, help="our server's --workers (default 1)")
    parser.add_argument(
        "--rows-concurrency",
        type=int,
        default=4,
        help="concurrency of the 100-row runs (default 4)",
    )
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC runs")
    parser.add_argument("--no-mlflow", action="store_true", help="skip `mlflow models serve`")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    levels = [int(c) for c in args.concurrency.split(",")]
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    generate = run_wrk if loadgen == "wrk" else run_python

    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model_dir = workdir / "model"
    row, hundred = build_model(model_dir)
    body = json.dumps({"dataframe_split": {"columns": FEATURES, "data": [row]}})
    body_100 = json.dumps({"dataframe_split": {"columns": FEATURES, "data": hundred}})
    results: dict[tuple[str, int], dict] = {}
    rows_per_call: float | None = None

    servers = {
        "mlflow models serve": lambda port: [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
            "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1",
        ],
        "serving (ours)": lambda port: [
            sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--name", "bench",
            "--version", "1", "--port", str(port), "--workers", str(args.workers),
            "--log-level", "WARNING",
            *([] if args.no_grpc else ["--grpc-port", str(grpc_port)]),
        ],
    }  # fmt: skip
    if args.no_mlflow:
        del servers["mlflow models serve"]
    grpc_port = free_port()
    try:
        for name, command in servers.items():
            port = free_port()
            log = open(workdir / f"{name.split()[0]}.log", "wb")
            # `mlflow models serve` runs `uvicorn` from PATH: put this interpreter's bin first.
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
            proc = subprocess.Popen(
                command(port),
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                wait_ready(f"http://127.0.0.1:{port}/ping", proc)
                url = f"http://127.0.0.1:{port}/invocations"
                generate(url, body, 4, 1.0)  # warm-up
                # our server with one worker is one process: its CPU per request is measured
                pid = proc.pid if "ours" in name and args.workers == 1 else None
                for concurrency in levels:
                    before = (
                        batch_stats(f"http://127.0.0.1:{port}/metrics") if "ours" in name else None
                    )
                    results[(name, concurrency)] = with_cpu(
                        pid, lambda c=concurrency, u=url: generate(u, body, c, args.duration)
                    )
                    if before is not None and concurrency == max(levels):
                        after = batch_stats(f"http://127.0.0.1:{port}/metrics")
                        rows_per_call = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                    time.sleep(0.5)
                results[(f"{name}, 100 rows", args.rows_concurrency)] = with_cpu(
                    pid, lambda u=url: generate(u, body_100, args.rows_concurrency, args.duration)
                )
                if "ours" in name and not args.no_grpc:
                    run_grpc(f"127.0.0.1:{grpc_port}", row, 4, 1.0)  # warm-up
                    for concurrency in levels:
                        results[(f"{name}, gRPC", concurrency)] = with_cpu(
                            pid,
                            lambda c=concurrency: run_grpc(
                                f"127.0.0.1:{grpc_port}", row, c, args.duration
                            ),
                        )
                        time.sleep(0.5)
            finally:
                stop(proc)
                log.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nLoad generator: {loadgen}; {args.duration:g} s per run; one-row JSON requests "
          f"(dataframe_split), keep-alive; {os.cpu_count()} cores shared by server and load "
          f"generator; our server with {args.workers} worker(s), MLflow with 1.\n")  # fmt: skip
    print(
        "| server | concurrency | req/s | p50 ms | p99 ms | errors | server CPU µs/req "
        "| ours/MLflow req/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, concurrency), r in results.items():
        ratio = ""
        peer = "mlflow models serve" + (", 100 rows" if "100 rows" in name else "")
        if "ours" in name and "gRPC" not in name and (peer, concurrency) in results:
            ratio = f"{r['rps'] / results[(peer, concurrency)]['rps']:.1f}x"
        if "gRPC" in name and ("serving (ours)", concurrency) in results:
            http = results[("serving (ours)", concurrency)]["rps"]
            ratio = f"{r['rps'] / http:.2f}x of our HTTP"
        cpu = f"{r['cpu_us']:.0f}" if r.get("cpu_us") is not None else ""
        print(
            f"| {name} | {concurrency} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} "
            f"| {r['errors']} | {cpu} | {ratio} |"
        )
    if rows_per_call is not None:
        print(f"\nOur server at concurrency {max(levels)}: {rows_per_call:.1f} rows per model call "
              "(serving_batch_size_sum / _count over that run).")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
