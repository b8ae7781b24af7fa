"""Peer model servers for bench/serving.py: MLServer and KServe's ModelServer, each in its own
cached virtual environment under ~/.cache/controlplane/ (built with uv from the package index
on first use, the host's CA bundle), serving the same scikit-learn model with one worker on
127.0.0.1 only.

- MLServer 1.7.1 + mlserver-sklearn, ``parallel_workers: 0`` (inference in the server's own
  process, as ours), ``uvloop<0.22`` (1.7.1 fails to start with newer uvloop), ``host``
  127.0.0.1 for its HTTP, gRPC and metrics listeners.
- KServe's ``ModelServer`` (kserve 0.21) with a ``kserve.Model`` that loads the joblib file and
  calls ``predict``; its REST server hard-codes ``host="0.0.0.0"`` in ``uvicorn.Config``, so
  the launcher replaces ``uvicorn.Config`` in kserve's REST module with one that forces
  127.0.0.1 before anything listens, and gRPC (which binds ``[::]``) is off.

Every peer's listening sockets are checked (``/proc/net/tcp*``) after start: anything not on
loopback stops the bench.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "controlplane"

MLSERVER_REQUIREMENTS = ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop<0.22"]
KSERVE_REQUIREMENTS = ["kserve==0.21.0"]

KSERVE_LAUNCHER = r"""
import json
import sys
import joblib
import numpy as np
import uvicorn
import kserve.protocol.rest.server as rest


class _LoopbackConfig(uvicorn.Config):
    def __init__(self, *args, **kwargs):
        kwargs["host"] = "127.0.0.1"  # kserve passes "0.0.0.0"
        super().__init__(*args, **kwargs)


rest.uvicorn.Config = _LoopbackConfig  # the name RESTServer looks up, before it builds one

import kserve


class SKLearn(kserve.Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.path = path
        self.model = None

    def load(self):
        self.model = joblib.load(self.path)
        self.ready = True
        return True

    def predict(self, payload, headers=None):
        if isinstance(payload, (bytes, bytearray)):  # kserve 0.21 hands v1 bodies over raw
            payload = json.loads(payload)
        rows = np.asarray(payload["instances"], dtype=np.float64)
        return {"predictions": self.model.predict(rows).tolist()}


model = SKLearn("bench", sys.argv[1])
model.load()
kserve.ModelServer(workers=1).start([model])
"""


def _uv() -> str:
    try:
        import uv

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if not found:
            raise SystemExit("uv is needed to build the peers' environments") from None
        return found


def peer_env(name: str, requirements: list[str]) -> Path:
    """The cached venv of one peer (built when missing or when its requirements changed)."""
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:12]
    root = CACHE / f"bench-peer-{name}"
    marker = root / ".bench-requirements"
    if marker.is_file() and marker.read_text() == digest:
        return root
    shutil.rmtree(root, ignore_errors=True)
    print(f"building {root} ({', '.join(requirements)}) ...", flush=True)
    env = {**os.environ}
    cert = "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).is_file():
        env.setdefault("SSL_CERT_FILE", cert)
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([_uv(), "venv", "-q", "--python", python, str(root)], check=True, env=env)
    subprocess.run(
        [_uv(), "pip", "install", "-q", "--python", str(root / "bin" / "python"),
         "--index-strategy", "unsafe-best-match", *requirements],
        check=True, env=env,
    )  # fmt: skip
    marker.write_text(digest)
    return root


def mlserver_command(workdir: Path, model_file: Path, port: int, grpc_port: int,
                     metrics_port: int, sklearn: str) -> list[str]:  # fmt: skip
    root = peer_env("mlserver", [*MLSERVER_REQUIREMENTS, f"scikit-learn=={sklearn}"])
    repo = workdir / "mlserver"
    (repo / "bench").mkdir(parents=True, exist_ok=True)
    (repo / "settings.json").write_text(json.dumps({
        "parallel_workers": 0, "host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port,
        "metrics_port": metrics_port, "debug": False,
    }))  # fmt: skip
    (repo / "bench" / "model-settings.json").write_text(json.dumps({
        "name": "bench", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(model_file)},
    }))  # fmt: skip
    return [str(root / "bin" / "mlserver"), "start", str(repo)]


def kserve_command(workdir: Path, model_file: Path, port: int, sklearn: str) -> list[str]:
    root = peer_env("kserve", [*KSERVE_REQUIREMENTS, f"scikit-learn=={sklearn}"])
    launcher = workdir / "kserve_launcher.py"
    launcher.write_text(KSERVE_LAUNCHER)
    return [str(root / "bin" / "python"), str(launcher), str(model_file),
            "--http_port", str(port), "--enable_grpc", "false", "--workers", "1"]  # fmt: skip


def listening(pid: int) -> list[str]:
    """host:port of every TCP socket the process tree of ``pid`` listens on (IPv4 and IPv6)."""
    inodes = set()
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for fd in Path(f"/proc/{p}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            host_hex, port_hex = fields[1].split(":")
            out.append(f"{_address(host_hex, width)}:{int(port_hex, 16)}")
    return out


def _address(host_hex: str, width: int) -> str:
    raw = bytes.fromhex(host_hex)
    if width == 8:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
    import ipaddress

    address = ipaddress.IPv6Address(b"".join(words))
    return str(address.ipv4_mapped or address)  # ::ffff:127.0.0.1 (gRPC's) as 127.0.0.1


def check_loopback_only(pid: int, name: str) -> list[str]:
    found = listening(pid)
    bad = [a for a in found if not a.startswith(("127.", "::1:", "::ffff:127."))]
    if bad:
        raise SystemExit(f"{name} listens on {bad}: not loopback; stopping the bench")
    return found
