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

At c=1 it also compares ours with two floors: the summed one, and the transport calling
`predict` per request. `--paired-rounds N` (default 6) alternates short c=1 runs of ours, that
floor and the transport while all three are up, and prints the median of each round's ratios.
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
import warnings
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


def run_h2load_grpc(target: str, row: list[float], concurrency: int, duration: float) -> dict:
    """gRPC ModelInfer driven by h2load (nghttp2-client, C): one HTTP/2 connection with
    ``concurrency`` streams in flight, each a POST with a length-prefixed ModelInferRequest,
    ``content-type: application/grpc`` and ``te: trailers``. h2load does not read trailers,
    so the answer's grpc-status is checked once with grpc beforehand (check_grpc)."""
    body = _grpc_request_bytes(row)
    with tempfile.NamedTemporaryFile("wb", suffix=".bin", delete=False) as handle:
        handle.write(b"\x00" + len(body).to_bytes(4, "big") + body)
    try:
        out = subprocess.run(
            ["h2load", "-t1", "-c1", f"-m{concurrency}", f"-D{max(1, round(duration))}",
             "--data", handle.name, "-H", "content-type: application/grpc", "-H", "te: trailers",
             f"http://{target}/inference.GRPCInferenceService/ModelInfer"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(handle.name)
    done = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
        out,
    )
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    times = re.search(
        r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out
    )

    def ms(value: str, unit: str) -> float:
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return {
        "rps": rps,
        "p50": ms(times.group(5), times.group(6)),  # h2load gives min/max/mean: the mean
        "p99": ms(times.group(3), times.group(4)),  # and the max
        "errors": int(done.group(3)) + int(done.group(4)),
        "requests": int(done.group(1)),
        "latency_note": "mean/max",
    }


def _pb():
    # by path: from bench/, `import serving` would find this file
    spec = importlib.util.spec_from_file_location(
        "grpc_predict_v2_pb2", REPO / "serving" / "grpc_predict_v2_pb2.py"
    )
    pb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb)
    return pb


def _grpc_request_bytes(row: list[float]) -> bytes:
    import numpy as np

    pb = _pb()
    request = pb.ModelInferRequest(model_name="bench")
    request.inputs.add(name="input-0", datatype="FP64", shape=[1, len(row)])
    request.raw_input_contents.append(np.asarray([row], dtype="<f8").tobytes())
    return request.SerializeToString()


ECHO_SERVER = r"""
import asyncio, re, sys
import uvloop
BODY = b'{"predictions": [1]}'
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t, self.buf = transport, b""
    def data_received(self, data):
        self.buf += data
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            m = re.search(rb"(?i)content-length: *(\d+)", head)
            n = int(m.group(1)) if m else 0
            if len(rest) < n:
                return
            self.buf = rest[n:]
            if MODEL is not None:
                MODEL.predict(X)
            self.t.write(RESPONSE)
MODEL = X = None
if len(sys.argv) > 2:  # the model's directory and one row: one predict per request
    import json, warnings
    import mlflow.sklearn, numpy as np
    warnings.simplefilter("ignore", UserWarning)  # "X does not have valid feature names"
    MODEL = mlflow.sklearn.load_model(sys.argv[2])
    X = np.asarray([json.loads(sys.argv[3])], dtype=np.float64)
async def main():
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()
uvloop.run(main())
"""


def warm_model(model_dir: Path, row: list[float]):
    """The bench model loaded in this process, warmed up, and the row as its input matrix."""
    import mlflow.sklearn
    import numpy as np

    model = mlflow.sklearn.load_model(str(model_dir))
    x = np.asarray([row], dtype=np.float64)
    warnings.simplefilter("ignore", UserWarning)  # "X does not have valid feature names"
    for _ in range(200):
        model.predict(x)
    return model, x


def time_predict(model, x, seconds: float) -> tuple[float, float]:
    """Seconds of wall time and of CPU per predict, timed in a loop for ``seconds``."""
    n, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        model.predict(x)
        n += 1
    return (time.perf_counter() - started) / n, (time.process_time() - cpu) / n


