"""Autoscaling on every runtime: the policy on a deployment, the loop that polls the routers
and applies the decisions of deployments/autoscaler.py.

Desired state: ``Deployment.autoscaling`` (the policy) and ``Deployment.autoscaled_replicas``
(the count it wants now). The reconciler runs that many instances of the serving revision
instead of the revision's fixed ``replicas`` (``replicas_for``), through the same start and
readiness steps as any instance, so this works on every runtime: it only changes a number.

The loop: a Celery beat task every CONTROLPLANE_AUTOSCALE_INTERVAL (1 s) polls
``GET /__router/stats`` of each autoscaled deployment's router (loopback), stores a
``ScaleSample``, reads the samples of the longest window back from the database and asks
``autoscaler.decide``. A change is written with compare-and-swap on ``autoscaled_replicas``
(two overlapping polls never apply two decisions), with an event carrying the figures and an
audit row in the same transaction, then the reconciler is kicked. A crash anywhere loses at
most one poll: the count and the samples are in the database, the next poll goes on.

Scale from zero: the router holds requests while it has no backend (``"hold"`` in its
backends file, written for deployments with ``min_replicas: 0``) and reports how many wait;
the next poll (within a second) sees them and sets one replica at once.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record
from controlplane.lib import http
from controlplane.lib.errors import ApplicationError
from controlplane.lib.tasks import enqueue_on_commit

from .autoscaler import Decision, Policy, Sample, decide
from .models import Deployment, DeploymentEvent, Instance, ScaleSample

logger = logging.getLogger(__name__)

MAX_REPLICAS = 16  # as deployments.services.MAX_REPLICAS
STATS_TIMEOUT = 0.5
KEYS = {
    "min_replicas",
    "max_replicas",
    "target_in_flight",
    "target_rps",
    "scale_up_window_s",
    "scale_down_window_s",
    "idle_before_zero_s",
}
WINDOW_LIMITS = {
    "scale_up_window_s": (1, 600),
    "scale_down_window_s": (1, 3600),
    "idle_before_zero_s": (1, 86400),
}


def _invalid(message: str) -> ApplicationError:
    return ApplicationError(message, code="invalid_autoscaling", details={"keys": sorted(KEYS)})


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def autoscaling_validate(value: Any) -> dict | None:
    """The ``autoscaling`` of a create or update, checked: None turns autoscaling off."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(
            "autoscaling must be an object such as "
            '{"min_replicas": 1, "max_replicas": 8, "target_in_flight": 8}, or null'
        )
    unknown = set(value) - KEYS
    if unknown:
        raise _invalid(f"autoscaling does not take {', '.join(sorted(unknown))}")
    lo, hi = value.get("min_replicas", 1), value.get("max_replicas")
    if isinstance(lo, bool) or not isinstance(lo, int) or not 0 <= lo <= MAX_REPLICAS:
        raise _invalid(f"autoscaling.min_replicas must be an integer from 0 to {MAX_REPLICAS}")
    if hi is None:
        raise _invalid("autoscaling.max_replicas is required")
    if isinstance(hi, bool) or not isinstance(hi, int) or not 1 <= hi <= MAX_REPLICAS:
        raise _invalid(f"autoscaling.max_replicas must be an integer from 1 to {MAX_REPLICAS}")
    if lo > hi:
        raise _invalid("autoscaling.min_replicas must not exceed max_replicas")
    target = value.get("target_in_flight")
    if target is None:
        raise _invalid("autoscaling.target_in_flight is required (in-flight requests per replica)")
    if not _number(target) or not 0 < target <= 10000:
        raise _invalid("autoscaling.target_in_flight must be a number above 0 (at most 10000)")
    rps = value.get("target_rps")
    if rps is not None and (not _number(rps) or not 0 < rps <= 1_000_000):
        raise _invalid("autoscaling.target_rps must be a number above 0, or absent")
    out: dict = {"min_replicas": lo, "max_replicas": hi, "target_in_flight": target}
    if rps is not None:
        out["target_rps"] = rps
    for key, (low, high) in WINDOW_LIMITS.items():
        if key in value:
            window = value[key]
            if not _number(window) or not low <= window <= high:
                raise _invalid(
                    f"autoscaling.{key} must be a number of seconds from {low} to {high}"
                )
            out[key] = window
    return out


