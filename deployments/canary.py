"""The reconciler's side of a canary rollout: weights into the router, the analysis after
each step's bake time, and its verdict applied (next step, promote, wait or abort).

Level-triggered like the rest of the reconciler: everything comes from the Rollout row
(step, step_started_at, window_start) and the router, so a worker killed mid-canary is
replaced by one that resumes the same step with the same timing. Traffic never moves to
the candidate before every one of its instances is ready; an abort rewrites the router to
100 % baseline first, verifies it, then fails the revision.
"""

from __future__ import annotations

import logging
import time

from django.db import transaction
from django.utils import timezone

from audit.services import audit_record

from . import analysis, router
from .models import Deployment, Instance, Revision, Rollout
from .services import event_record

logger = logging.getLogger(__name__)

WAIT_RETRY_S = 1.0  # an inconclusive analysis is repeated this often
MAX_PREDICTIONS = 50_000  # rows per variant read for the divergence check


def _group(rev: Revision, weight: int, addresses: list[str]) -> dict:
    return {
        "name": f"r{rev.number}",
        "revision": rev.number,
        "weight": weight,
        "backends": addresses,
    }


def _baseline_addresses(d: Deployment, serving: Revision) -> list[str]:
    insts = list(Instance.objects.filter(deployment=d, revision=serving))
    ready = [i for i in insts if i.state == Instance.State.READY]
    return [i.address for i in (ready or insts)]


def _route(d: Deployment, serving: Revision, desired: Revision, weight: int, candidates) -> list:
    base = _baseline_addresses(d, serving)
    cand = [i.address for i in candidates]
    groups = [_group(serving, 100 - weight, base), _group(desired, weight, cand)]
    if router.write_deployment(d, base + cand, groups=groups):
        router.routes_groups(d.port, groups, host=d.router_host)
    return groups


def _to_baseline(d: Deployment, serving: Revision) -> tuple[bool, float]:
    started = time.monotonic()
    base = _baseline_addresses(d, serving)
    router.write_deployment(d, base)
    ok = router.routes_groups(d.port, [], timeout=2.0, host=d.router_host) and router.routes_to(
        d.port, base, host=d.router_host
    )
    return ok, (time.monotonic() - started) * 1000.0


class StaleRollout(Exception):
    """The rollout's row changed since this pass read it (another worker's pass, or a control
    action): nothing of this write landed; the next pass reads the row again."""


def _save(ro: Rollout, **fields) -> None:
    """Compare-and-swap: the write lands only if the row is still as this pass read it (its
    state, step and ``updated_at``, which every writer sets), else StaleRollout (inside a
    transaction: the events and audit written with it roll back too)."""
    fields["updated_at"] = timezone.now()
    unchanged = Rollout.objects.filter(
        pk=ro.pk, state=ro.state, step=ro.step, updated_at=ro.updated_at
    )
    if not unchanged.update(**fields):
        raise StaleRollout(f"rollout {ro.pk} changed meanwhile")
    for k, v in fields.items():
        setattr(ro, k, v)


def _decide(ro: Rollout, decision: str, reason: str, checks: list, **extra) -> dict:
    entry = {
        "at": timezone.now().isoformat(),
        "step": ro.step,
        "weights": ro.weights,
        "decision": decision,
        "reason": reason,
        "checks": checks,
        **extra,
    }
    _save(ro, decision=decision, reason=reason, checks=checks, decisions=[*ro.decisions, entry])
    return entry


def _audit(d: Deployment, action: str, after: dict) -> None:
    audit_record(
        actor=None,
        action=action,
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        after=after,
        system="reconciler",
    )


