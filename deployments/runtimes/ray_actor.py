"""The Ray actors that run on the nodes (the node-side half of ray.py): one model server
(ModelServerActor), or one deployment's router on an ingress node (RouterActor).

Shipped to the cluster by value (cloudpickle), so a node needs Ray and Python, not this
repository: the model files and the model server's code arrive as one tar archive through
Ray's object store, and the model's environment is built on the node (uv, else venv + pip).
Nothing here imports Django or the rest of the control plane.

The server process is a child of the actor's worker process with PR_SET_PDEATHSIG: when the
actor is killed, or its node dies (the raylet takes its workers with it), the server goes too,
so a server never outlives the actor that the control plane sees. The same holds for a
router and its RouterActor.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

_PASS_ENV = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGKILL when the actor's worker thread exits."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _unpack(data: bytes, target: Path) -> None:
    """Unpack ``data`` into ``target`` once (by digest), atomically."""
    if (target / ".complete").exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(staging, filter="data")
    (staging / ".complete").write_text("")
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another replica on this node won


# --- what the actors leave on their node ---------------------------------------------------
# Under <TMPDIR>/controlplane-ray/<owner>/: bundles/<digest> (model files and the server's
# code), environments/<key>, logs/<instance>.log and routers/<deployment>. Each actor process
# holds a lease (leases/<host>-<pid>-<start>.json naming the paths it uses) and touches those
# paths when it starts and when it stops. The sweep an actor runs when it starts removes what
# no live lease names and no one touched for ``gc_after_s``. Leases and sweeps take a lock on
# the node (flock), so a path is never removed between a lease naming it and its use.

GC_AFTER_S = 86400.0  # when the control plane does not say
_GC_KINDS = ("bundles", "environments", "logs", "routers")
_STAGING_MIN_AGE_S = 7200.0  # a build or unpack in progress is never that old (1800 s a step)


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the pid: which process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: str, start: str) -> bool:
    if not pid.isdigit():
        return False
    if start != "unknown":
        return _process_start(int(pid)) == start
    try:  # no /proc: the pid alone
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class _NodeLock:
    """flock on ``<root>/leases/.lock``: shared for leases, exclusive (never waiting) for a
    sweep."""

    def __init__(self, root: Path, *, exclusive: bool) -> None:
        self.path = root / "leases" / ".lock"
        self.exclusive = exclusive
        self.fd: int | None = None

    def __enter__(self) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB if self.exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            return False  # another sweep runs
        return True

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # releases the lock


class Lease:
    """The paths this actor process uses on its node."""

    def __init__(self, root: Path, paths: list[Path]) -> None:
        pid = os.getpid()
        self.root = root
        self.paths = [str(p) for p in paths]
        start = _process_start(pid) or "unknown"
        self.path = root / "leases" / f"{os.uname().nodename}-{pid}-{start}.json"
        import json

        with _NodeLock(root, exclusive=False):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"paths": self.paths}))
            os.replace(tmp, self.path)
        self.touch()

    def touch(self) -> None:
        for path in self.paths:
            try:
                os.utime(path)
            except OSError:
                pass  # not there yet (built next), or gone

    def release(self) -> None:
        self.touch()  # unused from now: gc_after_s counts from here
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _live_leases(leases: Path) -> tuple[set[str], list[Path]]:
    """The paths live leases name, and the stale lease files (their process is gone). A
    lease of another host (a shared TMPDIR) cannot be checked: it counts as live."""
    import json

    host = os.uname().nodename
    in_use: set[str] = set()
    stale: list[Path] = []
    for lease in leases.glob("*.json"):
        owner, _, rest = lease.stem.rpartition("-")  # <host>-<pid>, <start>
        node, _, pid = owner.rpartition("-")
        if node == host and not _alive(pid, rest):
            stale.append(lease)
            continue
        try:
            in_use.update(json.loads(lease.read_text())["paths"])
        except (OSError, ValueError, KeyError, TypeError):
            if node == host:
                stale.append(lease)
    return in_use, stale


def sweep(root: Path, gc_after_s: float, now: float | None = None) -> list[str] | None:
    """Remove what no live lease names and was not touched for ``gc_after_s`` under root; the
    removed paths (None: another sweep holds the lock)."""
    now = time.time() if now is None else now
    trash: list[Path] = []
    removed: list[str] = []
    with _NodeLock(root, exclusive=True) as locked:
        if not locked:
            return None
        in_use, stale = _live_leases(root / "leases")
        for lease in stale:
            lease.unlink(missing_ok=True)
        for kind in _GC_KINDS:
            folder = root / kind
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if str(entry) in in_use:
                    continue
                try:
                    age = now - entry.lstat().st_mtime
                except FileNotFoundError:
                    continue
                # staging dirs and requirement files of builds: never one in progress
                limit = (
                    max(gc_after_s, _STAGING_MIN_AGE_S)
                    if entry.name.startswith(".")
                    else gc_after_s
                )
                if age < limit:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    # out of sight at once (atomic); deleted after the lock is released
                    target = folder / f".trash-{entry.name}-{os.getpid()}-{len(trash)}"
                    try:
                        os.rename(entry, target)
                    except OSError:
                        continue
                    trash.append(target)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(str(entry))
    for target in trash:
        shutil.rmtree(target, ignore_errors=True)
    return removed


def _sweep_in_background(root: Path, gc_after_s: float) -> None:
    def run() -> None:
        try:
            sweep(root, gc_after_s)
        except Exception:
            pass  # a sweep that fails leaves files behind, never an instance down

    threading.Thread(target=run, daemon=True).start()


def _satisfied(requirements: list[str]) -> bool:
    """Whether this node's interpreter has every requirement (``packaging`` comes with Ray)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    for line in requirements:
        req = Requirement(line)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            return False
    return True


