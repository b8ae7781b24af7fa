"""`make run`: migrate, then start and watch every process on embedded defaults.

Web (gunicorn), Celery worker and beat, and, unless MLFLOW_TRACKING_URI points
at an existing server, an MLflow tracking server on loopback. Ctrl-C or
SIGTERM stops all of them; if one dies, the others are stopped too.
Serving processes started by deployments are not children of this process:
they keep serving across a restart and are adopted by the reconciler.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except Exception:
            time.sleep(0.3)
    return False


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main() -> int:
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.base")
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    data_dir = Path(env.get("CONTROLPLANE_DATA_DIR", ROOT / "var")).resolve()
    env["CONTROLPLANE_DATA_DIR"] = str(data_dir)
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    port = env.get("PORT", "8000")
    py = str(BIN / "python")

    def manage(*args: str) -> None:
        subprocess.run([py, str(ROOT / "manage.py"), *args], env=env, check=True, cwd=ROOT)

    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop_all(*_args) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        print("\nstopping...", flush=True)
        # gunicorn and Celery stop their own workers gracefully when their main process
        # is told to (a SIGTERM straight to Celery's pool processes kills the tasks they
        # run and stalls the main one); the MLflow CLI does not pass signals on, so its
        # whole group is told. Each child leads its own process group: whatever is left of
        # a group after its leader exits (or after the deadline) is killed with it.
        for name, proc in procs.items():
            if name == "mlflow":
                _signal_group(proc, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)

    signal.signal(signal.SIGTERM, lambda *a: (stop_all(), sys.exit(0)))
    signal.signal(signal.SIGINT, lambda *a: (stop_all(), sys.exit(0)))

    try:
        mlflow_uri = env.get("MLFLOW_TRACKING_URI")
        if not mlflow_uri:
            mlflow_dir = data_dir / "mlflow"
            (mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
            mlflow_port = env.get("MLFLOW_PORT", "5000")
            mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
            procs["mlflow"] = subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(mlflow_dir / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    mlflow_port,
                    "--workers",
                    "1",
                ],
                env=env,
                cwd=data_dir,
                start_new_session=True,
            )
            env["MLFLOW_TRACKING_URI"] = mlflow_uri
        manage("migrate", "--noinput", "-v", "0")
        manage("collectstatic", "--noinput", "-v", "0")
        manage("ensure_admin")
        if "mlflow" in procs and not _wait_http(f"{mlflow_uri}/health", 90, procs["mlflow"]):
            print(f"MLflow server did not start on {mlflow_uri}", file=sys.stderr)
            stop_all()
            return 1

        procs["web"] = subprocess.Popen(
            [
                str(BIN / "gunicorn"),
                "controlplane.wsgi:application",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                env.get("WEB_CONCURRENCY", "2"),
                "--threads",
                "4",
                "--timeout",
                "300",
                "--access-logfile",
                "-",
                # per data dir: the default (~/.gunicorn) would be shared by every instance
                "--control-socket",
                str(data_dir / "gunicorn.ctl"),
            ],
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        procs["worker"] = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "controlplane",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                env.get("CELERY_CONCURRENCY", "2"),
                "-Q",
                env.get("CONTROLPLANE_TASK_QUEUE", "controlplane"),
            ],
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        procs["beat"] = subprocess.Popen(
            [
                str(BIN / "celery"),
                "-A",
                "controlplane",
                "beat",
                "--loglevel",
                "INFO",
                "--schedule",
                str(data_dir / "celerybeat-schedule"),
            ],
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        if not _wait_http(f"http://127.0.0.1:{port}/healthz", 60, procs["web"]):
            print("the web app did not become healthy", file=sys.stderr)
            stop_all()
            return 1
        print(
            "\n"
            f"  control plane   http://127.0.0.1:{port}/   (user: admin)\n"
            f"  API docs        http://127.0.0.1:{port}/api/docs/\n"
            f"  MLflow          {mlflow_uri}   (export MLFLOW_TRACKING_URI={mlflow_uri})\n"
            f"  data            {data_dir}\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        parent = os.getppid()
        while True:
            if os.getppid() != parent:  # `make` was killed: it does not forward signals
                stop_all()
                return 0
            for name, proc in procs.items():
                code = proc.poll()
                if code is not None and not stopping:
                    print(f"{name} exited with code {code}; stopping the rest", file=sys.stderr)
                    stop_all()
                    return 1
            time.sleep(1)
    except subprocess.CalledProcessError as exc:
        print(f"start-up step failed: {exc}", file=sys.stderr)
        stop_all()
        return 1


if __name__ == "__main__":
    sys.exit(main())