def _start_step(d, ro, serving, desired, index, candidates) -> None:
    weight = ro.strategy["steps"][index]["weight"]
    # The step's clock and counters are read before the router takes the new weights, so
    # every request the step routes falls inside its window (the router keeps a group's
    # counters by name across reconfigurations, so the deltas stay exact).
    started = timezone.now()
    snapshot = router.stats(d.port, host=d.router_host) or {}
    start = {
        name: {k: g.get(k) for k in ("requests", "errors", "latency_buckets")}
        for name, g in (snapshot.get("groups") or {}).items()
    }
    groups = _route(d, serving, desired, weight, candidates)
    with transaction.atomic():
        _save(
            ro,
            step=index,
            step_started_at=started,
            weights={g["name"]: g["weight"] for g in groups},
            window_start=start,
        )
        message = (
            f"canary step {index + 1}/{len(ro.strategy['steps'])}: r{desired.number} gets "
            f"{weight} % for {ro.strategy['steps'][index]['seconds']} s"
        )
        event_record(d, "canary_step", message, desired)
        _audit(
            d,
            "deployment.rollout_step",
            {"revision": desired.number, "step": index, "weight": weight},
        )


def _window(d, ro, rev: Revision, counters_now: dict, *, same_version: bool) -> analysis.Window:
    from monitoring.models import FeedbackPair, Prediction

    name = f"r{rev.number}"
    counters = analysis.counters_delta(counters_now.get(name), ro.window_start.get(name))
    if same_version:
        return analysis.window_from(counters, None)
    since = ro.step_started_at
    version = rev.model_version.version
    outputs = (
        Prediction.objects.filter(deployment=d, model_version=version, ts__gte=since)
        .order_by("-ts")
        .values_list("outputs", flat=True)[:MAX_PREDICTIONS]
    )
    predictions = [row for out in outputs for row in (out if isinstance(out, list) else [out])]
    pairs = FeedbackPair.objects.filter(deployment=d, model_version=version, ts__gte=since)
    labeled = pairs.count()
    correct = sum(1 for t, p in pairs.values_list("y_true", "y_pred") if t == p) if labeled else 0
    return analysis.window_from(counters, predictions, labeled, correct)


def _figures(rev: Revision, w: analysis.Window) -> dict:
    from serving.routing import percentile

    return {
        "revision": rev.number,
        "version": rev.model_version.version,
        "requests": w.requests,
        "errors": w.errors,
        "p95_ms": percentile(w.latency_buckets, 0.95) if w.latency_buckets else None,
        "predictions": None if w.predictions is None else len(w.predictions),
    }


def evaluate(
    d: Deployment, ro: Rollout, serving: Revision, desired: Revision
) -> tuple[analysis.Verdict, dict]:
    """The analysis over the current step's window, with figures fresh at decision time:
    the router's per-group counters and the prediction log pulled now. Also the figures of
    both variants (baseline, candidate) for the deployment page's chart."""
    from monitoring.services.collection import deployment_pull

    try:
        deployment_pull(deployment_id=d.pk)
    except Exception as exc:  # the analysis then sees fewer predictions: never a pass
        logger.warning("pulling predictions of %s for the canary analysis: %s", d.name, exc)
    stats = router.stats(d.port, host=d.router_host) or {}
    counters = stats.get("groups") or {}
    same = serving.model_version_id == desired.model_version_id
    base = _window(d, ro, serving, counters, same_version=same)
    cand = _window(d, ro, desired, counters, same_version=same)
    verdict = analysis.analyse(base, cand, ro.strategy.get("analysis"))
    return verdict, {"baseline": _figures(serving, base), "candidate": _figures(desired, cand)}


def abort(
    d: Deployment,
    ro: Rollout,
    serving: Revision,
    desired: Revision,
    why: str,
    checks,
    figures: dict | None = None,
) -> None:
    """100 % back to the baseline at once (verified), then the candidate fails."""
    from .reconciler import _fail_revision

    ok, ms = _to_baseline(d, serving)
    with transaction.atomic():
        _decide(
            ro,
            "abort",
            why,
            checks,
            to_baseline_ms=round(ms, 1),
            router_confirmed=ok,
            variants=figures or {},
        )
        _save(ro, state=Rollout.State.ABORTED, weights={f"r{serving.number}": 100})
        event_record(
            d,
            "canary_abort",
            f"canary of r{desired.number} aborted: {why} (baseline r{serving.number} has 100 % "
            f"after {ms:.0f} ms)",
            desired,
        )
        _audit(
            d,
            "deployment.rollout_abort",
            {"revision": desired.number, "reason": why, "checks": checks},
        )
    _fail_revision(d, desired, serving, f"canary aborted: {why}")


