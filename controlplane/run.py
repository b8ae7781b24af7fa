"""`make run`: check, migrate, then start and watch every process on embedded defaults.

Web (gunicorn), Celery worker and beat, and, unless MLFLOW_TRACKING_URI points at an
existing server, an MLflow tracking server on loopback that requires authentication
(MLflow's basic-auth app; the control plane's credential is generated in the data dir).

What it guarantees:
- Before starting anything, PORT and MLFLOW_PORT must be free on 127.0.0.1: else it exits
  with status 2 and a message naming the variable. It only uses an MLflow server it started
  (checked with the credential only that server knows), or the one MLFLOW_TRACKING_URI names.
- Ctrl-C or SIGTERM stops everything: every child gets SIGTERM, and whatever is left of its
  process group at the deadline gets SIGKILL. Further signals during the stop are noted and
  never cut it short.
- Children die with the supervisor even when it is SIGKILLed: each child gets
  PR_SET_PDEATHSIG (SIGTERM) and a small watchdog process, which outlives the supervisor,
  stops every child's process group (their own workers too) when the supervisor is gone.

Serving processes and routers started by deployments are not children of this process:
they keep serving across a restart and are adopted by the reconciler.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STOP_DEADLINE = 15.0  # seconds from SIGTERM to SIGKILL
MLFLOW_USER = "controlplane"  # the control plane's own user on the embedded MLflow server
PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


class StartupError(Exception):
    """A check before start-up failed: nothing was started."""

    def __init__(self, message: str, *, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _StopRequested(Exception):
    """A stop signal arrived while starting up."""


# --- checks before anything starts ------------------------------------------------------


def port_from_env(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip() or str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise StartupError(f"{name}={raw!r} is not a port number (1-65535)")
    return int(raw)


def check_port_free(name: str, port: int) -> None:
    """Refuse a port something already listens on (on 127.0.0.1 or every address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as the servers bind: a port in TIME_WAIT is free, a listening one is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise StartupError(
                f"{name}={port}: 127.0.0.1:{port} is already in use ({exc.strerror}). "
                f"Stop what listens there or set {name} to a free port."
            ) from None


# --- MLflow authentication ------------------------------------------------------------------


def _secret_file(path: Path, length: int = 32) -> str:
    """A random secret kept in ``path`` (mode 0600), created once."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(length))
    os.chmod(path, 0o600)
    return path.read_text().strip()


@dataclass(frozen=True)
class MlflowAuth:
    server_env: dict[str, str]  # for the MLflow server only
    client_env: dict[str, str]  # for the web app and the workers
    password: str


def mlflow_auth_setup(mlflow_dir: Path) -> MlflowAuth:
    """The basic-auth app's config, database and the control plane's admin credential,
    all under ``<data>/mlflow/auth`` (0700; files 0600)."""
    auth_dir = mlflow_dir / "auth"
    auth_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(auth_dir, 0o700)
    password_file = auth_dir / f"{MLFLOW_USER}.password"
    password = _secret_file(password_file)
    flask_key = _secret_file(auth_dir / "flask_secret_key", 48)
    ini = auth_dir / "basic_auth.ini"
    # Every authenticated MLflow user reads (users get theirs from the control plane's UI,
    # with more for model developers); anonymous callers get nothing: 401.
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{auth_dir / 'basic_auth.db'}\n"
        f"admin_username = {MLFLOW_USER}\n"
        # read once, to create the admin user in a new auth database (in this 0600 file,
        # not in the server's environment)
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # A password check is a deliberately slow hash: without the cache, every request of
        # an upload pays it. One worker, so a password change is seen at once.
        "auth_cache_ttl_seconds = 60\n"
    )
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(ini, 0o600)
    return MlflowAuth(
        server_env={
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            # MLflow's GenAI job runner (7 huey processes) is not used by the control plane
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_FLASK_SERVER_SECRET_KEY": flask_key,
        },
        client_env={
            "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
            # a path, not the password: children's /proc/<pid>/environ never holds it
            "MLFLOW_TRACKING_PASSWORD_FILE": str(password_file),
        },
        password=password,
    )


def mlflow_answers_as_ours(uri: str, password: str, *, timeout: float = 60) -> bool:
    """True if the server at ``uri`` accepts the credential only our server knows (another
    MLflow server answers 401 or 404 to it). Its first authenticated answer can be slow."""
    token = base64.b64encode(f"{MLFLOW_USER}:{password}".encode()).decode()
    req = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/users/current", headers={"Authorization": f"Basic {token}"}
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with _LOOPBACK.open(req, timeout=10) as resp:
                body = json.loads(resp.read() or b"{}")
                return (body.get("user") or {}).get("username") == MLFLOW_USER
        except urllib.error.HTTPError:
            return False  # a definite answer: not our credential, or no auth at all
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.5)
    return False


# --- the watchdog: outlives the supervisor, stops its children when it is gone -----------------


def watchdog(deadline: float) -> int:
    """Read ``<pgid> <leader|group>`` lines on stdin; at EOF (the supervisor exited or was
    killed) SIGTERM each group (its leader only, for servers that stop their own workers),
    then SIGKILL whatever is left of the groups after ``deadline`` seconds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    groups: dict[int, str] = {}
    for line in sys.stdin:
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            groups[int(parts[0])] = parts[1]
    alive = [pgid for pgid in groups if _group_alive(pgid)]
    if not alive:
        return 0
    for pgid in alive:
        _signal(pgid, signal.SIGTERM, group=groups[pgid] == "group")
    end = time.monotonic() + deadline
    while time.monotonic() < end and any(_group_alive(pgid) for pgid in alive):
        time.sleep(0.2)
    for pgid in alive:
        _signal(pgid, signal.SIGKILL, group=True)
    return 0


def _group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` lives. Zombies do not count: orphans are
    reaped by PID 1, which in a container may never reap them."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after "pid (comm)": state, ppid, pgrp
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _signal(pid: int, sig: int, *, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- the supervisor ---------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_blocked():
    """No stop signal between starting a child and recording it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _write_stderr(text: str) -> None:
    # os.write, not print: safe inside a signal handler that interrupted a print
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


class Supervisor:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.whole_group: set[str] = set()
        self.phase = "starting"  # -> running -> stopping
        self.stop_deadline = 0.0
        self.watchdog: subprocess.Popen | None = None
        self._watch_fd: int | None = None
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._pid = os.getpid()

    # signals
    def install_handlers(self) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        if self.phase in ("stopping", "stopped"):
            left = max(0.0, self.stop_deadline - time.monotonic())
            _write_stderr(
                f"\nalready stopping ({signal.Signals(signum).name} noted): what is still "
                f"running gets SIGKILL in {left:.0f} s\n"
            )
            return
        if self.phase == "starting":
            self.phase = "stop-requested"
            raise _StopRequested
        self.phase = "stop-requested"

    # children
    def _preexec(self) -> None:
        # In the child between fork and exec: die with the supervisor, and take back the
        # signals the supervisor blocks while it starts children.
        self._libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self._pid:  # the supervisor died before prctl took effect
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def start_watchdog(self) -> None:
        read_fd, write_fd = os.pipe()
        with _signals_blocked():
            self.watchdog = subprocess.Popen(
                [sys.executable, "-m", "controlplane.run", "--watchdog", str(STOP_DEADLINE)],
                stdin=read_fd,
                cwd=ROOT,
                start_new_session=True,  # a Ctrl-C on the terminal is the supervisor's
            )
            os.close(read_fd)
            self._watch_fd = write_fd

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        cwd: Path,
        env: dict | None = None,
        whole_group: bool = False,
    ) -> subprocess.Popen:
        """Start a child leading its own process group, known to the watchdog at once.
        ``whole_group``: the stop signal goes to its whole group (a leader that does not
        pass signals on); else to the leader, which stops its own workers."""
        with _signals_blocked():
            proc = subprocess.Popen(
                argv,
                env=env or self.env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=self._preexec,
            )
            self.procs[name] = proc
            if whole_group:
                self.whole_group.add(name)
            if self._watch_fd is not None:
                mode = "group" if whole_group else "leader"
                with contextlib.suppress(OSError):
                    os.write(self._watch_fd, f"{proc.pid} {mode}\n".encode())
        return proc

    def stop(self) -> None:
        """Stop every child: SIGTERM, then SIGKILL at the deadline. Runs to the end
        whatever signals arrive meanwhile."""
        with _signals_blocked():  # from here on a signal is only noted
            if self.phase in ("stopping", "stopped"):
                return
            self.phase = "stopping"
            self.stop_deadline = time.monotonic() + STOP_DEADLINE
        if self.procs:
            print("\nstopping...", flush=True)
        # gunicorn and Celery stop their own workers gracefully when their main process
        # is told to (a SIGTERM straight to Celery's pool processes kills the tasks they
        # run and stalls the main one); the MLflow CLI does not pass signals on, so its
        # whole group is told.
        for name, proc in self.procs.items():
            if proc.poll() is None:
                _signal(proc.pid, signal.SIGTERM, group=name in self.whole_group)
        started = time.monotonic()
        took: dict[str, float] = {}
        for name, proc in self.procs.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, self.stop_deadline - time.monotonic()))
                took[name] = time.monotonic() - started
        late = [name for name in self.procs if name not in took]
        if self.procs:
            print(
                "stopped: "
                + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in took.items())
                + (f"; killed at the deadline: {', '.join(late)}" if late else ""),
                flush=True,
            )
        # Whatever is left of each group (a leader past the deadline, a worker that
        # outlived its leader) is killed; then the groups must be empty.
        for proc in self.procs.values():
            _signal(proc.pid, signal.SIGKILL, group=True)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        end = time.monotonic() + 5
        while time.monotonic() < end and any(_group_alive(p.pid) for p in self.procs.values()):
            time.sleep(0.1)
        if self._watch_fd is not None:  # everything is gone: the watchdog has nothing to do
            with contextlib.suppress(OSError):
                os.close(self._watch_fd)
            self._watch_fd = None
        if self.watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.watchdog.wait(timeout=5)
        self.phase = "stopped"

    def sleep_or_stop(self, seconds: float) -> bool:
        """Sleep; True if a stop was requested meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.phase == "stop-requested":
                return True
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
        return self.phase == "stop-requested"


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with _LOOPBACK.open(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except Exception:
            time.sleep(0.3)
    return False


def main() -> int:
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings.base")
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    data_dir = Path(env.get("CONTROLPLANE_DATA_DIR", ROOT / "var")).resolve()
    env["CONTROLPLANE_DATA_DIR"] = str(data_dir)
    py = str(BIN / "python")
    external_mlflow = bool(env.get("MLFLOW_TRACKING_URI"))

    try:
        port = port_from_env(env, "PORT", 8000)
        mlflow_port = None if external_mlflow else port_from_env(env, "MLFLOW_PORT", 5000)
        if mlflow_port == port:
            raise StartupError(f"PORT and MLFLOW_PORT are both {port}: give them different ports")
        check_port_free("PORT", port)
        if mlflow_port is not None:
            check_port_free("MLFLOW_PORT", mlflow_port)
    except StartupError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return exc.code

    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    sup = Supervisor(env)
    sup.install_handlers()

    def manage(*args: str) -> None:
        subprocess.run(
            [py, str(ROOT / "manage.py"), *args],
            env=env,
            check=True,
            cwd=ROOT,
            preexec_fn=sup._preexec,
        )

    try:
        sup.start_watchdog()
        mlflow_uri = env.get("MLFLOW_TRACKING_URI", "")
        auth: MlflowAuth | None = None
        if not external_mlflow:
            mlflow_dir = data_dir / "mlflow"
            (mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
            auth = mlflow_auth_setup(mlflow_dir)
            mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
            sup.spawn(
                "mlflow",
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--app-name",
                    "basic-auth",
                    "--backend-store-uri",
                    f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(mlflow_dir / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                ],
                env={
                    **{k: v for k, v in env.items() if not k.startswith("MLFLOW_AUTH_ADMIN")},
                    **auth.server_env,
                },
                cwd=data_dir,
                whole_group=True,
            )
            env["MLFLOW_TRACKING_URI"] = mlflow_uri
            env.pop("MLFLOW_TRACKING_PASSWORD", None)  # the user's, for another server
            env.update(auth.client_env)
        manage("migrate", "--noinput", "-v", "0")
        manage("collectstatic", "--noinput", "-v", "0")
        manage("ensure_admin")
        if auth is not None:
            mlflow = sup.procs["mlflow"]
            if not _wait_http(f"{mlflow_uri}/health", 90, mlflow):
                print(f"MLflow server did not start on {mlflow_uri} (MLFLOW_PORT)", file=sys.stderr)
                sup.stop()
                return 1
            if mlflow.poll() is not None or not mlflow_answers_as_ours(mlflow_uri, auth.password):
                print(
                    f"the MLflow server on {mlflow_uri} is not the one this control plane "
                    "started (MLFLOW_PORT is taken by another server): not using it",
                    file=sys.stderr,
                )
                sup.stop()
                return 1

        sup.spawn(
            "web",
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
            cwd=ROOT,
        )
        env.setdefault(
            "CONTROLPLANE_AUTOSCALE_QUEUE",
            env.get("CONTROLPLANE_TASK_QUEUE", "controlplane") + "-autoscale",
        )
        sup.spawn(
            "worker",
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
            cwd=ROOT,
        )
        # The autoscaler's 1 s poll gets a worker of its own: on the shared one it waits
        # behind long monitoring pulls and reconcile passes (a 70 s stall measured under load).
        sup.spawn(
            "autoscaler",
            [
                str(BIN / "celery"),
                "-A",
                "controlplane",
                "worker",
                "--loglevel",
                "WARNING",
                "--pool",
                "solo",
                "-n",
                "autoscaler@%h",
                "-Q",
                env["CONTROLPLANE_AUTOSCALE_QUEUE"],
            ],
            cwd=ROOT,
        )
        sup.spawn(
            "beat",
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
            cwd=ROOT,
        )
        if not _wait_http(f"http://127.0.0.1:{port}/healthz", 60, sup.procs["web"]):
            print("the web app did not become healthy", file=sys.stderr)
            sup.stop()
            return 1
        sup.phase = "running"
        mlflow_note = (
            "   (your credential: Tokens page, MLflow credential)" if auth is not None else ""
        )
        print(
            "\n"
            f"  control plane   http://127.0.0.1:{port}/   (user: admin)\n"
            f"  API docs        http://127.0.0.1:{port}/api/docs/\n"
            f"  MLflow          {mlflow_uri}   (export MLFLOW_TRACKING_URI={mlflow_uri}){mlflow_note}\n"
            f"  data            {data_dir}\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        parent = os.getppid()
        while True:
            if sup.sleep_or_stop(1.0):
                sup.stop()
                return 0
            if os.getppid() != parent:  # `make` was killed: it does not forward signals
                sup.stop()
                return 0
            for name, proc in sup.procs.items():
                code = proc.poll()
                if code is not None:
                    print(f"{name} exited with code {code}; stopping the rest", file=sys.stderr)
                    sup.stop()
                    return 1
    except _StopRequested:
        sup.stop()
        return 0
    except subprocess.CalledProcessError as exc:
        print(f"start-up step failed: {exc}", file=sys.stderr)
        sup.stop()
        return 1
    finally:
        sup.stop()  # whatever ended start-up or the watch (a stop is done only once)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--watchdog":
        sys.exit(watchdog(float(sys.argv[2])))
    sys.exit(main())
