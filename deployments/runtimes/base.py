"""The one interface every runtime implements.

A runtime knows how to start, stop and look at model-server instances on some
substrate (processes on this host, Docker containers). It knows nothing about
deployments, revisions or the database: the reconciler decides *what* should
run and asks a runtime to make it so. Vendor types (docker SDK objects,
``subprocess.Popen``) never leave a runtime module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from serving.config import DEFAULT_MAX_BATCH_SIZE

# Called by a runtime's prepare with one human-readable line per step of a slow preparation
# (what is being installed, how long it took): the reconciler records them as events.
Progress = Callable[[str], None]


class RuntimeError_(Exception):
    """A runtime could not do what it was asked (engine down, image build failed...)."""


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a runtime needs to start one model-server instance."""

    deployment: str  # deployment name (owner label)
    revision: int  # revision number (owner label)
    ordinal: int  # replica index within the revision, 0-based
    model_name: str
    model_version: str
    model_dir: str  # absolute host path of the MLflow model directory (read-only)
    model_sha256: str  # digest of the model files, used in image/instance keys
    port: int  # the port the server must listen on, on 127.0.0.1
    host: str = "127.0.0.1"
    cpu: float | None = None  # CPU limit in cores
    memory_mb: int | None = None  # memory limit
    env: dict[str, str] = field(default_factory=dict)
    prediction_log_dir: str | None = None  # host dir where the server writes its prediction log
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # the model server's own default
    max_batch_delay_ms: float = 2.0
    # "auto" (the control plane's interpreter when it has every requirement, else a built
    # environment), "isolated" (always a built one) or "shared" (the control plane's); see
    # deployments/environments.py. The docker runtime always builds an image.
    environment: str = "shared"
    # The model's method answering predictions by default (SERVING_PREDICT_METHOD), or None.
    predict_method: str | None = None
    gpu: float | None = None  # GPUs (fractional), where the runtime schedules them (ray)
    # Node labels the instance must run on ({"zone": "a"}), where the runtime places (ray).
    placement: dict[str, str] = field(default_factory=dict)
    # "normal", or "idle" for a best-effort instance (a shadow candidate): it gets only the CPU
    # time the serving instances leave (local: SCHED_IDLE; docker: the lowest cpu_shares).
    priority: str = "normal"

    @property
    def instance_name(self) -> str:
        return f"{self.deployment}-r{self.revision}-{self.ordinal}"


@dataclass(frozen=True)
class InstanceStatus:
    """What a runtime observes about one instance it owns."""

    runtime_id: str  # pid for local, container id for docker, actor name@node for ray
    deployment: str
    revision: int
    ordinal: int
    address: str  # "127.0.0.1:PORT" or "unix:/path/to/socket"
    running: bool
    exit_code: int | None = None
    restarts: int = 0


class Runtime(Protocol):
    name: str

    def address(self, port: int) -> str:
        """Where the instance given ``port`` answers (no I/O): ``127.0.0.1:PORT``, or
        ``unix:/path`` where the server has no network of its own."""

    def prepare(self, spec: InstanceSpec, *, progress: Progress | None = None) -> None:
        """Do the slow, cacheable work before a rollout's clock starts (build the image or the
        environment), reporting steps to ``progress``. Idempotent; a no-op where there is
        nothing to prepare. Raises RuntimeError_ with the cause when it cannot be done."""

    def start(self, spec: InstanceSpec) -> InstanceStatus:
        """Start one instance and return at once (readiness is probed by the caller)."""

    def stop(self, runtime_id: str, *, timeout: float = 10.0) -> None:
        """Gracefully stop (SIGTERM, then kill after timeout). Idempotent: unknown ids are ignored."""

    def inspect(self, runtime_id: str) -> InstanceStatus | None:
        """Current state of one instance, or None if it no longer exists."""

    def list_owned(self) -> list[InstanceStatus]:
        """Every instance this control plane owns on this runtime (found by labels / records)."""

    def logs(self, runtime_id: str, *, tail: int = 100) -> str:
        """The last ``tail`` lines of the instance's output."""
