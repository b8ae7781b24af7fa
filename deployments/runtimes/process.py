"""Host processes with a stable identity.

A process id alone can be reused after a crash, so a process is named by
``pid:starttime`` (the kernel's start time in clock ticks, from /proc). Our
processes carry ``CONTROLPLANE_*`` environment labels, readable in
/proc/<pid>/environ, so they can be found again after a control plane restart.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    starttime: str
    labels: dict[str, str]
    alive: bool
    exit_code: int | None = None  # of a finished child of this process (negative: signal)


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, starttime) of a process, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key.startswith(b"CONTROLPLANE_"):
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _reap(pid: int) -> int | None:
    """Collect a finished child of this process: its exit code, None if not our child."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done == pid else None


def identity(pid: int) -> str:
    stat = _stat(pid)
    return f"{pid}:{stat[1]}" if stat else f"{pid}:0"


def parse_id(runtime_id: str) -> tuple[int, str]:
    pid, _, start = runtime_id.partition(":")
    try:
        return int(pid), start.split(":")[0]
    except ValueError:
        return -1, ""


def inspect(runtime_id: str) -> ProcInfo | None:
    pid, start = parse_id(runtime_id)
    if pid <= 0:
        return None
    stat = _stat(pid)
    if stat is None or stat[1] != start:
        return None  # gone, or the pid was reused by another process
    if stat[0] in ("Z", "X"):
        return ProcInfo(pid=pid, starttime=start, labels={}, alive=False, exit_code=_reap(pid))
    return ProcInfo(pid=pid, starttime=start, labels=_environ(pid), alive=True)


def spawn(
    argv: list[str],
    *,
    env: dict[str, str],
    log_path: Path,
    cwd: Path,
    rlimits: dict[int, int] | None = None,
    cpus: frozenset[int] | None = None,
    idle: bool = False,
) -> str:
    """Start a detached process (own session: it outlives its parent) and return its id.
    Raises OSError if it cannot be started.

    ``rlimits`` (``resource.RLIMIT_*`` -> limit, soft and hard) and ``cpus`` (the CPU
    affinity) are set in the child between fork and exec: the program never runs unconfined,
    and cannot raise them again (the hard limit is the limit). ``idle`` starts it under
    SCHED_IDLE (inherited by every thread and child it makes): it runs only on CPU time no
    normal-priority process wants, and an unprivileged process cannot leave that policy."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab", buffering=0) as log:
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                # Only when there is something to set: without preexec_fn, Popen keeps its
                # fast path that runs no Python code in the child.
                preexec_fn=(
                    _confine(rlimits or {}, cpus, idle) if rlimits or cpus or idle else None
                ),
            )
        except subprocess.SubprocessError as exc:  # raised by the child's confine()
            raise OSError(
                f"cannot set its resource limits, CPU affinity or priority: {exc}"
            ) from exc
    # Popen objects are not kept: the process is tracked by identity, and a
    # finished child is reaped by inspect()/terminate().
    return identity(proc.pid)


def _confine(
    rlimits: dict[int, int], cpus: frozenset[int] | None, idle: bool = False
) -> Callable[[], None]:
    """The child's side of spawn(). It runs between fork and exec, where another thread of
    the parent (the reconciler's lease heartbeat) may have held a lock at the fork: so only
    system calls on values computed in the parent; no imports, no logging."""
    idle_param = os.sched_param(0) if idle else None

    def confine() -> None:
        for which, limit in rlimits.items():
            resource.setrlimit(which, (limit, limit))
        if cpus:
            os.sched_setaffinity(0, cpus)
        if idle_param is not None:
            os.sched_setscheduler(0, os.SCHED_IDLE, idle_param)

    return confine


def terminate(runtime_id: str, *, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` for a graceful exit, then SIGKILL. Idempotent."""
    info = inspect(runtime_id)
    if info is None:
        return
    if not info.alive:
        return
    try:
        os.kill(info.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = inspect(runtime_id)
        if current is None or not current.alive:
            return
        time.sleep(0.05)
    try:
        os.kill(info.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        current = inspect(runtime_id)
        if current is None or not current.alive:
            return
        time.sleep(0.02)


def find_labelled(owner: str) -> list[ProcInfo]:
    """Live processes whose environment says CONTROLPLANE_OWNER=owner."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        env = _environ(pid)
        if env.get("CONTROLPLANE_OWNER") != owner:
            continue
        stat = _stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        found.append(ProcInfo(pid=pid, starttime=stat[1], labels=env, alive=True))
    return found


def tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
