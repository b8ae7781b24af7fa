"""Shadow traffic: a candidate revision that serves no caller, to which the router mirrors a
sampled fraction of live prediction requests (serving/mirror.py).

Writes (services, audited): ``shadow_start``, ``shadow_stop``, ``shadow_promote``. The desired
state is the active ``ShadowRun`` row; the reconciler calls ``shadow_converge`` every steady
pass (prepare the candidate, start its instances, wait until they are READY, then the mirror
key goes into the router's backends file through ``shadow_mirror_key``) and
``shadow_collect``, which pulls the request pairs the router buffered into ``ShadowPair`` rows.
The report (``deployments/shadow_report.py``) compares the two answers of each pair.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from audit.services import audit_record
from controlplane.lib import http
from controlplane.lib.errors import ApplicationError, Conflict, NotFound

from .models import Deployment, Instance, Revision, ShadowPair, ShadowRun
from .services import _kick, _locked, _resolve_target, _spec_snapshot, event_record

logger = logging.getLogger(__name__)

MIRROR_QUEUE = 256
PULL_LIMIT = 2000
PULL_PAGES = 10  # per collect call: at most PULL_LIMIT × PULL_PAGES pairs
MAX_PAIRS_PER_RUN = 50_000  # older pairs are deleted beyond this


def shadow_active(deployment: Deployment) -> ShadowRun | None:
    return (
        ShadowRun.objects.select_related("revision__model_version")
        .filter(deployment=deployment, state=ShadowRun.State.ACTIVE)
        .first()
    )


def _parse_fraction(fraction: Any) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ApplicationError(
            "shadow.fraction must be a number greater than 0 and at most 1",
            code="invalid_shadow_fraction",
        )
    if not 0.0 < float(fraction) <= 1.0:
        raise ApplicationError(
            "shadow.fraction must be greater than 0 and at most 1", code="invalid_shadow_fraction"
        )
    return float(fraction)


def _snapshot(run: ShadowRun | None) -> dict | None:
    if run is None:
        return None
    return {
        "version": str(run.revision.model_version.version),
        "revision": run.revision.number,
        "fraction": run.fraction,
        "state": run.state,
    }


@transaction.atomic
def shadow_start(
    *, deployment: Deployment, version: Any, fraction: Any, actor: AbstractBaseUser
) -> ShadowRun:
    """Mirror ``fraction`` of the live prediction requests to ``version``. An active shadow of
    the same version only changes its fraction; one of another version is replaced."""
    d = _locked(deployment)
    if version in (None, ""):
        raise ApplicationError("shadow.version is required", code="invalid_shadow")
    text = str(version)
    if (
        isinstance(version, bool)
        or not isinstance(version, str | int)
        or not (text.isdigit() and 0 < int(text) < 2**31)
    ):
        raise ApplicationError(
            f"shadow.version {text[:30]!r} is not a version number", code="invalid_version"
        )
    fraction = _parse_fraction(fraction)
    if d.stopped:
        raise Conflict("the deployment is stopped: start it first", code="deployment_stopped")
    if d.desired_revision_id is None:
        raise Conflict("the deployment has no revision yet", code="no_revision")
    try:
        mv, _number, _alias = _resolve_target(d.model, version, None)
    except NotFound as exc:  # the deployment exists; what the body names does not
        raise ApplicationError(exc.message, code=exc.code) from None
    current = shadow_active(d)
    before = _snapshot(current)
    if current is not None and current.revision.model_version_id == mv.pk:
        if current.fraction == fraction:
            return current
        ShadowRun.objects.filter(pk=current.pk).update(fraction=fraction)
        current.fraction = fraction
        event_record(
            d,
            "shadow",
            f"shadow r{current.revision.number}: fraction {fraction:g}",
            current.revision,
        )
        run = current
    else:
        if current is not None:
            _end(current, ShadowRun.State.STOPPED)
        number = (d.revisions.aggregate(n=Max("number"))["n"] or 0) + 1
        revision = Revision.objects.create(
            deployment=d,
            number=number,
            model_version=mv,
            spec=_shadow_spec(d),
            reason=f"shadow: {mv.model.name} v{mv.version} at {fraction:g}",
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        run = ShadowRun.objects.create(
            deployment=d,
            revision=revision,
            fraction=fraction,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        event_record(
            d,
            "shadow",
            f"shadow r{number}: {mv.model.name} v{mv.version} gets {fraction:g} of the requests "
            "(mirrored; callers get the primary's answers)",
            revision,
        )
    audit_record(
        actor=actor,
        action="deployment.shadow_start",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before={"shadow": before},
        after={"shadow": _snapshot(run)},
    )
    _kick(d)
    return run


def _shadow_spec(d: Deployment) -> dict:
    """The deployment's spec, at idle CPU priority unless CONTROLPLANE_SHADOW_IDLE_PRIORITY is
    off. Such a revision differs from the deployment's spec, so promoting it rolls out a fresh
    revision at normal priority (a running process cannot be raised back without privileges)."""
    spec = _spec_snapshot(d)
    if settings.CONTROLPLANE_SHADOW_IDLE_PRIORITY:
        spec["priority"] = "idle"
    return spec


def _end(run: ShadowRun, state: str) -> None:
    ShadowRun.objects.filter(pk=run.pk, state=ShadowRun.State.ACTIVE).update(
        state=state, ended_at=timezone.now()
    )
    run.state = state


@transaction.atomic
def shadow_stop(
    *, deployment: Deployment, actor: AbstractBaseUser | None, reason: str = ""
) -> ShadowRun | None:
    """Stop mirroring; the reconciler removes the mirror key and stops the candidate."""
    d = _locked(deployment)
    run = shadow_active(d)
    if run is None:
        return None
    before = _snapshot(run)
    _end(run, ShadowRun.State.STOPPED)
    why = reason or (f"by {actor.get_username()}" if actor else "")
    event_record(d, "shadow", f"shadow r{run.revision.number} stopped {why}".strip(), run.revision)
    audit_record(
        actor=actor,
        action="deployment.shadow_stop",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before={"shadow": before},
        after={"shadow": None, "reason": why},
        system=None if actor else "reconciler",
    )
    _kick(d)
    return run


@transaction.atomic
def shadow_promote(*, deployment: Deployment, actor: AbstractBaseUser) -> Deployment:
    """Make the shadow's version the primary through the normal rollout. A shadow at idle CPU
    priority (the default) becomes a fresh revision of its version, started at normal
    priority; one at normal priority (CONTROLPLANE_SHADOW_IDLE_PRIORITY off) becomes the
    desired revision itself (its instances are running and ready, so the switch is quick).
    The reconciler moves traffic the usual way, once every instance passes its probes."""
    from .services import _deployment_snapshot

    d = _locked(deployment)
    run = shadow_active(d)
    if run is None:
        raise Conflict("this deployment has no active shadow", code="no_shadow")
    revision = run.revision
    if revision.state == Revision.State.FAILED:
        raise Conflict(f"the shadow r{revision.number} failed", code="shadow_failed")
    if d.target_alias:
        raise Conflict(
            f"{d.name} follows the alias {d.target_alias!r}: move the alias to "
            f"v{revision.model_version.version} instead",
            code="follows_alias",
        )
    if revision.model_version.status != revision.model_version.Status.READY:
        raise Conflict(f"{revision.model_version} is archived", code="version_archived")
    before = _deployment_snapshot(d)
    _end(run, ShadowRun.State.PROMOTED)
    if revision.spec != _spec_snapshot(d):
        # The deployment's spec changed since the shadow started, or the shadow's servers run
        # at idle CPU priority (_shadow_spec): roll out a fresh revision of the shadow's
        # version with today's spec instead.
        from .services import _new_revision

        _new_revision(
            d, revision.model_version, reason=f"promote shadow r{revision.number}", actor=actor
        )
    else:
        d.desired_revision = revision
        d.status = Deployment.Status.DEPLOYING
        # The rollout clock (progress deadline) starts now, not when the shadow started.
        Revision.objects.filter(pk=revision.pk).update(
            state=Revision.State.ROLLING_OUT, rollout_started_at=timezone.now(), failure=""
        )
    d.target_version = revision.model_version.version
    d.save()
    event_record(
        d,
        "shadow",
        f"shadow r{revision.number} promoted by {actor.get_username()}: rolling out",
        revision,
    )
    audit_record(
        actor=actor,
        action="deployment.shadow_promote",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before={**before, "shadow": _snapshot(run)},
        after=_deployment_snapshot(d),
    )
    _kick(d)
    return d


# --- the reconciler's side ---------------------------------------------------------------


def shadow_mirror_key(d: Deployment) -> dict | None:
    """The router's ``mirror`` key: the active shadow's READY instances, else None."""
    run = shadow_active(d)
    if run is None or run.revision_id == d.desired_revision_id:
        return None
    ready = [
        i.address
        for i in Instance.objects.filter(
            revision_id=run.revision_id, state=Instance.State.READY
        ).order_by("ordinal")
    ]
    if not ready:
        return None
    return {
        "name": f"r{run.revision.number}",
        "revision": run.revision.number,
        "fraction": run.fraction,
        "backends": ready,
        "queue": MIRROR_QUEUE,
    }


def shadow_revision_ids(d: Deployment) -> list[int]:
    """Revisions whose instances the reconciler must keep running (not drain)."""
    return list(
        ShadowRun.objects.filter(deployment=d, state=ShadowRun.State.ACTIVE).values_list(
            "revision_id", flat=True
        )
    )


def _fail(d: Deployment, run: ShadowRun, why: str) -> None:
    from . import reconciler

    Revision.objects.filter(pk=run.revision_id).update(state=Revision.State.FAILED, failure=why)
    with transaction.atomic():
        _end(run, ShadowRun.State.STOPPED)
        event_record(d, "shadow", f"shadow stopped: {why}", run.revision)
        audit_record(
            actor=None,
            action="deployment.shadow_failed",
            object_type="deployment",
            object_id=d.name,
            object_repr=d.name,
            after={"revision": run.revision.number, "reason": why},
            system="reconciler",
        )
    for inst in Instance.objects.filter(revision_id=run.revision_id):
        reconciler._stop_instance(inst, timeout=2)


def shadow_converge(d: Deployment) -> bool:
    """One step towards the active shadow's instances all READY; True once they are (or
    when there is no shadow). Failures stop the shadow, never touch the primary."""
    from . import reconciler
    from .model_files import ensure_model_files
    from .runtimes import RuntimeError_, get_runtime

    run = shadow_active(d)
    if run is None or run.revision_id == d.desired_revision_id:
        return True
    revision = Revision.objects.select_related("model_version__model").get(pk=run.revision_id)
    if revision.state == Revision.State.FAILED:
        _fail(d, run, revision.failure or "the shadow revision failed")
        return True
    if not revision.model_dir:
        try:
            model_dir, sha = ensure_model_files(
                revision.model_version.model.name, revision.model_version.version
            )
        except Exception as exc:  # MLflow down: retried next pass
            logger.warning("model files for shadow %s: %s", revision, exc)
            return False
        Revision.objects.filter(pk=revision.pk).update(model_dir=str(model_dir), model_sha256=sha)
        revision.model_dir, revision.model_sha256 = str(model_dir), sha
    if revision.state == Revision.State.PENDING:
        runtime_name = revision.spec.get("runtime", d.runtime)
        try:
            get_runtime(runtime_name).prepare(
                reconciler._spec(d, revision, 0, 0),
                progress=lambda message: event_record(d, "environment", message, revision),
            )
        except RuntimeError_ as exc:
            _fail(d, run, f"cannot prepare the shadow r{revision.number}: {exc}")
            return True
        now = timezone.now()
        Revision.objects.filter(pk=revision.pk).update(
            state=Revision.State.ROLLING_OUT, rollout_started_at=now
        )
        revision.state, revision.rollout_started_at = Revision.State.ROLLING_OUT, now
    replicas = revision.spec.get("replicas", 1)
    instances = list(Instance.objects.filter(revision=revision))
    have = {i.ordinal for i in instances}
    for ordinal in range(replicas):
        if ordinal not in have:
            inst = reconciler._start_instance(d, revision, ordinal)
            if inst is not None:
                instances.append(inst)
    crashes = sum(i.restarts for i in instances)
    ready = [i for i in instances if i.state == Instance.State.READY]
    if len(ready) < replicas:
        started = revision.rollout_started_at or timezone.now()
        if crashes >= reconciler.CRASH_LIMIT:
            last = next((i.last_error for i in instances if i.last_error), "")
            _fail(d, run, f"shadow r{revision.number} crash-looped ({crashes} restarts) {last}")
            return True
        if run.mirroring_since is None and timezone.now() - started > timedelta(
            seconds=d.progress_deadline_s
        ):
            _fail(
                d,
                run,
                f"shadow r{revision.number} not ready within the progress deadline "
                f"({d.progress_deadline_s}s)",
            )
            return True
        return False
    return True


def shadow_confirm(d: Deployment, *, timeout: float = 2.0) -> bool:
    """After the router file was written: once the router itself reports mirroring to the
    active shadow, record when it began (``mirroring_since``: the report's window starts
    there). True when mirroring is confirmed (or was already)."""
    import time

    from . import router

    run = shadow_active(d)
    if run is None:
        return False
    if run.mirroring_since is not None:
        return True
    if shadow_mirror_key(d) is None:
        return False  # not every instance is ready yet
    deadline = time.monotonic() + timeout
    while True:
        stats = router.stats(d.port, host=d.router_host) or {}
        if (stats.get("mirror") or {}).get("revision") == run.revision.number:
            break
        if time.monotonic() > deadline:
            return False  # the next pass looks again
        time.sleep(0.02)
    ShadowRun.objects.filter(pk=run.pk, mirroring_since__isnull=True).update(
        mirroring_since=timezone.now()
    )
    event_record(
        d,
        "shadow",
        f"mirroring {run.fraction:g} of the requests to r{run.revision.number}",
        run.revision,
    )
    return True


def shadow_collect(d: Deployment) -> int:
    """Pull the pairs the router buffered for the active shadow into ShadowPair rows; the
    number stored. Safe to call twice (the cursor and ``seq`` say what was read)."""
    run = shadow_active(d)
    if run is None or run.mirroring_since is None:
        return 0
    stored = 0
    for _ in range(PULL_PAGES):
        after = run.cursor
        try:
            page = http.request(
                "GET",
                f"{d.endpoint}/__router/mirror?after={after}&limit={PULL_LIMIT}",
                timeout=2.0,
            ).json()
        except (http.HttpError, ValueError) as exc:
            logger.info("pulling shadow pairs of %s: %s", d.name, exc)
            break
        if not page.get("active") or page.get("revision") != run.revision.number:
            break
        epoch = str(page.get("epoch") or "")
        if epoch != run.cursor_epoch:
            # A new router process (or mirror): its sequence starts over.
            if run.cursor_epoch:
                run.cursor, run.cursor_epoch = 0, epoch
                continue
            run.cursor_epoch = epoch
        pairs = [p for p in page.get("pairs") or [] if int(p.get("seq", 0)) > run.cursor]
        rows = [_pair_row(run, p) for p in pairs]
        counters = dict(run.counters or {})
        counters[epoch] = {
            k: page.get(k, 0) for k in ("offered", "sent", "dropped", "completed", "errors")
        }
        with transaction.atomic():
            ShadowPair.objects.bulk_create(rows)
            run.cursor = max([run.cursor, *(int(p["seq"]) for p in pairs)])
            run.lost += int(page.get("lost") or 0)
            run.counters = counters
            ShadowRun.objects.filter(pk=run.pk).update(
                cursor=run.cursor, cursor_epoch=epoch, counters=counters, lost=run.lost
            )
        stored += len(rows)
        if len(pairs) < PULL_LIMIT:
            break
    if stored:
        _prune(run)
    return stored


def _ts(value: Any) -> datetime:
    try:
        return datetime.fromtimestamp(float(value), tz=UTC)
    except (TypeError, ValueError, OverflowError):
        return timezone.now()


def _status(value: Any) -> int | None:
    return value if isinstance(value, int) and 0 <= value < 1000 else None


def _ms(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _pair_row(run: ShadowRun, p: dict) -> ShadowPair:
    primary, candidate = p.get("primary") or {}, p.get("candidate") or {}
    return ShadowPair(
        run=run,
        seq=int(p["seq"]),
        ts=_ts(p.get("ts")),
        path=str(p.get("path") or "")[:200],
        primary_status=_status(primary.get("status")),
        primary_ms=_ms(primary.get("ms")),
        primary_body=str(primary.get("body") or ""),
        candidate_status=_status(candidate.get("status")),
        candidate_ms=_ms(candidate.get("ms")),
        candidate_body=str(candidate.get("body") or ""),
        candidate_error=str(candidate.get("error") or "")[:500],
        truncated=bool(primary.get("truncated") or candidate.get("truncated")),
    )


def _prune(run: ShadowRun) -> None:
    cutoff = (
        ShadowPair.objects.filter(run=run)
        .order_by("-ts", "-id")
        .values_list("id", flat=True)[MAX_PAIRS_PER_RUN : MAX_PAIRS_PER_RUN + 1]
    )
    cutoff = list(cutoff)
    if cutoff:
        ShadowPair.objects.filter(run=run, id__lte=cutoff[0]).delete()
