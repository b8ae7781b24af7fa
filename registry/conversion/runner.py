"""Runs worker/convert_model.py in the model's own environment, sandboxed.

The environment is the one the model is served with (deployments/environments.py: its
requirements and the model server's) plus the converter packages of its flavor, built once per
requirement set by the same builder the local runtime uses. As root, the script runs in the
local runtime's sandbox (deployments/runtimes/sandbox.py): its own network namespace and uid,
the data directory hidden, only the environment, the script, the model (read-only) and its
output directory (read-write) visible. Not root: it runs as this user, as local model servers
then do (logged)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deployments import environments
from deployments.runtimes import sandbox

from .errors import ConversionCancelled, ConversionFailed

logger = logging.getLogger(__name__)

WORKER = Path(__file__).resolve().parent / "worker" / "convert_model.py"
TIMEOUT_SECONDS = 1800
# One uid per conversion job, above every model server's (UID_BASE + port < UID_BASE + 65536).
UID_OFFSET = 70_000
UID_SPAN = 1_000_000

# Pinned to what this machine's indexes serve and the model server's own pins allow.
ONNX = ["onnx==1.23.2", "onnxruntime==1.32.0"]
CONVERTERS: dict[str, list[str]] = {
    "sklearn": ["skl2onnx==1.20.0", *ONNX],
    "xgboost": ["onnxmltools==1.16.0", "skl2onnx==1.20.0", *ONNX],
    "lightgbm": ["onnxmltools==1.16.0", "skl2onnx==1.20.0", *ONNX],
    "pytorch": ["onnxscript==0.7.2", *ONNX],
    "keras": ["tf2onnx==1.17.0", *ONNX],
    "tensorflow": ["tf2onnx==1.17.0", *ONNX],
}
FLAVOR_ORDER = ("sklearn", "xgboost", "lightgbm", "pytorch", "keras", "tensorflow")


def model_flavor(model_dir: Path) -> str:
    """The flavor a converter exists for, read from MLmodel (YAML, no model code)."""
    try:
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConversionFailed(f"the model's MLmodel cannot be read: {exc}") from None
    flavors = mlmodel.get("flavors") or {}
    if "onnx" in flavors:
        raise ConversionFailed("the version is already an ONNX model")
    for name in FLAVOR_ORDER:
        if name in flavors:
            return name
    shown = ", ".join(sorted(k for k in flavors if k != "python_function")) or "python_function"
    raise ConversionFailed(
        f"no ONNX converter for flavor {shown}: scikit-learn, XGBoost, LightGBM, PyTorch and "
        "Keras models can be converted"
    )


def conversion_environment(model_dir: Path, flavor: str) -> environments.ResolvedEnvironment:
    """The model's serving environment plus its flavor's converters (the model's own pin of a
    converter package wins)."""
    base = environments.resolve(model_dir)
    named = {canonicalize_name(Requirement(line).name) for line in base.model_requirements}
    extra = [
        line
        for line in CONVERTERS[flavor]
        if canonicalize_name(Requirement(line).name) not in named
    ]
    return replace(
        base,
        model_requirements=tuple(sorted({*base.model_requirements, *extra})),
        sources=(*base.sources, f"converters for {flavor}"),
    )


# None: the local runtime's builder (<data>/environments). The tests point it at a cache kept
# between sessions, as tests/frameworks keeps its training venvs.
ENVIRONMENT_ROOT: Path | None = None


def builder(data_dir: Path) -> environments.EnvironmentBuilder:
    from deployments.runtimes import environment_builder, index_options

    if ENVIRONMENT_ROOT is None:
        return environment_builder(str(data_dir))
    return environments.EnvironmentBuilder(ENVIRONMENT_ROOT, index=index_options)


def ensure_environment(
    builder: environments.EnvironmentBuilder,
    resolved: environments.ResolvedEnvironment,
    log: Callable[[str], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> Path:
    try:
        built = builder.ensure(resolved, progress=log)
    except environments.EnvironmentFailure as exc:
        raise ConversionFailed(f"the conversion environment cannot be built: {exc}") from None
    if not built.built:
        log(f"environment {built.key[:12]} reused (already built)")
    if cancelled():
        raise ConversionCancelled("the conversion was cancelled while its environment was built")
    compile_bytecode(built.path, log, cancelled)
    return built.python


COMPILED_MARKER = ".conversion-compiled"


def compile_bytecode(
    env: Path, log: Callable[[str], None], cancelled: Callable[[], bool] = lambda: False
) -> None:
    """Byte-compile the environment once (compileall only compiles: nothing of the packages
    runs). The sandboxed uid cannot write __pycache__ in it, and without bytecode every
    conversion compiles what it imports again (torch, scipy, mlflow: most of a conversion's
    time on a loaded machine)."""
    marker = Path(env) / COMPILED_MARKER
    if marker.exists():
        return
    started = time.monotonic()
    python = Path(env) / "bin" / "python"
    site = subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.strip()
    if not site:
        return
    # Minutes for TensorFlow on a loaded machine: a cancel stops it (compiled again next time).
    compiling = subprocess.Popen(
        [str(python), "-I", "-m", "compileall", "-q", "-j", "0", site],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while True:
            try:
                returncode = compiling.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if cancelled():
                raise ConversionCancelled("the conversion was cancelled while compiling")
            if time.monotonic() - started > 1800:
                log("byte-compiling took longer than 1800 s: stopped (the conversion goes on)")
                return
    finally:
        if compiling.poll() is None:
            _kill(compiling)
    # Some packages ship files that do not compile (templates, py2 leftovers): not an error.
    for path in [Path(site), *Path(site).rglob("__pycache__")]:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o755)
    marker.write_text(f"{returncode}\n")
    log(f"environment byte-compiled in {time.monotonic() - started:.1f} s")


def _uid(job_id: int) -> int:
    return sandbox.UID_BASE + UID_OFFSET + (job_id % UID_SPAN)


def run_worker(
    *,
    python: Path,
    request: dict,
    out_dir: Path,
    data_dir: Path,
    job_id: int,
    log: Callable[[str], None],
    cancelled: Callable[[], bool],
    timeout: float = TIMEOUT_SECONDS,
    sandboxed: bool | None = None,
    labels: dict[str, str] | None = None,
) -> dict:
    """Run the conversion script on ``request``; its report (``ok`` true or false).

    ``labels`` (CONTROLPLANE_* environment labels, the job's ``process_labels()``) name the
    process for whoever must find it after this worker died (the next attempt, the sweep).
    Cancelled or timed out, its process group is killed before this returns."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = out_dir / "report.json"
    report_path.unlink(missing_ok=True)
    request_path = out_dir / "request.json"
    request_path.write_text(json.dumps(request))
    argv = [str(python), "-I", str(WORKER), str(request_path)]
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL") if k in os.environ}
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        HOME=str(out_dir),
        TMPDIR=str(out_dir),
    )
    env.update(labels or {})
    env["CONVERSION_PARENT_PID"] = str(os.getpid())  # the script dies with this process
    sandboxed = sandbox.available() if sandboxed is None else sandboxed
    if sandboxed:
        uid = _uid(job_id)
        for path in [out_dir, *out_dir.rglob("*")]:
            os.chown(path, uid, uid)
        os.chmod(out_dir, 0o700)
        config = sandbox.plan(
            python=str(python),
            code_root=WORKER.parent,
            model_dir=Path(request["model_dir"]),
            data_dir=data_dir,
            socket_dir=out_dir,
            uid=uid,
            gid=uid,
            cwd=out_dir,
        )
        env.update(HOME="/tmp", TMPDIR="/tmp", USER="controlplane-convert")
        argv = sandbox.wrap(argv, config)
    else:
        log("not root: the conversion runs as this user, unsandboxed (" + sandbox.status() + ")")
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=out_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    tail: list[str] = []
    deadline = time.monotonic() + timeout
    watcher = selectors.DefaultSelector()
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    watcher.register(proc.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while True:
            for _key, _ in watcher.select(timeout=0.5):
                chunk = proc.stdout.read() or b""
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    _line(raw.decode(errors="replace"), log, tail)
                if not chunk and proc.poll() is not None:
                    break
            if proc.poll() is not None:
                rest = proc.stdout.read() or b""
                for raw in (buffer + rest).split(b"\n"):
                    _line(raw.decode(errors="replace"), log, tail)
                break
            if cancelled():
                _kill(proc)
                raise ConversionCancelled("the conversion was cancelled")
            if time.monotonic() > deadline:
                _kill(proc)
                raise ConversionFailed(f"the conversion took longer than {timeout:.0f} s")
    finally:
        watcher.close()
        if proc.poll() is None:
            _kill(proc)
    if not report_path.is_file():
        shown = "\n".join(tail[-15:])
        raise ConversionFailed(
            f"the conversion process exited with code {proc.returncode} without a report:\n{shown}"
        )
    return json.loads(report_path.read_text())


def _line(text: str, log: Callable[[str], None], tail: list[str]) -> None:
    text = text.strip()
    if not text:
        return
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    if isinstance(message, dict) and isinstance(message.get("log"), str):
        log(message["log"])
        return
    tail.append(text[:500])
    del tail[:-50]


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