def policy_of(d: Deployment) -> Policy:
    a = d.autoscaling or {}
    return Policy(
        min_replicas=a["min_replicas"],
        max_replicas=a["max_replicas"],
        target_in_flight=float(a["target_in_flight"]),
        target_rps=float(a["target_rps"]) if a.get("target_rps") else None,
        scale_up_window_s=float(
            a.get("scale_up_window_s", settings.CONTROLPLANE_AUTOSCALE_SCALE_UP_WINDOW)
        ),
        scale_down_window_s=float(
            a.get("scale_down_window_s", settings.CONTROLPLANE_AUTOSCALE_SCALE_DOWN_WINDOW)
        ),
        idle_before_zero_s=float(
            a.get("idle_before_zero_s", settings.CONTROLPLANE_AUTOSCALE_IDLE_BEFORE_ZERO)
        ),
    )


def autoscaling_apply(d: Deployment, value: Any) -> str | None:
    """Set (or turn off) the policy on the unsaved ``d``; a note of the change, None if
    nothing changed. The current count is kept within the new bounds (starting from the
    fixed replicas when autoscaling is turned on)."""
    new = autoscaling_validate(value)
    if new == d.autoscaling:
        return None
    old = d.autoscaling
    d.autoscaling = new
    if new is None:
        d.autoscaled_replicas = None
        return "autoscaling off: fixed replicas"
    start = d.autoscaled_replicas if d.autoscaled_replicas is not None else d.replicas
    d.autoscaled_replicas = min(
        max(start, new["min_replicas"], 1 if old is None else 0), new["max_replicas"]
    )
    return (
        f"autoscaling {new['min_replicas']}–{new['max_replicas']} replicas, "
        f"target {new['target_in_flight']} in flight per replica"
        + (f" or {new['target_rps']} requests/s" if "target_rps" in new else "")
    )


def autoscaling_view(d: Deployment) -> dict | None:
    """The policy as shown (windows in force filled in), the count wanted now, cold starts."""
    if not d.autoscaling:
        return None
    policy = policy_of(d)
    return {
        **d.autoscaling,
        "scale_up_window_s": policy.scale_up_window_s,
        "scale_down_window_s": policy.scale_down_window_s,
        "idle_before_zero_s": policy.idle_before_zero_s,
        "replicas": d.autoscaled_replicas,
        "cold_starts": d.cold_starts,
        "scaled_up_at": d.scaled_up_at,
        "scaled_down_at": d.scaled_down_at,
    }


def replicas_for(d: Deployment, revision) -> int:
    """Instances of ``revision`` the reconciler keeps running: the autoscaler's count when
    autoscaling is on (at least one for a revision still rolling out: it must prove it
    starts), else the revision's fixed count."""
    fixed = revision.spec.get("replicas", 1)
    if not d.autoscaling or d.autoscaled_replicas is None:
        return fixed
    if revision.pk != d.serving_revision_id:
        return max(d.autoscaled_replicas, 1)
    return d.autoscaled_replicas


def hold_for(d: Deployment) -> dict | None:
    """The router's ``hold`` setting: deployments that may scale to zero hold requests."""
    if d.autoscaling and d.autoscaling.get("min_replicas", 1) == 0:
        return {
            "queue": settings.CONTROLPLANE_AUTOSCALE_HOLD_QUEUE,
            "timeout_s": settings.CONTROLPLANE_AUTOSCALE_HOLD_TIMEOUT,
        }
    return None


def status_note(d: Deployment, replicas: int) -> str:
    if d.autoscaling and replicas == 0:
        return "scaled to zero: the next request starts an instance"
    return ""


# --- the loop -----------------------------------------------------------------------------


def deployments_to_autoscale() -> list[int]:
    return list(
        Deployment.objects.filter(
            autoscaling__isnull=False, stopped=False, deleted=False, serving_revision__isnull=False
        ).values_list("pk", flat=True)
    )


def router_stats(port: int, *, host: str = "127.0.0.1") -> dict | None:
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        resp = http.request("GET", f"{base}/__router/stats", timeout=STATS_TIMEOUT)
        data = resp.json()
    except (http.HttpError, ValueError) as exc:
        logger.debug("router stats on port %s: %s", port, exc)
        return None
    return data if isinstance(data, dict) else None


def _epoch(at: datetime | None) -> float | None:
    return at.timestamp() if at is not None else None


