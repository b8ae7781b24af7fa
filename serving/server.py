"""Process entry point: settings, logging, the event loop, model loading, workers, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from serving.config import Settings, SettingsError, load_settings

logger = logging.getLogger("serving")

EXIT_BAD_SETTINGS = 2
EXIT_MODEL_FAILED = 3


def main(argv: Sequence[str]) -> int:
    try:
        settings = load_settings(argv, os.environ)
    except SettingsError as exc:
        print(f"python -m serving: error: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    # Never send usage data anywhere from a serving process.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    worker = os.environ.get("SERVING_WORKER_INDEX")
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s [{'worker ' + worker if worker else 'serving'}] "
        "%(name)s: %(message)s",
    )
    if settings.workers > 1:
        return supervise(settings)
    return run_worker(settings)


# --- one worker process ---------------------------------------------------------------------


def run_worker(settings: Settings) -> int:
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(settings, loop))
    finally:
        loop.close()


async def _serve(settings: Settings, loop: asyncio.AbstractEventLoop) -> int:
    from serving.app import App
    from serving.httpserver import HttpConnection, make_reuseport_socket
    from serving.predlog import FileSink

    app = App(settings, loop)
    try:
        sock = make_reuseport_socket(settings.host, settings.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    server = await loop.create_server(lambda: HttpConnection(app), sock=sock)
    port = sock.getsockname()[1]
    grpc_server = None
    if settings.grpc_port is not None:
        from serving import grpc_server as grpc_listener

        try:
            grpc_server, grpc_port = await grpc_listener.start(
                app, settings.host, settings.grpc_port, settings.max_body_bytes
            )
        except RuntimeError as exc:
            logger.error(
                "cannot listen for gRPC on %s:%s: %s", settings.host, settings.grpc_port, exc
            )
            return 1
        logger.info("listening for gRPC (OIP v2) on %s:%d", settings.host, grpc_port)
    logger.info(
        "listening on http://%s:%d (pid %d); loading model %s version %s from %s",
        settings.host, port, os.getpid(), settings.name, settings.version, settings.model_dir,
    )  # fmt: skip

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    sink = None
    if settings.prediction_log_dir is not None:
        sink = FileSink(app.log, settings.prediction_log_dir)
        sink.start()

    loading = _in_daemon_thread(loop, _load_and_warm_up, settings)
    stop_wait = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({loading, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if loading in done:
        try:
            model, seconds = loading.result()
        except Exception:
            logger.exception("the model failed to load or warm up")
            exit_code = EXIT_MODEL_FAILED
            stop.set()
        else:
            app.set_model(model, seconds)
            logger.info(
                "ready: %s version %s (%s, loaded by %s, %s path, loaded and warmed up in %.2fs)",
                settings.name, settings.version, model.flavor, model.loader,
                "fast" if model.fast else ("dataframe" if model.schema else "generic"), seconds,
            )  # fmt: skip
    await stop.wait()

    # Graceful shutdown: stop accepting, finish what was received, then exit.
    logger.info("shutting down: finishing %d in-flight request(s)", app.metrics.in_flight)
    server.close()
    app.begin_shutdown()
    if grpc_server is not None:
        await grpc_server.stop(settings.shutdown_timeout_s)
    deadline = time.monotonic() + settings.shutdown_timeout_s
    while app.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        app.begin_shutdown()
    for conn in list(app.connections):
        conn.transport.abort()
    if sink is not None:
        sink.stop()
    if not loading.done():
        loading.cancel()
    logger.info("stopped")
    return exit_code


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, fn, *args) -> asyncio.Future:
    """Run fn in a daemon thread (a SIGTERM during a slow model load need not wait for it)."""
    future = loop.create_future()

    def settle(result, error) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            outcome = (fn(*args), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass  # the loop is gone: the server stopped while the model was loading

    threading.Thread(target=run, name="model-loader", daemon=True).start()
    return future


def _load_and_warm_up(settings: Settings):  # -> tuple[LoadedModel, float]
    """Load the model and predict its input example (in a thread: the loop keeps serving)."""
    import numpy as np

    from serving.inputs import Rows
    from serving.model import LoadedModel, parse_scoring_json

    started = time.perf_counter()
    model = LoadedModel(settings.model_dir)
    example = model.serving_example()
    if model.schema is not None:
        if example is not None:
            rows = parse_scoring_json(model.schema, example)
        elif model.schema.matrix_dtype is not None:
            logger.warning("the model has no input example; warming up on a row of zeros")
            rows = Rows(1, matrix=np.zeros((1, model.schema.k), dtype=model.schema.matrix_dtype))
        else:
            rows = None
            logger.warning("the model has no input example; ready without a warm-up prediction")
        if rows is not None:
            model.check_fast_path(rows)
            model.predict(rows)
    elif example is not None:
        model.predict_generic(example, "application/json")
    else:
        logger.warning("the model has no input example; ready without a warm-up prediction")
    return model, time.perf_counter() - started


# --- supervisor of several workers ----------------------------------------------------------


def supervise(settings: Settings) -> int:
    """Run `settings.workers` worker processes on one port (SO_REUSEPORT); restart crashes."""
    from serving.httpserver import make_reuseport_socket

    try:
        # Bound but not listening: reserves the port (resolving port 0) without taking traffic.
        reserved = make_reuseport_socket(settings.host, settings.port, listen=False)
    except OSError as exc:
        logger.error("cannot bind %s:%s: %s", settings.host, settings.port, exc)
        return 1
    port = reserved.getsockname()[1]
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def spawn(index: int) -> subprocess.Popen:
        env = {**os.environ, **settings.to_env()}
        env.update(SERVING_PORT=str(port), SERVING_WORKERS="1", SERVING_WORKER_INDEX=str(index))
        return subprocess.Popen([sys.executable, "-m", "serving"], env=env)

    workers = {i: spawn(i) for i in range(settings.workers)}
    logger.info(
        "supervising %d workers on http://%s:%d: pids %s",
        settings.workers, settings.host, port, [p.pid for p in workers.values()],
    )  # fmt: skip
    exit_code = 0
    while not stopping:
        time.sleep(0.1)
        for index, proc in list(workers.items()):
            code = proc.poll()
            if code is None or stopping:
                continue
            if code == EXIT_MODEL_FAILED:
                logger.error("worker %d could not load the model; stopping", index)
                stopping = True
                exit_code = EXIT_MODEL_FAILED
                break
            logger.error("worker %d (pid %d) exited with %s; restarting it", index, proc.pid, code)
            time.sleep(1)
            workers[index] = spawn(index)
    for proc in workers.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in workers.values():
        try:
            proc.wait(timeout=settings.shutdown_timeout_s + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
    reserved.close()
    return exit_code