def start_echo(generate, body: str, *args: str) -> tuple[subprocess.Popen, str]:
    """The echo server (args: none, or the model's directory and the row), warmed up; its
    process and URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(port), *args],
                            stdout=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/invocations"
        generate(url, body, 1, 1.0)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def in_process_floor(
    model_dir: Path, row: list[float], generate, body: str, duration: float
) -> dict:
    """The c=1 floor: the transport (a uvloop HTTP server answering a fixed body, the same
    load generator and request) plus one ``predict`` of the model on one row, in-process.

    Two ways: summed (the transport alone, plus one predict timed in a loop of predicts) and
    measured (the same transport calling that predict on a prepared row for each request, no
    parsing: what any server that calls predict once per request cannot beat here). They
    differ because a predict between requests runs on colder caches than in a loop."""
    model, x = warm_model(model_dir, row)
    predict_s, predict_cpu_s = time_predict(model, x, 1.0)

    def echo_server(*args: str) -> dict:
        """c=1 against the echo server (args: none, or the model's directory and the row)."""
        proc, url = start_echo(generate, body, *args)
        try:
            return with_cpu(proc.pid, lambda: generate(url, body, 1, duration))
        finally:
            stop(proc)

    echo = echo_server()
    measured = echo_server(str(model_dir), json.dumps(row))
    transport_s = 1 / echo["rps"]
    return {
        "predict_us": predict_s * 1e6,
        "transport_us": transport_s * 1e6,
        "rps": 1 / (transport_s + predict_s),
        # CPU, steadier than wall time on a loaded machine: the echo server's per request
        # plus one predict's
        "cpu_us": (echo["cpu_us"] or 0) + predict_cpu_s * 1e6,
        "predict_cpu_us": predict_cpu_s * 1e6,
        "measured_rps": measured["rps"],
        "measured_cpu_us": measured["cpu_us"] or 0,
    }


def paired_c1(
    ours_url: str,
    ours_pid: int | None,
    model_dir: Path,
    row: list[float],
    generate,
    body: str,
    rounds: int,
    seconds: float,
) -> dict:
    """c=1 of ours, the measured floor and the bare transport in alternating short runs, while
    all three servers are up. The same server on this machine measured 1,400 and 3,100 req/s
    minutes apart; a ratio of runs taken minutes apart carries such drift whole. Each round's ratios
    use that round's runs; the medians over rounds are reported."""
    import statistics

    model, x = warm_model(model_dir, row)
    procs, urls = [], {}
    try:
        for label, args in (("transport", []), ("measured", [str(model_dir), json.dumps(row)])):
            proc, urls[label] = start_echo(generate, body, *args)
            procs.append(proc)
        urls["ours"] = ours_url
        pids = {"ours": ours_pid, "transport": procs[0].pid, "measured": procs[1].pid}
        per_round = []
        for _ in range(rounds):
            got = {k: with_cpu(pids[k], lambda u=u: generate(u, body, 1, seconds))
                   for k, u in urls.items()}  # fmt: skip
            predict_s = time_predict(model, x, 0.3)[0]  # one predict in a loop, this round
            summed_rps = 1 / (1 / got["transport"]["rps"] + predict_s)
            per_round.append({
                "ours_rps": got["ours"]["rps"],
                "measured_rps": got["measured"]["rps"],
                "summed_rps": summed_rps,
                "ours_of_measured": got["ours"]["rps"] / got["measured"]["rps"],
                "ours_of_summed": got["ours"]["rps"] / summed_rps,
                "measured_of_summed": got["measured"]["rps"] / summed_rps,
                "cpu_ours_of_measured": (got["measured"]["cpu_us"] or 0)
                / max(1e-9, got["ours"]["cpu_us"] or 0),
            })  # fmt: skip
    finally:
        for proc in procs:
            stop(proc)
    return {
        "rounds": per_round,
        **{k: statistics.median(r[k] for r in per_round) for k in per_round[0]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument(
        "--concurrency", default="1,16,64", help="comma-separated (default 1,16,64)"
    )
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--grpc-loadgen", choices=["auto", "h2load", "python", "both"], default="auto",
        help="h2load (C; nghttp2-client) when installed, else grpc.aio; both: each",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="our server's --workers (default 1)")
    parser.add_argument(
        "--rows-concurrency",
        type=int,
        default=4,
        help="concurrency of the 100-row runs (default 4)",
    )
    parser.add_argument(
        "--paired-rounds", type=int, default=6,
        help="alternating c=1 rounds of ours, the measured floor and the transport (default 6; "
        "0 skips them)",
    )  # fmt: skip
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC runs")
    parser.add_argument("--no-mlflow", action="store_true", help="skip `mlflow models serve`")
    parser.add_argument("--no-peers", action="store_true", help="skip MLServer and KServe")
    parser.add_argument(
        "--servers", default=None, help="comma-separated subset: mlflow,mlserver,kserve,ours"
    )
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    levels = [int(c) for c in args.concurrency.split(",")]
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    generate = run_wrk if loadgen == "wrk" else run_python
    grpc_loadgens = {
        "auto": ["h2load" if shutil.which("h2load") else "python"],
        "both": ["h2load", "python"],
    }.get(args.grpc_loadgen, [args.grpc_loadgen])
    grpc_runners = {"h2load": run_h2load_grpc, "python": run_grpc}

    import sklearn

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers

    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model_dir = workdir / "model"
    row, hundred = build_model(model_dir)
    import joblib
    import mlflow.sklearn

    model_file = workdir / "model.joblib"  # the same fitted model, for the peers
    joblib.dump(mlflow.sklearn.load_model(str(model_dir)), model_file)
    mlflow_body = lambda rows: json.dumps({"dataframe_split": {"columns": FEATURES, "data": rows}})  # noqa: E731
    v2_body = lambda rows: json.dumps(  # noqa: E731
        {"inputs": [{"name": "input-0", "shape": [len(rows), len(FEATURES)], "datatype": "FP64",
                     "data": [v for r in rows for v in r]}]}
    )  # fmt: skip
    v1_body = lambda rows: json.dumps({"instances": rows})  # noqa: E731
    results: dict[tuple[str, int], dict] = {}
    rows_per_call: float | None = None
    grpc_port = free_port()
    ours = "serving (ours)"

    # name -> (command(port), ready path, request path, body(rows))
    servers = {
        "mlflow models serve": (lambda port: [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
            "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1",
        ], "/ping", "/invocations", mlflow_body),
        "MLServer 1.7.1": (lambda port: peers.mlserver_command(
            workdir, model_file, port, free_port(), free_port(), sklearn.__version__
        ), "/v2/health/ready", "/v2/models/bench/infer", v2_body),
        "KServe 0.21 ModelServer": (lambda port: peers.kserve_command(
            workdir, model_file, port, sklearn.__version__
        ), "/v1/models/bench", "/v1/models/bench:predict", v1_body),
        ours: (lambda port: [
            sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--name", "bench",
            "--version", "1", "--port", str(port), "--workers", str(args.workers),
            "--log-level", "WARNING",
            *([] if args.no_grpc else ["--grpc-port", str(grpc_port)]),
        ], "/ping", "/invocations", mlflow_body),
    }  # fmt: skip
    if args.servers:
        wanted = args.servers.split(",")
        keys = {"mlflow": "mlflow models serve", "mlserver": "MLServer 1.7.1",
                "kserve": "KServe 0.21 ModelServer", "ours": ours}  # fmt: skip
        servers = {keys[w]: servers[keys[w]] for w in wanted}
    if args.no_mlflow:
        servers.pop("mlflow models serve", None)
    if args.no_peers:
        servers.pop("MLServer 1.7.1", None)
        servers.pop("KServe 0.21 ModelServer", None)
    floor = paired = None
    peer_names = [n for n in servers if n not in (ours, "mlflow models serve")]
    try:
        for name, (command, ready, path, make_body) in servers.items():
            body, body_100 = make_body([row]), make_body(hundred)
            port = free_port()
            log = open(workdir / f"{name.split()[0]}.log", "wb")
            # `mlflow models serve` runs `uvicorn` from PATH: put this interpreter's bin first.
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
            proc = subprocess.Popen(
                command(port),
                cwd=REPO if name == ours else workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                wait_ready(f"http://127.0.0.1:{port}{ready}", proc, timeout=600)
                print(
                    f"{name}: listening on {peers.check_loopback_only(proc.pid, name)}", flush=True
                )
                url = f"http://127.0.0.1:{port}{path}"
                generate(url, body, 4, 1.0)  # warm-up
                # a server with one worker is one process: its CPU per request is measured
                # (`mlflow models serve` answers from uvicorn children: not measured)
                pid = (
                    proc.pid if (name == ours and args.workers == 1) or name in peer_names else None
                )
                for concurrency in levels:
                    before = (
                        batch_stats(f"http://127.0.0.1:{port}/metrics") if name == ours else None
                    )
                    results[(name, concurrency)] = with_cpu(
                        pid, lambda c=concurrency, u=url, b=body: generate(u, b, c, args.duration)
                    )
                    print(
                        f"  {name} c={concurrency}: {results[(name, concurrency)]['rps']:.0f} req/s",
                        flush=True,
                    )
                    if before is not None and concurrency == max(levels):
                        after = batch_stats(f"http://127.0.0.1:{port}/metrics")
                        rows_per_call = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                    time.sleep(0.5)
                if name == ours and 1 in levels and args.paired_rounds > 0:
                    paired = paired_c1(url, pid, model_dir, row, generate, body,
                                       args.paired_rounds, 2.0)  # fmt: skip
                results[(f"{name}, 100 rows", args.rows_concurrency)] = with_cpu(
                    pid,
                    lambda u=url, b=body_100: generate(u, b, args.rows_concurrency, args.duration),
                )
                if name == ours and not args.no_grpc:
                    run_grpc(f"127.0.0.1:{grpc_port}", row, 4, 1.0)  # warm-up, and answers OK
                    for lg in grpc_loadgens:
                        for concurrency in levels:
                            results[(f"{name}, gRPC ({lg})", concurrency)] = with_cpu(
                                pid,
                                lambda c=concurrency, r=grpc_runners[lg]: r(
                                    f"127.0.0.1:{grpc_port}", row, c, args.duration
                                ),
                            )
                            time.sleep(0.5)
            finally:
                stop(proc)
                log.close()
        if ours in servers:
            floor = in_process_floor(model_dir, row, generate, mlflow_body([row]), args.duration)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nLoad generator: {loadgen} (HTTP), {', '.join(grpc_loadgens)} (gRPC); "
          f"{args.duration:g} s per run; one-row requests in each server's own format (ours and "
          f"MLflow: /invocations dataframe_split; MLServer: OIP v2 JSON; KServe: v1 instances), "
          f"keep-alive; {os.cpu_count()} cores shared by server and load generator; one worker "
          f"each (ours: {args.workers}).\n")  # fmt: skip
    peer_names = [n for n in servers if n != ours]

    def best_peer(concurrency: int, suffix: str = "") -> tuple[str, float] | None:
        found = [(n, results[(n + suffix, concurrency)]["rps"]) for n in peer_names
                 if (n + suffix, concurrency) in results]  # fmt: skip
        return max(found, key=lambda x: x[1]) if found else None

    print("| server | concurrency | req/s | p50 ms | p99 ms | errors | server CPU µs/req "
          "| ours / best peer |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (name, concurrency), r in results.items():
        ratio = ""
        suffix = ", 100 rows" if "100 rows" in name else ""
        if name.startswith(ours) and "gRPC" not in name:
            best = best_peer(concurrency, suffix)
            if best:
                ratio = f"{r['rps'] / best[1]:.1f}x ({best[0].split()[0]})"
        if "gRPC" in name and (ours, concurrency) in results:
            ratio = f"{r['rps'] / results[(ours, concurrency)]['rps']:.2f}x of our HTTP"
        cpu = f"{r['cpu_us']:.0f}" if r.get("cpu_us") is not None else ""
        note = f" ({r['latency_note']})" if r.get("latency_note") else ""
        print(f"| {name}{note} | {concurrency} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} "
              f"| {r['errors']} | {cpu} | {ratio} |")  # fmt: skip
    if rows_per_call is not None:
        print(f"\nOur server at concurrency {max(levels)}: {rows_per_call:.1f} rows per model call "
              "(serving_batch_size_sum / _count over that run).")  # fmt: skip
    if floor and (ours, 1) in results:
        print(f"\nIn-process floor at c=1: transport {floor['transport_us']:.0f} µs (a uvloop "
              f"server answering a fixed body, same load generator) + one predict "
              f"{floor['predict_us']:.0f} µs = {floor['rps']:.0f} req/s; ours "
              f"{results[(ours, 1)]['rps']:.0f} req/s = "
              f"{results[(ours, 1)]['rps'] / floor['rps']:.0%} of it. In server CPU per request: "
              f"floor {floor['cpu_us']:.0f} µs (predict {floor['predict_cpu_us']:.0f} µs), ours "
              f"{results[(ours, 1)]['cpu_us'] or 0:.0f} µs = "
              f"{floor['cpu_us'] / max(1e-9, results[(ours, 1)]['cpu_us'] or 0):.0%} of the floor's "
              "efficiency.")  # fmt: skip
        print(f"Measured floor at c=1 (that transport calling that predict for each request, on "
              f"a prepared row): {floor['measured_rps']:.0f} req/s, {floor['measured_cpu_us']:.0f} "
              f"µs server CPU per request; ours = "
              f"{results[(ours, 1)]['rps'] / floor['measured_rps']:.0%} of it "
              f"({floor['measured_cpu_us'] / max(1e-9, results[(ours, 1)]['cpu_us'] or 0):.0%} "
              "in CPU).")  # fmt: skip
    if paired:
        print(f"\nPaired c=1 ({len(paired['rounds'])} rounds of 2 s runs, alternating ours, the "
              "measured floor and the transport; medians of each round's ratios): ours = "
              f"{paired['ours_of_measured']:.0%} of the measured floor "
              f"({paired['cpu_ours_of_measured']:.0%} in CPU) and "
              f"{paired['ours_of_summed']:.0%} of the summed floor; the measured floor itself = "
              f"{paired['measured_of_summed']:.0%} of the summed floor.")  # fmt: skip
        print("  per round, ours / measured / summed req/s: " + "; ".join(
            f"{r['ours_rps']:.0f} / {r['measured_rps']:.0f} / {r['summed_rps']:.0f}"
            for r in paired["rounds"]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