def deployment_autoscale(*, deployment_id: int, now: float | None = None) -> Decision | None:
    """One poll of one deployment: sample its router, decide, apply. None when it is not
    autoscaled or its router does not answer (nothing is decided on missing data)."""
    d = Deployment.objects.filter(pk=deployment_id, autoscaling__isnull=False).first()
    if d is None or d.stopped or d.deleted or d.autoscaled_replicas is None:
        return None
    stats = router_stats(d.port, host=d.router_host)
    if stats is None:
        return None
    now = time.time() if now is None else now
    hold = stats.get("hold") or {}
    ready = Instance.objects.filter(
        deployment=d, revision_id=d.serving_revision_id, state=Instance.State.READY
    ).count()
    sample = Sample(
        t=now,
        in_flight=int(stats.get("in_flight") or 0),
        requests_total=int(stats.get("requests_total") or 0),
        waiting=int(hold.get("waiting") or 0),
        ready=ready,
    )
    policy = policy_of(d)
    longest = max(policy.scale_down_window_s, policy.idle_before_zero_s) + policy.scale_up_window_s
    rows = ScaleSample.objects.filter(deployment=d, ts__gt=now - longest, ts__lt=now).values_list(
        "ts", "in_flight", "requests_total", "waiting", "ready"
    )
    samples = [Sample(*row) for row in rows] + [sample]
    decision = decide(
        policy=policy,
        samples=samples,
        current=d.autoscaled_replicas,
        now=now,
        last_scale_up_at=_epoch(d.scaled_up_at),
    )
    if decision.replicas != d.autoscaled_replicas:
        decision = deployment_scale_apply(deployment=d, decision=decision, stats=stats) or Decision(
            d.autoscaled_replicas, "another poll changed it first", decision.figures
        )
    ScaleSample.objects.create(
        deployment=d,
        ts=now,
        replicas=decision.replicas,
        ready=sample.ready,
        in_flight=sample.in_flight,
        waiting=sample.waiting,
        requests_total=sample.requests_total,
    )
    return decision


@transaction.atomic
def deployment_scale_apply(
    *, deployment: Deployment, decision: Decision, stats: dict
) -> Decision | None:
    """Write one scaling decision: compare-and-swap on the count it was made from, an event
    with its figures and an audit row, then kick the reconciler. None if the count changed
    meanwhile (another poll, a user's change of the policy)."""
    d = deployment
    before = d.autoscaled_replicas
    now = timezone.now()
    fields: dict[str, Any] = {"autoscaled_replicas": decision.replicas}
    up = decision.replicas > before
    if up:
        fields["scaled_up_at"] = now
    else:
        fields["scaled_down_at"] = now
    cold = before == 0 and decision.replicas > 0
    updated = Deployment.objects.filter(
        pk=d.pk, autoscaled_replicas=before, autoscaling__isnull=False, stopped=False
    ).update(**fields)
    if not updated:
        return None
    if cold:
        from django.db.models import F

        Deployment.objects.filter(pk=d.pk).update(cold_starts=F("cold_starts") + 1)
    figures = {**decision.figures, "hold": stats.get("hold")}
    DeploymentEvent.objects.create(
        deployment=d,
        revision_id=d.serving_revision_id,
        kind="cold_start" if cold else "autoscale",
        message=f"replicas {before} → {decision.replicas}: {decision.reason}",
    )
    audit_record(
        actor=None,
        action="deployment.autoscale",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before={"replicas": before},
        after={"replicas": decision.replicas, "reason": decision.reason, "figures": figures},
        system="autoscaler",
    )
    from .tasks import reconcile

    enqueue_on_commit(reconcile, d.pk)
    return decision


def autoscale_all() -> int:
    done = 0
    for pk in deployments_to_autoscale():
        try:
            deployment_autoscale(deployment_id=pk)
            done += 1
        except Exception:  # one deployment's failure must not starve the others
            logger.exception("autoscaling deployment %s", pk)
    return done


def samples_prune(*, now: float | None = None) -> int:
    now = time.time() if now is None else now
    cutoff = now - settings.CONTROLPLANE_AUTOSCALE_SAMPLE_RETENTION_HOURS * 3600
    deleted, _ = ScaleSample.objects.filter(ts__lt=cutoff).delete()
    return deleted
