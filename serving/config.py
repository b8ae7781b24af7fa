"""Settings of the model server: command line first, then SERVING_* environment variables.

Parsing is strict: a value that does not parse, or is out of range, is a `SettingsError`, which
`python -m serving` reports on stderr with exit code 2 before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

# Most rows per model call. A batch holds only requests that are already waiting (or, for at
# most --max-batch-delay-ms, whose body is still arriving), so at concurrency 1 the cap changes
# nothing; a high one lets multi-row requests (100 rows each, say) share one model call instead
# of each paying the estimator's per-call overhead (~100 us for scikit-learn) alone.
DEFAULT_MAX_BATCH_SIZE = 512


class SettingsError(Exception):
    """A setting is missing or invalid; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a server process needs to know; built once by `load_settings`."""

    model_dir: Path
    name: str
    version: str
    host: str = "127.0.0.1"
    port: int = 8080
    unix_socket: Path | None = None  # listen here instead of host:port
    workers: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_delay_ms: float = 2.0
    max_body_bytes: int = 16 * 1024 * 1024
    prediction_log_dir: Path | None = None
    log_input_sample: float = 1.0
    log_buffer: int = 100_000
    log_buffer_bytes: int | None = None  # None: sized from the memory limit (serving.predlog)
    grpc_port: int | None = None  # OIP v2 over gRPC on this port too (serving.grpc_server)
    admin_token: str | None = None
    shutdown_timeout_s: float = 30.0
    log_level: str = "INFO"
    # What a request that names no `predict_method` gets; None: the model's own predict.
    predict_method: str | None = None

    def to_env(self) -> dict[str, str]:
        """The same settings as environment variables (how the supervisor starts workers)."""
        env = {
            "SERVING_MODEL_DIR": str(self.model_dir),
            "SERVING_MODEL_NAME": self.name,
            "SERVING_MODEL_VERSION": self.version,
            "SERVING_HOST": self.host,
            "SERVING_PORT": str(self.port),
            "SERVING_WORKERS": str(self.workers),
            "SERVING_MAX_BATCH_SIZE": str(self.max_batch_size),
            "SERVING_MAX_BATCH_DELAY_MS": str(self.max_batch_delay_ms),
            "SERVING_MAX_BODY_BYTES": str(self.max_body_bytes),
            "SERVING_LOG_INPUT_SAMPLE": str(self.log_input_sample),
            "SERVING_LOG_BUFFER": str(self.log_buffer),
            "SERVING_SHUTDOWN_TIMEOUT": str(self.shutdown_timeout_s),
            "SERVING_LOG_LEVEL": self.log_level,
        }
        if self.unix_socket is not None:
            env["SERVING_UNIX_SOCKET"] = str(self.unix_socket)
        if self.log_buffer_bytes is not None:
            env["SERVING_LOG_BUFFER_BYTES"] = str(self.log_buffer_bytes)
        if self.grpc_port is not None:
            env["SERVING_GRPC_PORT"] = str(self.grpc_port)
        if self.prediction_log_dir is not None:
            env["SERVING_PREDICTION_LOG_DIR"] = str(self.prediction_log_dir)
        if self.admin_token is not None:
            env["SERVING_ADMIN_TOKEN"] = self.admin_token
        if self.predict_method is not None:
            env["SERVING_PREDICT_METHOD"] = self.predict_method
        return env


# (argument, environment variable, help). Every option can come from either place.
_OPTIONS: list[tuple[str, str, str]] = [
    ("--model-dir", "SERVING_MODEL_DIR", "MLflow model directory (holds an MLmodel file)"),
    ("--name", "SERVING_MODEL_NAME", "model name reported in responses and metrics"),
    ("--version", "SERVING_MODEL_VERSION", "model version reported in responses and metrics"),
    ("--host", "SERVING_HOST", "address to listen on (default 127.0.0.1)"),
    ("--port", "SERVING_PORT", "port to listen on (default 8080; 0 picks a free one)"),
    (
        "--unix-socket",
        "SERVING_UNIX_SOCKET",
        "listen on this Unix socket path instead of --host/--port (a server in a network "
        "namespace or a container without a network)",
    ),
    ("--workers", "SERVING_WORKERS", "server processes sharing the port (default 1)"),
    (
        "--max-batch-size",
        "SERVING_MAX_BATCH_SIZE",
        f"most rows per model call (default {DEFAULT_MAX_BATCH_SIZE})",
    ),
    (
        "--max-batch-delay-ms",
        "SERVING_MAX_BATCH_DELAY_MS",
        "longest wait for a batch to fill while requests are still arriving (default 2)",
    ),
    ("--max-body-bytes", "SERVING_MAX_BODY_BYTES", "largest request body (default 16 MiB)"),
    (
        "--prediction-log-dir",
        "SERVING_PREDICTION_LOG_DIR",
        "also write the prediction log as JSONL files here",
    ),
    (
        "--log-input-sample",
        "SERVING_LOG_INPUT_SAMPLE",
        "fraction of prediction records that include inputs (default 1.0)",
    ),
    ("--log-buffer", "SERVING_LOG_BUFFER", "prediction records kept in memory (default 100000)"),
    (
        "--log-buffer-bytes",
        "SERVING_LOG_BUFFER_BYTES",
        "bytes the prediction log may hold (default: the memory limit / 8, else 64 MiB)",
    ),
    ("--grpc-port", "SERVING_GRPC_PORT", "also serve OIP v2 over gRPC on this port (default off)"),
    (
        "--shutdown-timeout",
        "SERVING_SHUTDOWN_TIMEOUT",
        "seconds to finish in-flight requests after SIGTERM (default 30)",
    ),
    ("--log-level", "SERVING_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR (default INFO)"),
    (
        "--predict-method",
        "SERVING_PREDICT_METHOD",
        "prediction method of requests that name none: predict, predict_proba, "
        "predict_log_proba, decision_function (default: the model's own predict)",
    ),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve one MLflow model over HTTP (MLflow scoring, KServe v1, OIP v2).",
        epilog="Each option can also be set by the environment variable shown; "
        "the command line wins. SERVING_ADMIN_TOKEN (or SERVING_ADMIN_TOKEN_FILE) protects "
        "GET /predictions.",
    )
    for flag, env_name, help_text in _OPTIONS:
        parser.add_argument(flag, help=f"{help_text} [{env_name}]")
    return parser


def _int(name: str, raw: str, *, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise SettingsError(f"{name} must be {bounds}, got {value}")
    return value


def _float(name: str, raw: str, *, minimum: float, maximum: float | None = None) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise SettingsError(f"{name} must be {bounds}, got {raw}")
    return value


def _admin_token(env: Mapping[str, str]) -> str | None:
    token = env.get("SERVING_ADMIN_TOKEN")
    token_file = env.get("SERVING_ADMIN_TOKEN_FILE")
    if token and token_file:
        raise SettingsError("set SERVING_ADMIN_TOKEN or SERVING_ADMIN_TOKEN_FILE, not both")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise SettingsError(
                f"SERVING_ADMIN_TOKEN_FILE: cannot read {token_file}: {exc}"
            ) from None
        if not token:
            raise SettingsError(f"SERVING_ADMIN_TOKEN_FILE: {token_file} is empty")
    return token or None


def load_settings(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> Settings:
    """Build `Settings` from argv (without the program name) and env; raise SettingsError."""
    parser = _parser()
    args, extra = parser.parse_known_args(list(argv))
    if extra:
        raise SettingsError(f"unrecognized arguments: {' '.join(extra)}")
    raw: dict[str, str] = {}
    for flag, env_name, _ in _OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            value = env.get(env_name) or None
        if value is not None:
            raw[flag] = value

    missing = [
        f"{flag} (or {env_name})"
        for flag, env_name, _ in _OPTIONS[:3]
        if not raw.get(flag, "").strip()
    ]
    if missing:
        raise SettingsError(f"missing required setting: {', '.join(missing)}")

    for flag in ("--name", "--version"):
        value = raw[flag].strip()
        if len(value) > 200 or not value.isprintable():
            raise SettingsError(f"{flag} must be at most 200 printable characters, got {value!r}")
    model_dir = Path(raw["--model-dir"])
    if not (model_dir / "MLmodel").is_file():
        raise SettingsError(f"--model-dir: {model_dir} is not an MLflow model (no MLmodel file)")

    host = raw.get("--host", "127.0.0.1")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise SettingsError(
                f"--host must be an IP address or localhost, got {host!r}"
            ) from None

    unix_socket = None
    if raw.get("--unix-socket", "").strip():
        unix_socket = Path(raw["--unix-socket"].strip())
        # sun_path holds 108 bytes with its terminating NUL
        if not unix_socket.is_absolute() or len(os.fsencode(unix_socket)) > 107:
            raise SettingsError(
                f"--unix-socket must be an absolute path of at most 107 bytes, got {unix_socket}"
            )
        if not unix_socket.parent.is_dir():
            raise SettingsError(f"--unix-socket: {unix_socket.parent} is not a directory")

    prediction_log_dir = None
    if "--prediction-log-dir" in raw:
        prediction_log_dir = Path(raw["--prediction-log-dir"])
        try:
            prediction_log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SettingsError(
                f"--prediction-log-dir: cannot create {prediction_log_dir}: {exc}"
            ) from None

    workers = _int("--workers", raw.get("--workers", "1"), minimum=1, maximum=64)
    if unix_socket is not None and workers > 1:
        raise SettingsError("--unix-socket serves with one worker: set --workers 1")

    log_level = raw.get("--log-level", "INFO").upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")

    predict_method = raw.get("--predict-method", "").strip() or None
    if predict_method is not None and not (
        predict_method.isidentifier() and len(predict_method) <= 100
    ):
        raise SettingsError(f"--predict-method must be a method name, got {predict_method!r}")

    return Settings(
        model_dir=model_dir,
        name=raw["--name"].strip(),
        version=raw["--version"].strip(),
        host=host,
        port=_int("--port", raw.get("--port", "8080"), minimum=0, maximum=65535),
        unix_socket=unix_socket,
        workers=workers,
        max_batch_size=_int(
            "--max-batch-size",
            raw.get("--max-batch-size", str(DEFAULT_MAX_BATCH_SIZE)),
            minimum=1,
            maximum=1_000_000,
        ),
        max_batch_delay_ms=_float(
            "--max-batch-delay-ms", raw.get("--max-batch-delay-ms", "2"), minimum=0, maximum=10_000
        ),
        max_body_bytes=_int(
            "--max-body-bytes", raw.get("--max-body-bytes", str(16 * 1024 * 1024)), minimum=1
        ),
        prediction_log_dir=prediction_log_dir,
        log_input_sample=_float(
            "--log-input-sample", raw.get("--log-input-sample", "1.0"), minimum=0, maximum=1
        ),
        log_buffer=_int("--log-buffer", raw.get("--log-buffer", "100000"), minimum=1),
        log_buffer_bytes=(
            _int("--log-buffer-bytes", raw["--log-buffer-bytes"], minimum=1024)
            if "--log-buffer-bytes" in raw
            else None
        ),
        grpc_port=(
            _int("--grpc-port", raw["--grpc-port"], minimum=0, maximum=65535)
            if "--grpc-port" in raw
            else None
        ),
        admin_token=_admin_token(env),
        shutdown_timeout_s=_float(
            "--shutdown-timeout", raw.get("--shutdown-timeout", "30"), minimum=0
        ),
        log_level=log_level,
        predict_method=predict_method,
    )
