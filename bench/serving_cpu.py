"""In-process CPU per request of our model server: gRPC ModelInfer on one HTTP/2 connection
with C streams in flight against HTTP /invocations on C connections, on the same App and model.

    MLFLOW_DISABLE_TELEMETRY=true .venv/bin/python bench/serving_cpu.py [--concurrency 16]
        [--rounds 3000] [--repeat 3] [--only grpc|http] [--profile] [--rows 100]

No sockets: each protocol gets a fake transport that collects what it writes. A round feeds C
requests in one loop iteration (what one read of C streams, or C readable connections, gives
the server), then runs the loop until the C answers are written; the next round starts then,
as a closed-loop load generator's would. CPU is `time.process_time` over all rounds, divided
by the requests: the server's own work per request (parsing, the call, batching, one predict
per batch, encoding, writes), without the kernel's socket work or the load generator's.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hpack import Encoder  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return n.to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


class FakeTransport:
    """Collects writes; `on_write(data)` sees each."""

    def __init__(self, on_write) -> None:
        self.on_write = on_write
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.on_write(data)

    def get_extra_info(self, name: str, default=None):
        return default

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


_OK_TRAILERS = b"\x00\x00\x0f\x01\x05"  # HEADERS of 15 bytes, END_STREAM | END_HEADERS


def count_ends(data: bytes) -> int:
    """The answers' trailers (grpc-status 0) in what was written; found by their frame header,
    as cheaply as HTTP's count of writes."""
    return data.count(_OK_TRAILERS)


def make_app(model_dir: Path, loop):
    from serving.app import App
    from serving.config import load_settings
    from serving.server import _load_and_warm_up

    settings = load_settings(
        ["--model-dir", str(model_dir), "--name", "bench", "--version", "1"], os.environ
    )
    app = App(settings, loop)
    model, seconds = _load_and_warm_up(settings)
    app.set_model(model, seconds)
    return app