def drive(d: Deployment, desired: Revision, serving: Revision | None, wanted, ready, replicas):
    """One reconciler pass of a canary. None: no canary (or it is promoted): the rolling path
    goes on. True/False: what the pass returns (converged or not). A rollout that changed
    under this pass (StaleRollout) is left to the next one: not converged."""
    try:
        return _drive(d, desired, serving, wanted, ready, replicas)
    except StaleRollout as exc:
        logger.info("%s: %s; the next pass reads it again", d.name, exc)
        return False


def _drive(d: Deployment, desired: Revision, serving: Revision | None, wanted, ready, replicas):
    if serving is None or serving.pk == desired.pk:
        return None
    ro = (
        Rollout.objects.filter(revision=desired, state__in=Rollout.ACTIVE)
        .select_related("revision")
        .first()
    )
    if ro is None:
        if router.read_backends(d.name).get("groups"):
            # A canary was superseded or cancelled: its weights go at once.
            _to_baseline(d, serving)
        return None
    if ro.strategy.get("type") == "split":
        return _split(d, ro, serving, desired, wanted, replicas)
    if ro.baseline_id != serving.pk:
        # What served changed under it (a rollback of the baseline): start over on the new one.
        _save(ro, baseline_id=serving.pk, step=-1, step_started_at=None, window_start={})
    steps = ro.strategy["steps"]
    if ro.state == Rollout.State.ABORTING:
        abort(
            d,
            ro,
            serving,
            desired,
            ro.decisions[-1]["reason"] if ro.decisions else "aborted",
            ro.checks,
        )
        return False
    candidates = [i for i in wanted if i.state == Instance.State.READY]
    if len(candidates) < replicas:
        if ro.step >= 0:
            # Mid-canary an instance went unready: only ready ones keep their share.
            _route(d, serving, desired, steps[ro.step]["weight"], candidates)
        return None  # the rolling path reports "waiting for readiness"
    if ro.state == Rollout.State.PROMOTING:
        with transaction.atomic():
            _decide(
                ro, "promote", ro.decisions[-1]["reason"] if ro.decisions else "promoted", ro.checks
            )
            _save(ro, state=Rollout.State.PROMOTED, weights={f"r{desired.number}": 100})
            _audit(d, "deployment.rollout_promoted", {"revision": desired.number, "manual": True})
        return None
    if ro.step < 0:
        _start_step(d, ro, serving, desired, 0, candidates)
        _phase(d, ro, 0)
        return False
    step = steps[ro.step]
    _route(d, serving, desired, step["weight"], candidates)  # level-triggered: a restarted router
    if ro.state == Rollout.State.PAUSED:
        _phase(d, ro, None, paused=True)
        return False
    elapsed = (timezone.now() - ro.step_started_at).total_seconds()
    if elapsed < step["seconds"]:
        _phase(d, ro, elapsed)
        return False
    if ro.decision == "wait" and (timezone.now() - ro.updated_at).total_seconds() < WAIT_RETRY_S:
        return False  # waiting for data: ask again shortly, not on every 0.1 s pass
    verdict, figures = evaluate(d, ro, serving, desired)
    checks = [c.as_dict() for c in verdict.checks]
    if verdict.decision == analysis.FAIL:
        abort(d, ro, serving, desired, verdict.reason, checks, figures)
        return False
    if verdict.decision == analysis.INCONCLUSIVE:
        deadline = ro.strategy.get("inconclusive_deadline_s", 600)
        if elapsed > step["seconds"] + deadline:
            abort(
                d,
                ro,
                serving,
                desired,
                f"inconclusive past its deadline ({deadline} s): {verdict.reason}",
                checks,
                figures,
            )
            return False
        if ro.decision != "wait":
            event_record(
                d,
                "canary_wait",
                f"canary step {ro.step + 1}: waiting for data ({verdict.reason})",
                desired,
            )
        _save(ro, decision="wait", reason=verdict.reason, checks=checks)
        _phase(d, ro, elapsed, waiting=True)
        return False
    # pass
    with transaction.atomic():
        _decide(
            ro, "promote", f"step {ro.step + 1} passed: {verdict.reason}", checks, variants=figures
        )
        _audit(
            d,
            "deployment.rollout_decision",
            {"revision": desired.number, "step": ro.step, "decision": "promote", "checks": checks},
        )
        if ro.step + 1 >= len(steps):
            _save(ro, state=Rollout.State.PROMOTED, weights={f"r{desired.number}": 100})
            event_record(
                d, "canary_promoted", f"canary of r{desired.number} passed every step", desired
            )
            return None  # the rolling path moves the remaining traffic
    _start_step(d, ro, serving, desired, ro.step + 1, candidates)
    _phase(d, ro, 0)
    return False


