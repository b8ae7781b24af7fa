"""What a hostile model tries from inside its model server: a custom pyfunc whose ``predict``
reports, as its prediction, every attempt to reach the control plane and whether it worked.

Saved with cloudpickle *by value* (tests/security/test_isolation.py), so the server needs
nothing of this repository to load it: the same kind of archive as the issue's attack.
Targets come from the server's environment (a deployment's ``env``):

- ``PROBE_FILES``: paths to open for reading (secret key, database), ``|``-separated;
- ``PROBE_WRITE``: paths to open for appending (the database);
- ``PROBE_LIST``: directories to list (the data directory): the names seen are the detail;
- ``PROBE_TCP``: ``host:port`` to connect to (web port, MLflow, PostgreSQL, Redis);
- ``PROBE_UNIX``: Unix socket paths to connect to (PostgreSQL's, Docker's);
- ``PROBE_PID``: a control-plane process to signal (0), ptrace and read the environment of.
"""

from __future__ import annotations

import mlflow.pyfunc


def attempt(what: str, action) -> dict:
    """{"what", "ok", "detail"}: ok is True when the action succeeded."""
    try:
        detail = action()
    except Exception as exc:  # every failure is a denial worth reporting
        return {"what": what, "ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
    return {"what": what, "ok": True, "detail": str(detail)[:300]}


def probe(env) -> list[dict]:
    import ctypes
    import json
    import os
    import socket

    def split(name):
        return [item for item in env.get(name, "").split("|") if item]

    def read(path):
        with open(path, "rb") as fh:
            return f"read {len(fh.read(64))} bytes"

    def append(path):
        with open(path, "ab"):
            return "opened for writing"

    def tcp(target):
        host, _, port = target.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=2):
            return "connected"

    def unix(path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(path)
            return "connected"

    def ptrace(pid):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
        return "attached"

    def signal(pid):
        os.kill(pid, 0)
        return "signalled"

    reports = [
        {"what": "uid", "ok": os.getuid() == 0, "detail": f"uid {os.getuid()} gid {os.getgid()}"}
    ]
    reports += [attempt(f"read {p}", lambda p=p: read(p)) for p in split("PROBE_FILES")]
    reports += [attempt(f"write {p}", lambda p=p: append(p)) for p in split("PROBE_WRITE")]
    reports += [
        attempt(f"list {p}", lambda p=p: json.dumps(sorted(os.listdir(p))))
        for p in split("PROBE_LIST")
    ]
    reports += [attempt(f"connect {t}", lambda t=t: tcp(t)) for t in split("PROBE_TCP")]
    reports += [attempt(f"connect unix:{p}", lambda p=p: unix(p)) for p in split("PROBE_UNIX")]
    if env.get("PROBE_PID"):
        pid = int(env["PROBE_PID"])
        reports.append(attempt(f"signal 0 to pid {pid}", lambda: signal(pid)))
        reports.append(attempt(f"read /proc/{pid}/environ", lambda: read(f"/proc/{pid}/environ")))
        reports.append(attempt(f"ptrace pid {pid}", lambda: ptrace(pid)))
    return reports


class Probe(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        import json
        import os

        return [json.dumps(probe(os.environ))]