def grpc_bench(app, loop, row: list[float], concurrency: int, rounds: int) -> tuple[float, dict]:
    from serving.h2grpc import GrpcServer

    body = _bench()._grpc_request_bytes(row)
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    state = {"ended": 0, "waiter": None, "bytes": 0}

    def on_write(data: bytes) -> None:
        state["bytes"] += len(data)
        state["ended"] += count_ends(data)
        if state["waiter"] is not None and state["ended"] >= concurrency:
            state["waiter"].set_result(None)
            state["waiter"] = None

    transport = FakeTransport(on_write)
    conn = GrpcServer(app, 16 << 20).protocol()
    conn.connection_made(transport)
    # h2load's opening: its settings (windows of 2^30 - 1), and the connection window
    settings = (4).to_bytes(2, "big") + (2**30 - 1).to_bytes(4, "big")
    settings += (2).to_bytes(2, "big") + (0).to_bytes(4, "big")
    conn.data_received(
        PREFACE + frame(4, 0, 0, settings) + frame(8, 0, 0, (2**30 - 1 - 65535).to_bytes(4, "big"))
    )
    encoder = Encoder()
    headers = [
        (":method", "POST"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
        (":scheme", "http"), (":authority", "127.0.0.1:1"), ("accept", "*/*"),
        ("accept-encoding", "gzip, deflate"), ("user-agent", "h2load nghttp2/1.59.0"),
        ("content-type", "application/grpc"), ("te", "trailers"),
        ("content-length", str(len(message))),
    ]  # fmt: skip
    sid = [1]

    blocks = []  # once every field is indexed, each block is the same bytes: reused

    def block() -> bytes:
        if len(blocks) < 2 or blocks[-1] != blocks[-2]:
            blocks.append(encoder.encode(headers))
        return blocks[-1]

    def one_round() -> bytes:
        parts = []
        for _ in range(concurrency):
            parts.append(frame(1, 0x4, sid[0], block()))
            parts.append(frame(0, 0x1, sid[0], message))
            sid[0] += 2
        return b"".join(parts)

    async def run(feeds: list[bytes]) -> None:
        for data in feeds:
            state["ended"] = 0
            state["waiter"] = loop.create_future()
            conn.data_received(data)
            await state["waiter"]

    loop.run_until_complete(run([one_round() for _ in range(200)]))  # warm-up
    writes0, bytes0 = transport.writes, state["bytes"]
    feeds = [one_round() for _ in range(rounds)]  # the client's encoding: not timed
    cpu = time.process_time()
    loop.run_until_complete(run(feeds))
    cpu = time.process_time() - cpu
    n = rounds * concurrency
    return cpu / n * 1e6, {
        "writes_per_round": (transport.writes - writes0) / rounds,
        "bytes_per_request": (state["bytes"] - bytes0) / n,
    }


def http_bench(app, loop, row, concurrency: int, rounds: int) -> tuple[float, dict]:
    """row: one row, or a list of rows (one request of them all)."""
    from serving.httpserver import HttpConnection

    rows = row if isinstance(row[0], list) else [row]
    features = [f"f{i}" for i in range(len(rows[0]))]
    body = json.dumps({"dataframe_split": {"columns": features, "data": rows}}).encode()
    request = (
        b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    state = {"answered": 0, "waiter": None}

    def on_write(data: bytes) -> None:
        state["answered"] += 1
        if state["waiter"] is not None and state["answered"] >= concurrency:
            state["waiter"].set_result(None)
            state["waiter"] = None

    conns = []
    for _ in range(concurrency):
        conn = HttpConnection(app)
        conn.connection_made(FakeTransport(on_write))
        conns.append(conn)

    async def run(n: int) -> None:
        for _ in range(n):
            state["answered"] = 0
            state["waiter"] = loop.create_future()
            for conn in conns:
                conn.data_received(request)
            await state["waiter"]

    loop.run_until_complete(run(200))
    cpu = time.process_time()
    loop.run_until_complete(run(rounds))
    cpu = time.process_time() - cpu
    return cpu / (rounds * concurrency) * 1e6, {}


def _bench():
    """bench/serving.py, by path: as `serving` it would shadow the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "bench" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--only", choices=["grpc", "http"], default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile the runs (slower)")
    parser.add_argument(
        "--rows", type=int, default=1, help="rows per request (HTTP only above 1; at most 100)"
    )
    args = parser.parse_args()
    if args.rows > 1:
        args.only = "http"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    warnings.simplefilter("ignore", UserWarning)
    import uvloop

    model_dir = Path(tempfile.mkdtemp(prefix="bench-serving-cpu-")) / "model"
    row, hundred = _bench().build_model(model_dir)
    if args.rows > 1:
        row = hundred[: args.rows]
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    app = make_app(model_dir, loop)
    runs = {"grpc": grpc_bench, "http": http_bench}
    if args.only:
        runs = {args.only: runs[args.only]}
    profile = cProfile.Profile() if args.profile else None
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, fn in runs.items():
            if profile:
                profile.enable()
            batches = app.metrics.batch_size
            before = (batches.sum, batches.count)
            us, extra = fn(app, loop, row, args.concurrency, args.rounds)
            if profile:
                profile.disable()
            extra["rows_per_batch"] = round(
                (batches.sum - before[0]) / max(1, batches.count - before[1]), 2
            )
            results[name].append(us)
            print(
                f"{name} c={args.concurrency} rows={args.rows}: {us:.1f} CPU us/request {extra}",
                flush=True,
            )
    for name, values in results.items():
        print(f"{name}: median {sorted(values)[len(values) // 2]:.1f} CPU us/request")
    if "grpc" in results and "http" in results:
        g = sorted(results["grpc"])[len(results["grpc"]) // 2]
        h = sorted(results["http"])[len(results["http"]) // 2]
        print(f"gRPC/HTTP CPU per request: {g / h:.2f}x (throughput bound: {h / g:.2f}x)")
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
