"""The reconciler: level-triggered convergence of what runs on what is desired.

Every pass compares a deployment's desired revision with what its runtime
reports and takes the next steps: start missing instances, restart crashed
ones, probe readiness, switch the stable endpoint once the new revision is
ready several times in a row, then drain and stop the old one. It trusts
neither events nor memory: everything it needs is re-read each pass. A short
lease (compare-and-swap on the deployment row), renewed by a heartbeat while
its reconcile call runs, keeps two workers off the same deployment, and lets
another take over soon after a worker dies; runtime ids recorded before a
start make a crash at any point recoverable (the next pass adopts or sweeps).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, InterfaceError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from audit.services import audit_record

from . import canary, router, scaling, shadow
from .model_files import ensure_model_files
from .models import Deployment, Instance, Revision
from .runtimes import InstanceSpec, RuntimeError_, get_runtime
from .services import allocate_port, deployment_follow_alias, deployment_rollback, event_record

logger = logging.getLogger(__name__)

READY_STREAK = 3  # consecutive successful probes before traffic moves
CRASH_LIMIT = 3  # restarts of a rolling-out revision before it is declared failed
PROBE_TIMEOUT = 1.0
DRAIN_TIMEOUT = 30.0


# A dead worker keeps others off its deployment until its lease runs out, so the lease is
# short and a heartbeat renews it while the reconcile call that took it is alive: long steps
# (an image build, a 30 s drain) keep it, a killed process stops renewing with it.
LEASE_SECONDS = 15.0
# Three renewals per lease: one slow or failed renewal does not hand the deployment over.
HEARTBEAT_SECONDS = 5.0
# A worker alive but stuck (a hung engine call) is not renewed past its budget plus the
# longest one step may take (a first image build, an environment build up to its timeout):
# the deployment is not held forever.
LONGEST_STEP_SECONDS = max(600.0, settings.CONTROLPLANE_ENV_BUILD_TIMEOUT + 60.0)
# The model server's structured fatal error: the last line of its log (serving/).
FATAL_PREFIX = "SERVING-FATAL "


def _acquire(deployment_id: int, owner: str) -> bool:
    now = timezone.now()
    return bool(
        Deployment.objects.filter(pk=deployment_id)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now) | Q(lease_owner=owner))
        .update(lease_until=now + timedelta(seconds=LEASE_SECONDS), lease_owner=owner)
    )


def _renew(deployment_id: int, owner: str) -> bool:
    # Only while ``owner`` still holds it: a released lease, or one another worker took
    # after it ran out, is never taken back.
    return bool(
        Deployment.objects.filter(pk=deployment_id, lease_owner=owner).update(
            lease_until=timezone.now() + timedelta(seconds=LEASE_SECONDS)
        )
    )


def _release(deployment_id: int, owner: str) -> None:
    Deployment.objects.filter(pk=deployment_id, lease_owner=owner).update(
        lease_until=None, lease_owner=""
    )


class _Heartbeat:
    """Renews ``owner``'s lease every HEARTBEAT_SECONDS until ``until`` (monotonic) from a
    daemon thread with its own database connection (the reconcile call's may be busy for
    minutes in one step). ``lost`` is set once the lease is no longer ``owner``'s."""

    def __init__(self, deployment_id: int, owner: str, *, until: float) -> None:
        self.deployment_id, self.owner, self.until = deployment_id, owner, until
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{deployment_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                if time.monotonic() > self.until:
                    logger.warning(
                        "deployment %s: reconcile stuck, its lease lapses", self.deployment_id
                    )
                    return
                try:
                    held = _renew(self.deployment_id, self.owner)
                except (DatabaseError, InterfaceError) as exc:
                    # A database restart: try again on a new connection; the lease may lapse.
                    logger.warning(
                        "renewing the lease of deployment %s: %s", self.deployment_id, exc
                    )
                    connection.close()
                    continue
                if not held:
                    self.lost.set()
                    return
        finally:
            connection.close()  # this thread's connection, not the reconcile call's


def reconcile(deployment_id: int, *, budget: float = 20.0) -> bool | None:
    """Converge one deployment for up to ``budget`` seconds. True if converged, False if
    not yet, None if another worker holds its lease (that worker is on it)."""
    owner = uuid.uuid4().hex
    if not _acquire(deployment_id, owner):
        return None
    deadline = time.monotonic() + budget
    heartbeat = None
    # Inside a caller's transaction (tests) the lease is seen by no other connection until
    # it commits: a heartbeat could not renew it, only wait on the caller's locks.
    if not connection.in_atomic_block:
        heartbeat = _Heartbeat(deployment_id, owner, until=deadline + LONGEST_STEP_SECONDS)
        heartbeat.start()
    try:
        while True:
            done = _pass(deployment_id)
            if done or time.monotonic() > deadline:
                return done
            if heartbeat and heartbeat.lost.is_set():
                return None  # it ran out (a stalled database) and another worker took over
            time.sleep(0.1)
    finally:
        if heartbeat:
            heartbeat.stop()
        _release(deployment_id, owner)


def _set(d: Deployment, **fields) -> None:
    changed = {k: v for k, v in fields.items() if getattr(d, k) != v}
    if "phase" in changed:
        changed["phase_started_at"] = timezone.now() if changed["phase"] else None
    if changed:
        Deployment.objects.filter(pk=d.pk).update(**changed)
        for key, value in changed.items():
            setattr(d, key, value)


def _stop_instance(inst: Instance, *, timeout: float = DRAIN_TIMEOUT) -> None:
    if inst.runtime_id:
        try:
            get_runtime(inst.runtime).stop(inst.runtime_id, timeout=timeout)
        except RuntimeError_ as exc:
            logger.warning("stopping %s failed: %s", inst, exc)
            return
    inst.delete()


def _pass(deployment_id: int) -> bool:
    d = Deployment.objects.select_related("model").filter(pk=deployment_id).first()
    if d is None:
        return True
    if d.deleted or d.stopped:
        return _shut_down(d)
    d = deployment_follow_alias(deployment_id=d.pk) or d
    desired = Revision.objects.select_related("model_version__model").get(pk=d.desired_revision_id)
    serving = Revision.objects.filter(pk=d.serving_revision_id).first()

    _ensure_router(d, serving)
    if desired.state == Revision.State.FAILED:
        _set(
            d,
            status=Deployment.Status.FAILED if serving is None else Deployment.Status.DEGRADED,
            phase="",
            status_message=desired.failure,
        )
        return True
    if not desired.model_dir:
        _set(d, phase="fetching model files")
        try:
            model_dir, sha = ensure_model_files(
                desired.model_version.model.name, desired.model_version.version
            )
        except Exception as exc:  # MLflow down or files gone: retried next pass
            logger.warning("model files for %s: %s", desired, exc)
            _set(d, status_message=f"cannot fetch model files: {exc}")
            return False
        Revision.objects.filter(pk=desired.pk).update(model_dir=str(model_dir), model_sha256=sha)
        desired.model_dir, desired.model_sha256 = str(model_dir), sha
    if desired.state == Revision.State.PENDING:
        # Slow, cached preparation (an image or environment build) happens before the clock
        # starts. A failure is final for this revision: a build that failed fails again.
        runtime_name = desired.spec.get("runtime", d.runtime)
        _set(d, phase=PREPARE_PHASES.get(runtime_name, "preparing environment"))
        started = time.monotonic()

        def progress(message: str) -> None:
            event_record(d, "environment", message, desired)

        try:
            get_runtime(runtime_name).prepare(_spec(d, desired, 0, 0), progress=progress)
        except RuntimeError_ as exc:
            seconds = time.monotonic() - started
            _fail_revision(
                d,
                desired,
                serving,
                f"cannot prepare r{desired.number} (after {seconds:.1f} s): {exc}",
            )
            return False
        Revision.objects.filter(pk=desired.pk).update(
            state=Revision.State.ROLLING_OUT, rollout_started_at=timezone.now()
        )
        desired.state, desired.rollout_started_at = Revision.State.ROLLING_OUT, timezone.now()
        event_record(d, "rollout", f"rolling out r{desired.number}", desired)

    instances = list(Instance.objects.filter(deployment=d).select_related("revision"))
    for inst in instances:
        _observe(d, inst, live=inst.revision_id == d.serving_revision_id)
    wanted = [i for i in instances if i.revision_id == desired.pk and i.pk]
    replicas = scaling.replicas_for(d, desired)
    surplus = [i for i in wanted if i.ordinal >= replicas]
    if surplus and desired.pk == d.serving_revision_id:
        # Scaling down: out of the router first, then stopped, so no request is sent to a
        # stopping instance.
        rest = [i for i in wanted if i.ordinal < replicas]
        hold = scaling.hold_for(d)
        keep = [i.address for i in rest if i.state == Instance.State.READY] or (
            [] if hold else [i.address for i in rest]
        )
        if _write_backends(d, keep):
            router.routes_to(d.port, keep, host=d.router_host)
        for inst in surplus:
            _stop_instance(inst, timeout=5)
    wanted = [i for i in wanted if i.ordinal < replicas and i.pk]
    have = {i.ordinal for i in wanted}
    for ordinal in range(replicas):
        if ordinal not in have:
            _set(d, phase="starting instances")
            inst = _start_instance(d, desired, ordinal)
            if inst is not None:
                wanted.append(inst)

    if desired.state == Revision.State.ROLLING_OUT:
        crashes = sum(i.restarts for i in wanted)
        started = desired.rollout_started_at or timezone.now()
        overdue = timezone.now() - started > timedelta(
            seconds=d.progress_deadline_s
        ) and not canary.bake_overdue_exempt(desired)
        if crashes >= CRASH_LIMIT or overdue:
            why = (
                f"r{desired.number} crash-looped ({crashes} restarts)"
                if crashes >= CRASH_LIMIT
                else f"r{desired.number} not ready within its progress deadline ({d.progress_deadline_s}s)"
            )
            last_error = next((i.last_error for i in wanted if i.last_error), "")
            if last_error:
                why += f"; last: {last_error}"
            _fail_revision(d, desired, serving, why)
            return False

    ready = [i for i in wanted if i.state == Instance.State.READY]
    if serving is not None and serving.pk == desired.pk:
        # Steady state: route to the ready instances (all, if none is ready).
        # Routing to instances not ready yet beats no route at all, unless the router can
        # hold requests until one is (a deployment scaled from zero).
        hold = scaling.hold_for(d)
        live = ready or ([] if hold else wanted)
        shadow_done = shadow.shadow_converge(d)
        if _write_backends(d, [i.address for i in live]):
            router.routes_to(d.port, [i.address for i in live], host=d.router_host)
        shadow.shadow_confirm(d)
        _drain_others(d, desired)
        shadow.shadow_collect(d)
        healthy = len(ready) == replicas and shadow_done
        _set(
            d,
            status=Deployment.Status.READY if healthy else Deployment.Status.DEGRADED,
            phase="",
            status_message=scaling.status_note(d, replicas)
            if healthy
            else f"{len(ready)}/{replicas} instances ready",
        )
        return healthy

    stepped = canary.drive(d, desired, serving, wanted, ready, replicas)
    if stepped is not None:
        return stepped
    if len(ready) < replicas:
        _set(
            d,
            status=Deployment.Status.DEPLOYING,
            phase="waiting for readiness",
            status_message=f"{len(ready)}/{replicas} instances ready",
        )
        return False

    # All new instances ready several times in a row: move traffic, then drain.
    _set(d, phase="switching traffic")
    _write_backends(d, [i.address for i in ready])
    if not router.routes_to(d.port, [i.address for i in ready], host=d.router_host):
        _set(d, status_message="router has not picked up the new backends yet")
        return False
    with transaction.atomic():
        if serving is not None:
            Revision.objects.filter(pk=serving.pk, state=Revision.State.LIVE).update(
                state=Revision.State.SUPERSEDED, superseded_at=timezone.now()
            )
        Revision.objects.filter(pk=desired.pk).update(
            state=Revision.State.LIVE, live_at=timezone.now(), failure=""
        )
        Deployment.objects.filter(pk=d.pk).update(serving_revision=desired)
        d.serving_revision_id = desired.pk
        event_record(
            d,
            "traffic",
            f"traffic moved to r{desired.number}" + (f" from r{serving.number}" if serving else ""),
            desired,
        )
    _set(d, phase="draining")
    _drain_others(d, desired)
    _set(d, status=Deployment.Status.READY, phase="", status_message="")
    return True


def _standby(d: Deployment, keep: Revision) -> Revision | None:
    """The revision that served just before ``keep``, while inside the rollback window:
    its instances stay running (out of the router) so a rollback is a traffic switch."""
    window = settings.CONTROLPLANE_ROLLBACK_WINDOW
    if window <= 0:
        return None
    return (
        Revision.objects.filter(
            deployment=d,
            state=Revision.State.SUPERSEDED,
            superseded_at__gt=timezone.now() - timedelta(seconds=window),
        )
        .exclude(pk=keep.pk)
        .order_by("-superseded_at")
        .first()
    )


def _drain_others(d: Deployment, keep: Revision) -> None:
    """Stop the instances of every revision but ``keep`` and the warm standby.
    They get no traffic already; SIGTERM lets in-flight requests finish."""
    standby = _standby(d, keep)
    old = list(
        Instance.objects.filter(deployment=d)
        .exclude(revision=keep)
        .exclude(revision=standby)
        .exclude(revision__in=shadow.shadow_revision_ids(d))
        .select_related("revision")
    )
    for inst in old:
        _stop_instance(inst)
    if old:
        event_record(d, "drained", f"stopped {len(old)} instance(s) of earlier revisions")


PREPARE_PHASES = {
    "local": "preparing environment",
    "docker": "building image",
    "ray": "checking the Ray cluster",
}


def fatal_record(log: str) -> dict | None:
    """The model server's structured fatal error (``SERVING-FATAL {json}``, its last record:
    type, message, phase), or None when the log has none."""
    for line in reversed(log.splitlines()):
        start = line.find(FATAL_PREFIX)
        if start == -1:
            continue
        try:
            record = json.loads(line[start + len(FATAL_PREFIX) :])
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("type"):
            return record
    return None


def exit_cause(log: str) -> str:
    """Why a server exited, as its log says: its fatal record ("ModuleNotFoundError: No
    module named 'xgboost'"), else its last line (an exception, usually)."""
    record = fatal_record(log)
    if record is not None:
        message = str(record.get("message") or "").strip()
        cause = f"{record['type']}: {message}" if message else str(record["type"])
        if record.get("phase"):
            cause += f" (during {record['phase']})"
        return cause[:1000]
    lines = [line.strip() for line in log.splitlines()]
    return next((line for line in reversed(lines) if line), "")[:300]


def _last_log_line(runtime, runtime_id: str) -> str:
    """What a crashed server said last (its fatal record, else its last line): what a user
    needs to see in the crash event and the failed revision's reason."""
    try:
        return exit_cause(runtime.logs(runtime_id, tail=50))
    except RuntimeError_:
        return ""


def _observe(d: Deployment, inst: Instance, *, live: bool) -> None:
    """Refresh one instance: crashed → restart; running → probe."""
    runtime = get_runtime(inst.runtime)
    if not inst.runtime_id:
        # Recorded without an id: a worker died before the start, or between starting the
        # process and saving its id. Adopt what runs under its labels, else start it now.
        try:
            found = _find_started(runtime, d, inst)
        except RuntimeError_ as exc:
            logger.warning("looking for %s: %s", inst, exc)
            return
        if found is None:
            _launch(d, inst)
            return
        inst.runtime_id = found
        inst.save(update_fields=["runtime_id"])
    try:
        status = runtime.inspect(inst.runtime_id)
    except RuntimeError_ as exc:
        logger.warning("inspect %s: %s", inst, exc)
        return
    if status is None or not status.running:
        inst.restarts += 1
        inst.state = Instance.State.CRASHED
        inst.healthy_streak = 0
        code = None if status is None else status.exit_code
        # The exit code is known to the worker that started the process (its parent) only.
        inst.last_error = "exited" if code is None else f"exited with {code}"
        last_words = _last_log_line(runtime, inst.runtime_id)
        if last_words:
            inst.last_error = f"{inst.last_error}: {last_words}"
        name = f"{d.name}-r{inst.revision.number}-{inst.ordinal}"
        inst.last_error = f"{inst.last_error[:1400]} (log: {name})"
        inst.save(update_fields=["restarts", "state", "healthy_streak", "last_error"])
        event_record(d, "crash", f"instance {inst} {inst.last_error}; restarting", inst.revision)
        try:
            runtime.stop(inst.runtime_id, timeout=1)
        except RuntimeError_:
            pass
        _launch(d, inst)
        return
    ok = router.ping(inst.address, timeout=PROBE_TIMEOUT)
    if ok:
        inst.healthy_streak = min(inst.healthy_streak + 1, 100)
        if inst.healthy_streak >= READY_STREAK:
            inst.state = Instance.State.READY
    else:
        inst.healthy_streak = 0
        if inst.state == Instance.State.READY:
            inst.state = Instance.State.UNHEALTHY
    inst.last_probe_at = timezone.now()
    inst.save(update_fields=["healthy_streak", "state", "last_probe_at"])


def _find_started(runtime, d: Deployment, inst: Instance) -> str | None:
    """The id of what runs for ``inst`` by its labels; extra copies are stopped."""
    key = (d.name, inst.revision.number, inst.ordinal)
    found = sorted(
        (s for s in runtime.list_owned() if (s.deployment, s.revision, s.ordinal) == key),
        key=lambda s: not s.running,
    )
    for extra in found[1:]:
        runtime.stop(extra.runtime_id, timeout=5)
    return found[0].runtime_id if found else None


def _spec(d: Deployment, revision: Revision, ordinal: int, port: int) -> InstanceSpec:
    spec = revision.spec
    return InstanceSpec(
        deployment=d.name,
        revision=revision.number,
        ordinal=ordinal,
        model_name=revision.model_version.model.name,
        model_version=str(revision.model_version.version),
        model_dir=revision.model_dir,
        model_sha256=revision.model_sha256,
        port=port,
        cpu=spec.get("cpu"),
        memory_mb=spec.get("memory_mb"),
        env=spec.get("env") or {},
        # Revisions from before environments existed ran on the control plane's interpreter.
        environment=spec.get("environment", "shared"),
        predict_method=spec.get("predict_method"),
        gpu=spec.get("gpu"),
        placement=spec.get("placement") or {},
        priority=spec.get("priority", "normal"),
    )


def _start_instance(d: Deployment, revision: Revision, ordinal: int) -> Instance | None:
    # The row (with its port) is written before the process starts, so a
    # crash in between leaves a record the next pass completes, never a stray.
    for _ in range(5):
        try:
            inst = Instance.objects.create(
                deployment=d,
                revision=revision,
                ordinal=ordinal,
                runtime=revision.spec.get("runtime", d.runtime),
                runtime_id="",
                port=allocate_port(),
            )
            break
        except Exception as exc:  # port or ordinal taken concurrently
            logger.info("instance row for %s#%s: %s", revision, ordinal, exc)
            if Instance.objects.filter(revision=revision, ordinal=ordinal).exists():
                return None
    else:
        return None
    _launch(d, inst)
    return inst


def _launch(d: Deployment, inst: Instance) -> None:
    revision = Revision.objects.select_related("model_version__model").get(pk=inst.revision_id)
    if not revision.model_dir:
        return
    if inst.runtime_id:
        # Forget the old process first: should this worker die while starting the new one,
        # the next pass adopts it by its labels instead of starting another.
        inst.runtime_id = ""
        inst.save(update_fields=["runtime_id"])
    try:
        status = get_runtime(inst.runtime).start(_spec(d, revision, inst.ordinal, inst.port))
    except RuntimeError_ as exc:
        inst.state = Instance.State.CRASHED
        inst.restarts += 1
        inst.last_error = str(exc)[:2000]
        inst.save(update_fields=["state", "restarts", "last_error"])
        event_record(d, "error", f"cannot start {inst}: {exc}", revision)
        return
    inst.runtime_id = status.runtime_id
    inst.state = Instance.State.STARTING
    inst.healthy_streak = 0
    inst.save(update_fields=["runtime_id", "state", "healthy_streak"])


def _fail_revision(d: Deployment, revision: Revision, serving: Revision | None, why: str) -> None:
    Revision.objects.filter(pk=revision.pk).update(state=Revision.State.FAILED, failure=why)
    event_record(d, "failed", why, revision)
    for inst in Instance.objects.filter(deployment=d, revision=revision):
        _stop_instance(inst, timeout=2)
    target = serving if serving is not None and serving.pk != revision.pk else None
    if target is None:
        with transaction.atomic():
            _set(d, status=Deployment.Status.FAILED, phase="", status_message=why)
            audit_record(
                actor=None,
                action="deployment.failed",
                object_type="deployment",
                object_id=d.name,
                object_repr=d.name,
                after={"revision": revision.number, "reason": why},
                system="reconciler",
            )
        return
    deployment_rollback(
        deployment=d, revision=target.number, actor=None, reason=why, automatic=True
    )


def _write_backends(d: Deployment, addresses: list[str]) -> bool:
    """The one writer of a deployment's router file: the primary backends plus every
    optional key of the router contract that is in force (hold, mirror)."""
    return router.write_deployment(d, addresses)


def _ensure_router(d: Deployment, serving: Revision | None) -> None:
    """The router runs: where it runs now, else started (or adopted) where placement says:
    an ingress node of the Ray cluster for a ray deployment, else this host."""
    if router.is_running(d.router_pid, name=d.name):
        return
    if serving is not None:
        ready = Instance.objects.filter(deployment=d, revision=serving)
        _write_backends(d, [i.address for i in ready])
    runtime_id = router.start_for(d)
    _set(d, router_pid=runtime_id)
    where = "on an ingress node of the Ray cluster" if router.on_ray(runtime_id) else "on this host"
    event_record(d, "router", f"endpoint {d.endpoint} started {where}")


def _shut_down(d: Deployment) -> bool:
    _set(d, phase="stopping")
    for inst in Instance.objects.filter(deployment=d):
        _stop_instance(inst, timeout=10)
    if d.router_pid:
        router.stop(d.router_pid, name=d.name)
    if d.deleted:
        with transaction.atomic():
            Deployment.objects.filter(pk=d.pk).update(desired_revision=None, serving_revision=None)
            d.delete()
        return True
    Revision.objects.filter(pk=d.serving_revision_id, state=Revision.State.LIVE).update(
        state=Revision.State.SUPERSEDED, superseded_at=None
    )  # stopped: nothing kept warm
    _set(
        d,
        status=Deployment.Status.STOPPED,
        phase="",
        router_pid="",
        serving_revision=None,
        status_message="",
    )
    return True


def sweep_strays() -> int:
    """Stop processes/containers we own that no instance record names (left by a
    crash, or by a deployment deleted while the worker was down), and second copies
    of a recorded instance (the record's runtime id says which one is kept).

    What runs is listed *before* the records are read: an instance's row is
    written before it starts, so anything listed has its row by then.
    """
    from .runtimes import RUNTIMES

    stopped = 0
    owned = []
    for name in RUNTIMES:
        try:
            runtime = get_runtime(name)
            owned.append((runtime, runtime.list_owned()))
        except Exception as exc:  # docker engine absent: nothing of ours runs there
            logger.debug("runtime %s unavailable for the sweep: %s", name, exc)
    routers = router.owned_routers()
    ray_routers = router.ray_routers()
    recorded_ids = {
        (i.deployment.name, i.revision.number, i.ordinal): i.runtime_id
        for i in Instance.objects.select_related("deployment", "revision")
    }
    for runtime, statuses in owned:
        for status in statuses:
            key = (status.deployment, status.revision, status.ordinal)
            # A second copy under a record's labels (started twice around a crash) is a stray
            # too. A record without an id is left alone: its pass adopts one copy, stops the rest.
            if key not in recorded_ids or recorded_ids[key] not in ("", status.runtime_id):
                logger.info("stopping stray %s on %s", status.runtime_id, runtime.name)
                runtime.stop(status.runtime_id, timeout=10)
                stopped += 1
    recorded = dict(
        Deployment.objects.filter(deleted=False, stopped=False).values_list("name", "router_pid")
    )
    for proc in routers:
        name = proc.labels.get("CONTROLPLANE_ROUTER")
        current = recorded.get(name)
        this = f"{proc.pid}:{proc.starttime}"
        duplicate = current and current != this and router.is_running(current, name=name)
        if name not in recorded or duplicate:
            router.stop(this)
            stopped += 1
    for name in ray_routers:
        # A router actor whose deployment is gone, or whose deployment's router runs on this
        # host (its record says so): stopped. One being started (no id yet) is left alone.
        current = recorded.get(name)
        on_host = current and not router.on_ray(current) and router.is_running(current)
        if name not in recorded or on_host:
            logger.info("stopping stray router actor of %s", name)
            router.stop_actor(name)
            stopped += 1
    return stopped


def environments_in_use() -> set[str]:
    """Keys of the local environments some revision may run on now: those of the desired and
    serving revisions of every deployment, of revisions with instances (a warm standby), and
    of what running servers were started from (their labels)."""
    from . import environments
    from .runtimes import get_runtime

    runtime = get_runtime("local")
    keys = set(runtime.environments_in_use())
    revisions = (
        Revision.objects.filter(
            Q(pk__in=Deployment.objects.values("desired_revision"))
            | Q(pk__in=Deployment.objects.values("serving_revision"))
            | Q(pk__in=Instance.objects.values("revision"))
        )
        .exclude(model_dir="")
        .only("model_dir", "spec")
    )
    for revision in revisions:
        if revision.spec.get("runtime") != "local":
            continue
        if revision.spec.get("environment", "shared") == "shared":
            continue
        try:
            keys.add(environments.resolve(revision.model_dir).key)
        except RuntimeError_:
            continue  # unresolvable: nothing was built for it
    return keys


def cleanup_environments() -> list[str]:
    """Remove environments unused by any revision and unused for the retention period."""
    from .runtimes import environment_builder

    builder = environment_builder(str(settings.DATA_DIR))
    removed = builder.cleanup(
        keep=environments_in_use(),
        retention_seconds=settings.CONTROLPLANE_ENV_RETENTION_DAYS * 86400,
    )
    if removed:
        logger.info("removed %d unused environment(s): %s", len(removed), ", ".join(removed))
    return removed


def cleanup_docker_images() -> list[str]:
    """Remove the serving images no container has used for the retention period
    (CONTROLPLANE_DOCKER_IMAGE_RETENTION_DAYS); nothing when no Docker engine answers."""
    from .runtimes import get_runtime

    try:
        runtime = get_runtime("docker")
        return runtime.prune_unused_images(
            retention_seconds=settings.CONTROLPLANE_DOCKER_IMAGE_RETENTION_DAYS * 86400
        )
    except RuntimeError_ as exc:
        logger.info("docker image cleanup skipped: %s", exc)
        return []
