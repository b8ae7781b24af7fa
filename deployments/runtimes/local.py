"""The local runtime: model servers as processes on this host (the embedded default).

Limits: the local runtime does not enforce CPU or memory limits (use the
docker runtime for that); restarts of crashed processes are done by the
reconciler.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from . import process
from .base import InstanceSpec, InstanceStatus, RuntimeError_

_PASS_ENV = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "MLFLOW_DISABLE_TELEMETRY")


class LocalRuntime:
    name = "local"

    def __init__(
        self,
        *,
        state_dir: Path,
        owner: str,
        code_root: Path,
        admin_token: Callable[[str], str],
        python: str | None = None,
    ) -> None:
        """``admin_token`` maps a deployment name to the token its servers' admin endpoints
        require (deployments/serving_token.py); this module stays free of Django."""
        self.state_dir = Path(state_dir)
        self.owner = owner
        self.code_root = Path(code_root)
        self.admin_token = admin_token
        self.python = python or sys.executable

    def _log_path(self, instance_name: str) -> Path:
        return self.state_dir / "logs" / f"{instance_name}.log"

    def prepare(self, spec: InstanceSpec) -> None:
        """Nothing to build: the server runs from this checkout's code."""

    def start(self, spec: InstanceSpec) -> InstanceStatus:
        if not Path(spec.model_dir, "MLmodel").exists():
            raise RuntimeError_(f"no MLflow model at {spec.model_dir}")
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        env.update(spec.env)
        env.update(
            PYTHONPATH=str(self.code_root),
            PYTHONUNBUFFERED="1",
            MLFLOW_DISABLE_TELEMETRY="true",
            CONTROLPLANE_OWNER=self.owner,
            CONTROLPLANE_DEPLOYMENT=spec.deployment,
            CONTROLPLANE_REVISION=str(spec.revision),
            CONTROLPLANE_ORDINAL=str(spec.ordinal),
            CONTROLPLANE_PORT=str(spec.port),
            CONTROLPLANE_INSTANCE=spec.instance_name,
            # In the environment, not on the command line: /proc/<pid>/environ is readable by
            # this user only, /proc/<pid>/cmdline by everyone.
            SERVING_ADMIN_TOKEN=self.admin_token(spec.deployment),
        )
        argv = [
            self.python,
            "-m",
            "serving",
            "--model-dir",
            spec.model_dir,
            "--name",
            spec.model_name,
            "--version",
            spec.model_version,
            "--host",
            spec.host,
            "--port",
            str(spec.port),
            "--max-batch-size",
            str(spec.max_batch_size),
            "--max-batch-delay-ms",
            str(spec.max_batch_delay_ms),
        ]
        try:
            runtime_id = process.spawn(
                argv, env=env, log_path=self._log_path(spec.instance_name), cwd=self.code_root
            )
        except OSError as exc:
            raise RuntimeError_(f"cannot start the model server: {exc}") from exc
        return InstanceStatus(
            runtime_id=f"{runtime_id}:{spec.instance_name}",
            deployment=spec.deployment,
            revision=spec.revision,
            ordinal=spec.ordinal,
            address=f"{spec.host}:{spec.port}",
            running=True,
        )

    def stop(self, runtime_id: str, *, timeout: float = 10.0) -> None:
        process.terminate(runtime_id, timeout=timeout)

    def inspect(self, runtime_id: str) -> InstanceStatus | None:
        info = process.inspect(runtime_id)
        if info is None:
            return None
        return self._status(runtime_id, info)

    def _status(self, runtime_id: str, info: process.ProcInfo) -> InstanceStatus:
        labels = info.labels
        return InstanceStatus(
            runtime_id=runtime_id,
            deployment=labels.get("CONTROLPLANE_DEPLOYMENT", ""),
            revision=int(labels.get("CONTROLPLANE_REVISION", "0") or 0),
            ordinal=int(labels.get("CONTROLPLANE_ORDINAL", "0") or 0),
            address=f"127.0.0.1:{labels.get('CONTROLPLANE_PORT', '0')}",
            running=info.alive,
        )

    def list_owned(self) -> list[InstanceStatus]:
        return [
            self._status(f"{p.pid}:{p.starttime}:{p.labels.get('CONTROLPLANE_INSTANCE', '')}", p)
            for p in process.find_labelled(self.owner)
            if "CONTROLPLANE_INSTANCE" in p.labels
        ]

    def logs(self, runtime_id: str, *, tail: int = 100) -> str:
        name = runtime_id.split(":", 2)[2] if runtime_id.count(":") >= 2 else ""
        if not name or "/" in name or name.startswith("."):
            return ""
        return process.tail(self._log_path(name), tail)