def _phase(d: Deployment, ro: Rollout, elapsed, *, paused=False, waiting=False) -> None:
    from .reconciler import _set

    steps = ro.strategy["steps"]
    step = steps[max(ro.step, 0)]
    label = f"canary step {ro.step + 1}/{len(steps)} ({step['weight']} %)"
    if paused:
        label += ": paused"
    elif waiting:
        label += ": waiting for data"
    _set(
        d,
        status=Deployment.Status.DEPLOYING,
        phase=label,
        status_message=ro.reason if waiting else "",
    )


def bake_overdue_exempt(desired: Revision) -> bool:
    """Once a canary moved traffic, its steps (not the progress deadline) time it."""
    return Rollout.objects.filter(revision=desired, state__in=Rollout.ACTIVE, step__gte=0).exists()


def _split(d: Deployment, ro: Rollout, serving: Revision, desired: Revision, wanted, replicas):
    """A fixed A/B split: both revisions serve with their weights (sticky by a header's hash
    if asked) until promote (100 % candidate) or abort (back to the baseline)."""
    from .reconciler import _set
    from .services import deployment_rollback

    if ro.state == Rollout.State.ABORTING or ro.baseline_id != serving.pk:
        _to_baseline(d, serving)
        why = "split ended: back to the baseline"
        deployment_rollback(
            deployment=d, revision=serving.number, actor=None, reason=why, automatic=True
        )
        return False
    if ro.state == Rollout.State.PROMOTING:
        with transaction.atomic():
            _decide(ro, "promote", "split promoted: the candidate takes 100 %", [])
            _save(ro, state=Rollout.State.PROMOTED, weights={f"r{desired.number}": 100})
            _audit(d, "deployment.rollout_promoted", {"revision": desired.number, "split": True})
        return None
    candidates = [i for i in wanted if i.state == Instance.State.READY]
    if len(candidates) < replicas:
        return None  # nothing moves before every candidate instance is ready
    variants = {v["revision"]: v["weight"] for v in ro.strategy["variants"]}
    base = _baseline_addresses(d, serving)
    cand = [i.address for i in candidates]
    groups = [
        _group(serving, variants.get(serving.number, 0), base),
        _group(desired, variants.get(desired.number, 0), cand),
    ]
    sticky = {"header": ro.strategy["sticky"]} if ro.strategy.get("sticky") else None
    started = timezone.now()  # before the router takes the split (see _start_step)
    if router.write_deployment(d, base + cand, groups=groups, sticky=sticky):
        router.routes_groups(d.port, groups, host=d.router_host)
    if ro.step < 0:
        with transaction.atomic():
            _save(
                ro,
                step=0,
                step_started_at=started,
                weights={g["name"]: g["weight"] for g in groups},
                decision="split",
                reason="fixed weights",
            )
            event_record(
                d,
                "split",
                "split: "
                + ", ".join(f"{g['name']} {g['weight']} %" for g in groups)
                + (f", sticky by {ro.strategy['sticky']}" if sticky else ""),
                desired,
            )
    _set(
        d,
        status=Deployment.Status.READY,
        phase="split " + " / ".join(f"{g['name']} {g['weight']} %" for g in groups),
        status_message="",
    )
    return True
