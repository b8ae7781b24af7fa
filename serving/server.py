"""Process entry point: settings, logging, the event loop, model loading, workers, shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from serving.config import Settings, SettingsError, load_settings

logger = logging.getLogger("serving")

EXIT_BAD_SETTINGS = 2
EXIT_MODEL_FAILED = 3

# The last line a server that cannot start writes to stderr, for the runtime that started it:
# `SERVING-FATAL {"type": ..., "message": ..., "phase": "args" | "load" | "warmup"}`.
FATAL_PREFIX = "SERVING-FATAL "
# Where a worker also writes its record, for the supervisor to repeat as its own last line.
_FATAL_FILE_ENV = "SERVING_FATAL_FILE"
_FATAL_MESSAGE_CHARS = 4000


class StartupError(Exception):
    """The server cannot start: the phase it failed in and the exception that says why."""

    def __init__(self, phase: str, error: BaseException) -> None:
        super().__init__(f"{phase}: {type(error).__name__}: {error}")
        self.phase = phase
        self.error = error

    def record(self) -> str:
        return fatal_record(self.phase, type(self.error).__name__, str(self.error))


def fatal_record(phase: str, error_type: str, message: str) -> str:
    body = {"type": error_type, "message": message[:_FATAL_MESSAGE_CHARS], "phase": phase}
    return FATAL_PREFIX + json.dumps(body, ensure_ascii=True)


def _write_fatal(record: str) -> None:
    """The record as the process's last line of output (and in the supervisor's file)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    print(record, file=sys.stderr, flush=True)
    path = os.environ.get(_FATAL_FILE_ENV)
    if path:
        try:
            Path(path).write_text(record)
        except OSError:
            pass


def main(argv: Sequence[str]) -> int:
    try:
        settings = load_settings(argv, os.environ)
    except SettingsError as exc:
        print(f"python -m serving: error: {exc}", file=sys.stderr)
        _write_fatal(fatal_record("args", "SettingsError", str(exc)))
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
    failed: list[StartupError] = []
    try:
        code = loop.run_until_complete(_serve(settings, loop, failed))
    except Exception as exc:
        logger.exception("the server failed to start")
        failed.append(StartupError("load", exc))
        code = EXIT_MODEL_FAILED
    finally:
        loop.close()
    if failed:
        _write_fatal(failed[0].record())
    return code


async def _serve(
    settings: Settings, loop: asyncio.AbstractEventLoop, failed: list[StartupError]
) -> int:
    """Serve until SIGTERM; a model that cannot load or warm up is appended to `failed`."""
    from serving.app import App
    from serving.httpserver import HttpConnection, make_reuseport_socket
    from serving.predlog import FileSink

    app = App(settings, loop)
    try:
        if settings.unix_socket is not None:
            sock = make_unix_socket(settings.unix_socket)
            where = f"unix:{settings.unix_socket}"
        else:
            sock = make_reuseport_socket(settings.host, settings.port)
            where = f"http://{settings.host}:{sock.getsockname()[1]}"
    except OSError as exc:
        target = settings.unix_socket or f"{settings.host}:{settings.port}"
        logger.error("cannot listen on %s: %s", target, exc)
        return 1
    server = await loop.create_server(lambda: HttpConnection(app), sock=sock)
    grpc_server = None
    if settings.grpc_port is not None:
        from serving import h2grpc as grpc_listener

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
        "listening on %s (pid %d); loading model %s version %s from %s",
        where, os.getpid(), settings.name, settings.version, settings.model_dir,
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
        except StartupError as exc:
            logger.error("the model failed to %s", exc.phase, exc_info=exc.error)
            failed.append(exc)
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
    if settings.unix_socket is not None:
        try:
            os.unlink(settings.unix_socket)  # no new connection finds a closed listener
        except OSError:
            pass
    if grpc_server is not None:
        grpc_server.close()
    app.begin_shutdown()  # gRPC connections: GOAWAY, then closed once their calls are answered
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


def make_unix_socket(path) -> socket.socket:
    """A listening Unix stream socket at ``path``, replacing a stale one a crashed server left.
    Mode 0600: only this server's user (and root) may connect; the router runs as one of them."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


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
    """Load the model and predict its input example (in a thread: the loop keeps serving);
    a failure is a StartupError naming the phase."""
    started = time.perf_counter()
    try:
        from serving.model import LoadedModel, UnsupportedMethod

        model = LoadedModel(settings.model_dir)
    except Exception as exc:
        raise StartupError("load", exc) from exc
    try:
        model.set_default_method(settings.predict_method)
    except UnsupportedMethod as exc:
        raise StartupError("args", exc) from exc
    try:
        _warm_up(model)
    except Exception as exc:
        raise StartupError("warmup", exc) from exc
    return model, time.perf_counter() - started


def _warm_up(model) -> None:
    """Predict the input example with the default method (and check the fast paths on it)."""
    import numpy as np

    from serving.inputs import Rows
    from serving.model import parse_scoring_json

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
            model.predict(rows, model.default_method)
    elif example is not None:
        model.predict_generic(example, "application/json", model.default_method)
    else:
        logger.warning("the model has no input example; ready without a warm-up prediction")


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

    fatal_dir = Path(tempfile.mkdtemp(prefix="serving-fatal-"))

    def spawn(index: int) -> subprocess.Popen:
        env = {**os.environ, **settings.to_env()}
        env.update(SERVING_PORT=str(port), SERVING_WORKERS="1", SERVING_WORKER_INDEX=str(index))
        env[_FATAL_FILE_ENV] = str(fatal_dir / f"worker-{index}")
        return subprocess.Popen([sys.executable, "-m", "serving"], env=env)

    workers = {i: spawn(i) for i in range(settings.workers)}
    logger.info(
        "supervising %d workers on http://%s:%d: pids %s",
        settings.workers, settings.host, port, [p.pid for p in workers.values()],
    )  # fmt: skip
    exit_code = 0
    failed_worker: int | None = None
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
                failed_worker = index
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
    record = None
    if failed_worker is not None:
        try:
            record = (fatal_dir / f"worker-{failed_worker}").read_text()
        except OSError:
            record = fatal_record("load", "WorkerFailed", "a worker could not load the model")
    for path in fatal_dir.iterdir():
        path.unlink()
    fatal_dir.rmdir()
    if record is not None:
        _write_fatal(record)
    return exit_code
