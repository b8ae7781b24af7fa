"""The local runtime: model servers as processes on this host (the embedded default).

Limits are what an unprivileged process can set on its child without cgroups, per server
process: ``memory_mb`` as its RLIMIT_DATA, ``cpu`` as a CPU affinity of whole cores (see
_memory_rlimits and _cpu_set). Restarts of crashed processes are done by the reconciler.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .. import environments
from . import process, sandbox
from .base import InstanceSpec, InstanceStatus, Progress, RuntimeError_

_PASS_ENV = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "MLFLOW_DISABLE_TELEMETRY")
_MIB = 1024 * 1024


def _memory_rlimits(memory_mb: int | None) -> dict[int, int]:
    """``memory_mb`` as the server's RLIMIT_DATA (soft = hard), never above this process's
    own hard limit (an unprivileged process cannot raise it)."""
    # RLIMIT_DATA, not RLIMIT_AS. Since Linux 4.7 RLIMIT_DATA caps every private writable
    # mapping (heap, anonymous mmap, thread stacks): memory the process can make its own.
    # RLIMIT_AS caps the address space, which also holds what costs no private memory: shared
    # libraries' code and read-only data (130 MB for numpy, scipy, sklearn and mlflow, shared
    # with every process mapping them; and a model file a loader mmaps) and PROT_NONE
    # reservations (glibc reserves 64 MB per malloc arena, up to 8 arenas per core). Measured
    # with the tests' sklearn model on 2 cores (RSS 145 MB, VmData 252 MB, VmSize 425 MB): it
    # serves under RLIMIT_DATA from 256 MB (176 MB pinned to one core) but under RLIMIT_AS only
    # from 448 MB (352 MB); both make it exit within a second at 48 and 64 MB. Neither is RSS
    # (Linux ignores RLIMIT_RSS): numpy's and scipy's OpenBLAS each reserve a 32 MB buffer and
    # an 8 MB stack per core they use, so a limit needs headroom over RSS, more on a many-core
    # host without a cpu limit. Cost of RLIMIT_DATA: a limit somewhat below what the server
    # needs can leave scipy's OpenBLAS retrying a failed allocation forever (128-176 MB on
    # 2 cores, 96-112 MB on one) instead of exiting; the revision then fails at its progress
    # deadline rather than as a crash loop.
    if memory_mb is None:
        return {}
    limit = memory_mb * _MIB
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    return {resource.RLIMIT_DATA: limit}


def _cpu_set(cpu: float | None, port: int) -> frozenset[int] | None:
    """``cpu`` cores as a CPU affinity of whole cores: ceil(cpu), at least 1, at most the cores
    this process may use. A fractional quota (Docker's ``nano_cpus``) needs a cgroup."""
    if cpu is None:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    count = min(max(math.ceil(cpu), 1), len(allowed))
    first = port % len(allowed)  # spread instances over the cores instead of all on the first
    return frozenset(allowed[(first + i) % len(allowed)] for i in range(count))


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
        environments: environments.EnvironmentBuilder | None = None,
        data_dir: Path | None = None,
        sandboxed: bool | None = None,
        refuse_pickle: bool = False,
    ) -> None:
        """``admin_token`` maps a deployment name to the token its servers' admin endpoints
        require (deployments/serving_token.py); ``environments`` builds the per-model
        virtual environments (None: every model runs on ``python``, as "shared" does);
        this module stays free of Django.
        ``sandboxed`` (default: whenever this process is root) starts every server in the
        sandbox of sandbox.py, listening on a Unix socket under ``data_dir``/sockets."""
        self.state_dir = Path(state_dir)
        self.owner = owner
        self.code_root = Path(code_root)
        self.admin_token = admin_token
        self.python = python or sys.executable
        self.environments = environments
        self.data_dir = Path(data_dir) if data_dir is not None else self.state_dir.parent
        self.sockets_dir = self.data_dir / "sockets"
        self.sandboxed = sandbox.available() if sandboxed is None else sandboxed
        self.refuse_pickle = refuse_pickle

    def address(self, port: int) -> str:
        """Where the instance given ``port`` answers: its socket when sandboxed."""
        if self.sandboxed:
            return f"unix:{sandbox.socket_path(self.sockets_dir, port)}"
        return f"127.0.0.1:{port}"

    def _log_path(self, instance_name: str) -> Path:
        return self.state_dir / "logs" / f"{instance_name}.log"

    def prepare(self, spec: InstanceSpec, *, progress: Progress | None = None) -> None:
        """Choose the interpreter for the model, building its environment if it needs one."""
        if not Path(spec.model_dir, "MLmodel").exists():
            raise RuntimeError_(f"no MLflow model at {spec.model_dir}")
        self._refuse_untrusted(spec)
        self.interpreter(spec, progress=progress)

    def interpreter(
        self, spec: InstanceSpec, *, progress: Progress | None = None
    ) -> tuple[str, str]:
        """(python executable, environment label) the model's servers run with: the control
        plane's own (label "shared") or a built environment's (label: its key). Builds the
        environment when it is missing (normally done by prepare, before the rollout)."""
        if spec.environment == "shared" or self.environments is None:
            return self.python, "shared"
        resolved = environments.resolve(spec.model_dir)
        if spec.environment == "auto":
            serves, missing = environments.shared_interpreter_serves(resolved)
            if serves:
                if progress:
                    progress(
                        f"environment auto: the control plane's Python {environments.current_python()}"
                        f" has all {len(resolved.requirements)} requirements; no build"
                    )
                return self.python, "shared"
            if progress:
                shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
                progress(f"environment auto: the control plane's Python lacks {shown}")
        built = self.environments.ensure(resolved, progress=progress)
        if progress and not built.built:
            progress(f"environment {built.key[:12]} reused (already built)")
        return str(built.python), built.key

    def _refuse_untrusted(self, spec: InstanceSpec) -> None:
        """CONTROLPLANE_LOCAL_REFUSE_PICKLE: no pickle where nothing sandboxes the server."""
        if self.refuse_pickle and not self.sandboxed:
            found = sandbox.pickle_formats(Path(spec.model_dir))
            if found:
                raise RuntimeError_(
                    "this model loads by unpickling, which runs its code unsandboxed as the "
                    f"control plane's user ({'; '.join(found)}), and "
                    "CONTROLPLANE_LOCAL_REFUSE_PICKLE is set: use the docker runtime or a "
                    "skops/ONNX model"
                )

    def start(self, spec: InstanceSpec) -> InstanceStatus:
        if not Path(spec.model_dir, "MLmodel").exists():
            raise RuntimeError_(f"no MLflow model at {spec.model_dir}")
        python, environment = self.interpreter(spec)
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        env.update(spec.env)
        if spec.predict_method:
            env["SERVING_PREDICT_METHOD"] = spec.predict_method
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
            # "shared" or the key of the environment under <data>/environments it runs from:
            # environments in use by a running server are never cleaned up.
            CONTROLPLANE_ENVIRONMENT=environment,
            # In the environment, not on the command line: /proc/<pid>/environ is readable by
            # this user only, /proc/<pid>/cmdline by everyone.
            SERVING_ADMIN_TOKEN=self.admin_token(spec.deployment),
        )
        argv = [
            python,
            "-m",
            "serving",
            "--model-dir",
            spec.model_dir,
            "--name",
            spec.model_name,
            "--version",
            spec.model_version,
            *self._listen_args(spec),
            "--max-batch-size",
            str(spec.max_batch_size),
            "--max-batch-delay-ms",
            str(spec.max_batch_delay_ms),
        ]
        rlimits, cpus = _memory_rlimits(spec.memory_mb), _cpu_set(spec.cpu, spec.port)
        idle = spec.priority == "idle"
        log_path = self._log_path(spec.instance_name)
        if rlimits or cpus:
            env.update(_limit_labels(rlimits, cpus))
            _log_limits(log_path, rlimits, cpus)
        if idle:
            env["CONTROLPLANE_PRIORITY"] = "idle"
        argv, env = self._confine(spec, argv, env)
        try:
            runtime_id = process.spawn(
                argv,
                env=env,
                log_path=log_path,
                cwd=self.code_root,
                rlimits=rlimits,
                cpus=cpus,
                idle=idle,
            )
        except OSError as exc:
            raise RuntimeError_(f"cannot start the model server: {exc}") from exc
        return InstanceStatus(
            runtime_id=f"{runtime_id}:{spec.instance_name}",
            deployment=spec.deployment,
            revision=spec.revision,
            ordinal=spec.ordinal,
            address=self.address(spec.port) if self.sandboxed else f"{spec.host}:{spec.port}",
            running=True,
        )

    def _listen_args(self, spec: InstanceSpec) -> list[str]:
        if self.sandboxed:
            return ["--unix-socket", str(sandbox.socket_path(self.sockets_dir, spec.port))]
        return ["--host", spec.host, "--port", str(spec.port)]

    def _confine(
        self, spec: InstanceSpec, argv: list[str], env: dict[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """``argv`` wrapped in the sandbox launcher (sandbox.py), when sandboxed."""
        if not self.sandboxed:
            return argv, env
        uid = sandbox.uid_for(spec.port)
        try:
            directory = sandbox.prepare_socket_dir(self.sockets_dir, spec.port, uid=uid, gid=uid)
        except OSError as exc:
            raise RuntimeError_(f"cannot prepare the server's socket directory: {exc}") from exc
        config = sandbox.plan(
            python=argv[0],
            code_root=self.code_root,
            model_dir=Path(spec.model_dir),
            data_dir=self.data_dir,
            socket_dir=directory,
            uid=uid,
            gid=uid,
            cwd=self.code_root,
        )
        env = {
            **env,
            "HOME": "/tmp",
            "TMPDIR": "/tmp",
            "USER": "controlplane-serving",
            "LOGNAME": "controlplane-serving",
            "PYTHONDONTWRITEBYTECODE": "1",
            "CONTROLPLANE_SOCKET": str(sandbox.socket_path(self.sockets_dir, spec.port)),
            "CONTROLPLANE_UID": str(uid),
        }
        return sandbox.wrap(argv, config), env

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
            address=(
                f"unix:{labels['CONTROLPLANE_SOCKET']}"
                if labels.get("CONTROLPLANE_SOCKET")
                else f"127.0.0.1:{labels.get('CONTROLPLANE_PORT', '0')}"
            ),
            running=info.alive,
            exit_code=info.exit_code,
        )

    def list_owned(self) -> list[InstanceStatus]:
        return [
            self._status(f"{p.pid}:{p.starttime}:{p.labels.get('CONTROLPLANE_INSTANCE', '')}", p)
            for p in process.find_labelled(self.owner)
            if "CONTROLPLANE_INSTANCE" in p.labels
        ]

    def logs(self, runtime_id: str, *, tail: int = 100) -> str:
        name = runtime_id.split(":", 2)[2] if runtime_id.count(":") >= 2 else ""
        return self.instance_logs(name, tail=tail)

    def instance_logs(self, instance_name: str, *, tail: int = 100) -> str:
        """The log of an instance by its name (``<deployment>-r<N>-<i>``), whether or not it
        still runs: the log of a failed revision's server outlives the server."""
        if not instance_name or "/" in instance_name or instance_name.startswith("."):
            return ""
        return process.tail(self._log_path(instance_name), tail)

    def environments_in_use(self) -> set[str]:
        """Keys of the environments that running servers of this control plane use."""
        return {
            p.labels["CONTROLPLANE_ENVIRONMENT"]
            for p in process.find_labelled(self.owner)
            if p.labels.get("CONTROLPLANE_ENVIRONMENT", "shared") != "shared"
        }


def _limit_labels(rlimits: dict[int, int], cpus: frozenset[int] | None) -> dict[str, str]:
    """The limits a server runs under, with its other labels (``/proc/<pid>/environ``)."""
    labels = {}
    if resource.RLIMIT_DATA in rlimits:
        labels["CONTROLPLANE_MEMORY_MB"] = str(rlimits[resource.RLIMIT_DATA] // _MIB)
    if cpus:
        labels["CONTROLPLANE_CPUS"] = ",".join(str(c) for c in sorted(cpus))
    return labels


def _log_limits(log_path: Path, rlimits: dict[int, int], cpus: frozenset[int] | None) -> None:
    """A line in the server's log (``GET .../logs``) ahead of its own output, so that a server
    killed by its memory limit at startup is read as such."""
    parts = []
    if resource.RLIMIT_DATA in rlimits:
        parts.append(f"memory {rlimits[resource.RLIMIT_DATA] // _MIB} MB (RLIMIT_DATA)")
    if cpus:
        parts.append(f"CPU cores {','.join(str(c) for c in sorted(cpus))}")
    hint = (
        "; a server that exits at startup on a failed allocation (MemoryError, 'Cannot allocate"
        " memory', OpenBLAS, 'can't start new thread') needs a larger resources.memory_mb"
        if resource.RLIMIT_DATA in rlimits
        else ""
    )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"{stamp} INFO [controlplane] starting under limits: {', '.join(parts)}{hint}\n")