def _find_uv() -> str | None:
    try:
        import uv

        return uv.find_uv_bin()
    except Exception:
        return shutil.which("uv")


def _build_environment(root: Path, plan: dict, log) -> str:
    """The python of the environment ``plan`` describes on this node, built if missing."""
    target = root / "environments" / plan["key"]
    python = target / "bin" / "python"
    if (target / ".complete").exists():
        return str(python)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    shutil.rmtree(staging)
    reqs = target.parent / f".{plan['key']}.txt"
    reqs.write_text("\n".join(plan["requirements"]) + "\n")
    env = {**os.environ, **plan.get("uv_env", {})}
    uv = _find_uv()
    started = time.monotonic()
    if uv:
        steps = [
            [uv, "venv", "--python", plan.get("python") or sys.executable, str(staging)],
            [uv, "pip", "install", "--python", str(staging / "bin" / "python"), "-r", str(reqs)]
            + list(plan.get("uv_args", [])),
        ]
    else:
        steps = [
            [sys.executable, "-m", "venv", str(staging)],
            [str(staging / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(reqs)]
            + list(plan.get("pip_args", [])),
        ]
    for argv in steps:
        log.write(f"[controlplane] {' '.join(argv[:3])} ...\n".encode())
        log.flush()
        done = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(f"building the environment failed: {argv[:3]} -> {done.returncode}")
    (staging / ".complete").write_text("")
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    log.write(f"[controlplane] environment built in {time.monotonic() - started:.1f} s\n".encode())
    return str(python)


def _tail(path: Path, tail: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            data = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-tail:])


