"""A private model server for one job run: started through the local runtime (the model's
own environment, sandboxed where the control plane can sandbox), talked to over its Unix
socket (or loopback port), stopped after. The job's worker never loads the model itself.

Job servers carry the owner label ``<install id>-jobs``: the deployments' stray sweep (which
lists ``<install id>``) leaves them alone, and ``stop_strays`` here stops those whose job
run is over (a worker killed mid-job leaves its server behind)."""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings

from controlplane.lib import http
from deployments.runtimes import InstanceSpec, RuntimeError_, install_id, process, sandbox
from deployments.runtimes.local import LocalRuntime

from .errors import JobFailed

READY_TIMEOUT = 180.0


def owner_label() -> str:
    return f"{install_id()}-jobs"


@functools.cache
def _runtime(owner: str, data_dir: str) -> LocalRuntime:
    from deployments.runtimes import environment_builder
    from deployments.serving_token import serving_admin_token

    return LocalRuntime(
        state_dir=Path(data_dir) / "jobs" / "instances",
        owner=owner,
        code_root=settings.BASE_DIR,
        admin_token=serving_admin_token,
        environments=environment_builder(data_dir),
        data_dir=Path(data_dir),
        refuse_pickle=settings.CONTROLPLANE_LOCAL_REFUSE_PICKLE,
    )


def job_runtime() -> LocalRuntime:
    return _runtime(owner_label(), str(settings.DATA_DIR))


def _hold_port() -> tuple[int, socket.socket | None]:
    """A port no deployment uses, held by a listening socket while a sandboxed server's
    socket directory is named after it (so no deployment instance is given it meanwhile)."""
    from deployments.services import allocate_port

    for _ in range(20):
        port = allocate_port()
        if not job_runtime().sandboxed:
            return port, None
        sock = socket.socket()
        # As allocate_port probes: a port in TIME_WAIT from an earlier connection is free to
        # listen on (still exclusive: Linux refuses a second listener without SO_REUSEPORT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            sock.close()
            continue
        return port, sock
    raise JobFailed("no free port in CONTROLPLANE_PORT_RANGE for the job's model server")


@contextmanager
def model_server(
    *,
    job_id: int,
    attempt: int,
    model_name: str,
    model_version: str,
    model_dir: Path,
    model_sha256: str,
    max_batch_size: int,
    log,
) -> Iterator[str]:
    """Yield the address (``unix:/...`` or ``127.0.0.1:PORT``) of a ready model server."""
    runtime = job_runtime()
    port, held = _hold_port()
    spec = InstanceSpec(
        deployment=f"job-{job_id}",
        revision=attempt,
        ordinal=0,
        model_name=model_name,
        model_version=model_version,
        model_dir=str(model_dir),
        model_sha256=model_sha256,
        port=port,
        environment=settings.CONTROLPLANE_DEFAULT_ENVIRONMENT,
        max_batch_size=max_batch_size,
        max_batch_delay_ms=0.0,
        # Batch inputs are not monitoring data: keep none of them in the server's log buffer.
        env={"SERVING_LOG_INPUT_SAMPLE": "0", "SERVING_LOG_BUFFER": "1"},
    )
    # A server of an earlier attempt (its worker was killed) goes first.
    stop_strays(keep={(job_id, attempt)}, only_job=job_id)
    runtime_id = None
    try:
        try:
            runtime.prepare(spec, progress=log)
            status = runtime.start(spec)
        except RuntimeError_ as exc:
            raise JobFailed(f"cannot start the model server: {exc}") from None
        runtime_id = status.runtime_id
        log(f"model server {status.address} starting ({model_name} v{model_version})")
        _wait_ready(runtime, runtime_id, status.address)
        yield status.address
    finally:
        if runtime_id is not None:
            runtime.stop(runtime_id, timeout=5)
        if held is not None:
            held.close()
        if runtime.sandboxed:
            sandbox.remove_socket_dir(runtime.sockets_dir, port)


def _wait_ready(runtime: LocalRuntime, runtime_id: str, address: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    url = http.address_url(address, "/ping")
    while time.monotonic() < deadline:
        info = runtime.inspect(runtime_id)
        if info is None or not info.running:
            last = runtime.logs(runtime_id, tail=5).strip().splitlines()
            raise JobFailed(
                "the model server exited while starting" + (f": {last[-1]}" if last else "")
            )
        try:
            if http.request("GET", url, timeout=1.0, raise_for_status=False).status == 200:
                return
        except http.HttpError:
            pass
        time.sleep(0.1)
    raise JobFailed(f"the model server was not ready within {READY_TIMEOUT:.0f}s")


def stop_strays(*, keep: set[tuple[int, int]], only_job: int | None = None) -> int:
    """Stop job servers whose (job id, attempt) is not in ``keep`` (runs still alive), of
    every job or of ``only_job``."""
    stopped = 0
    runtime = job_runtime()
    for proc in process.find_labelled(owner_label()):
        name = proc.labels.get("CONTROLPLANE_DEPLOYMENT", "")
        if not name.startswith("job-"):
            continue
        try:
            key = (int(name[4:]), int(proc.labels.get("CONTROLPLANE_REVISION", "0")))
        except ValueError:
            continue
        if key not in keep and (only_job is None or key[0] == only_job):
            runtime.stop(f"{proc.pid}:{proc.starttime}", timeout=5)
            stopped += 1
    return stopped