class ModelServerActor:
    """One model-server instance: prepares its files and environment on this node, starts
    ``python -m serving`` and watches it. Its name (in the control plane's namespace) and
    ``labels`` say which instance it is."""

    def __init__(self, labels: dict, spec: dict, bundle: bytes, environment: dict | None):
        import ray

        self.labels = labels
        self.spec = spec
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.root = Path(tempfile.gettempdir()) / "controlplane-ray" / labels["owner"]
        self.log_path = self.root / "logs" / f"{labels['instance']}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.bundle_dir = self.root / "bundles" / hashlib.sha256(bundle).hexdigest()[:24]
        used = [self.bundle_dir, self.log_path]
        if environment and environment.get("key"):
            used.append(self.root / "environments" / environment["key"])
        self.lease = Lease(self.root, used)  # before anything it names is used
        _sweep_in_background(self.root, float(spec.get("gc_after_s", GC_AFTER_S)))
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.error = ""
        self.stopping = False
        self._bundle, self._environment = bundle, environment
        # The server is started and waited on by this thread, which lives as long as the
        # server: PR_SET_PDEATHSIG fires when the *thread* that forked it ends.
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        with open(self.log_path, "ab", buffering=0) as log:
            try:
                argv, env = self._prepare(log)
                if self.stopping:
                    return
                self.proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=env["PYTHONPATH"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                    preexec_fn=_die_with_parent,
                )
                self.exit_code = self.proc.wait()
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                log.write(f"[controlplane] cannot start the model server: {self.error}\n".encode())
                self.exit_code = -1

    def _prepare(self, log) -> tuple[list[str], dict]:
        bundle_dir = self.bundle_dir
        _unpack(self._bundle, bundle_dir)
        self._bundle = b""
        python = sys.executable
        plan = self._environment
        if plan and plan.get("requirements"):
            if plan.get("mode") == "auto" and _satisfied(plan["requirements"]):
                log.write(b"[controlplane] environment auto: the node's Python serves it\n")
            else:
                python = _build_environment(self.root, plan, log)
        self.lease.touch()
        spec = self.spec
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        env.update(spec.get("env") or {})
        env.update(spec.get("server_env") or {})
        env.update(
            PYTHONPATH=str(bundle_dir / "code"),
            PYTHONUNBUFFERED="1",
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        argv = [
            python,
            "-m",
            "serving",
            "--model-dir",
            str(bundle_dir / "model"),
            "--name",
            spec["model_name"],
            "--version",
            spec["model_version"],
            "--host",
            self.node_ip,
            "--port",
            str(spec["port"]),
            "--max-batch-size",
            str(spec["max_batch_size"]),
            "--max-batch-delay-ms",
            str(spec["max_batch_delay_ms"]),
        ]
        return argv, env

    def status(self) -> dict:
        running = self.exit_code is None and not self.stopping
        return {
            "labels": self.labels,
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "pid": self.proc.pid if self.proc else None,
            "running": running,
            "exit_code": self.exit_code,
            "error": self.error,
        }

    def logs(self, tail: int = 100) -> str:
        return _tail(self.log_path, tail)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (in-flight requests finish), SIGKILL after ``timeout``; the lease ends."""
        self.stopping = True
        try:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return self.exit_code
            proc.terminate()
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(5)
        finally:
            self.lease.release()


class RouterActor:
    """The stable endpoint of one deployment on an ingress node: ``python -m serving.router``
    bound to this node's address and the deployment's port, started again when it exits.

    The control plane sends the backends document (``push``); it is written atomically
    (temp file + rename) where the router polls it, so the router needs nothing else from
    the control plane: the actor is detached and lives on, answering, while the control
    plane's host is down. ``labels`` say whose router it is (owner, deployment, port)."""

    GIVE_UP_EXITS = 5  # exits within GIVE_UP_WINDOW_S: reported failed, the reconciler acts
    GIVE_UP_WINDOW_S = 30.0

    def __init__(self, labels: dict, code: bytes, document: str, gc_after_s: float = GC_AFTER_S):
        import ray

        self.labels = labels
        self.port = int(labels["port"])
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.root = Path(tempfile.gettempdir()) / "controlplane-ray" / labels["owner"]
        self.dir = self.root / "routers" / labels["deployment"]
        self.code_dir = self.root / "bundles" / hashlib.sha256(code).hexdigest()[:24]
        self.lease = Lease(self.root, [self.code_dir, self.dir])  # before they are used
        self.dir.mkdir(parents=True, exist_ok=True)
        self.backends = self.dir / "backends.json"
        self.log_path = self.dir / "router.log"
        _unpack(code, self.code_dir)
        self.lease.touch()
        _sweep_in_background(self.root, float(gc_after_s))
        self._lock = threading.Lock()
        self.push(document)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.failed = ""
        self.stopping = False
        # Forks and waits on the router for the actor's lifetime (PR_SET_PDEATHSIG: see above).
        self._thread = threading.Thread(target=self._supervise, daemon=True)
        self._thread.start()

    def _argv_env(self) -> tuple[list[str], dict]:
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        # Not CONTROLPLANE_OWNER: on a node that is also the control plane's host, the
        # control plane would take it for one of its own routers (and sweep it).
        env.update(
            PYTHONPATH=str(self.code_dir / "code"),
            PYTHONUNBUFFERED="1",
            CONTROLPLANE_RAY_OWNER=self.labels["owner"],
            CONTROLPLANE_RAY_ROUTER=self.labels["deployment"],
        )
        argv = [
            sys.executable,
            "-m",
            "serving.router",
            "--host",
            self.node_ip,
            "--port",
            str(self.port),
            "--backends-file",
            str(self.backends),
        ]
        return argv, env

    def _supervise(self) -> None:
        argv, env = self._argv_env()
        exits: deque[float] = deque()
        with open(self.log_path, "ab", buffering=0) as log:
            while not self.stopping:
                try:
                    self.proc = subprocess.Popen(
                        argv,
                        env=env,
                        cwd=env["PYTHONPATH"],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        close_fds=True,
                        preexec_fn=_die_with_parent,
                    )
                    self.starts += 1
                    code = self.proc.wait()
                except Exception as exc:
                    code = f"{type(exc).__name__}: {exc}"
                if self.stopping:
                    return
                now = time.monotonic()
                exits.append(now)
                while exits and now - exits[0] > self.GIVE_UP_WINDOW_S:
                    exits.popleft()
                log.write(
                    f"[controlplane] the router exited ({code}); starting it again\n".encode()
                )
                if len(exits) >= self.GIVE_UP_EXITS:
                    self.failed = (
                        f"the router exited {len(exits)} times within "
                        f"{self.GIVE_UP_WINDOW_S:.0f} s (last: {code})"
                    )
                    return
                time.sleep(0.5)

    def push(self, document: str) -> bool:
        """Write the backends document if it differs from what the router has; True if so."""
        with self._lock:
            try:
                if self.backends.read_text() == document:
                    return False
            except FileNotFoundError:
                pass
            tmp = self.backends.with_suffix(".tmp")
            tmp.write_text(document)
            os.replace(tmp, self.backends)
            return True

    def status(self) -> dict:
        proc = self.proc
        return {
            "labels": self.labels,
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "pid": proc.pid if proc else None,
            "starts": self.starts,
            "running": not self.failed and not self.stopping,
            "error": self.failed,
        }

    def logs(self, tail: int = 100) -> str:
        return _tail(self.log_path, tail)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: the router stops accepting and finishes its in-flight requests; the
        lease ends."""
        self.stopping = True
        try:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        finally:
            self.lease.release()
