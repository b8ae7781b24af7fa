"""Rollout strategies (desired state): validation, the Rollout row of a new revision, and
the control actions (promote, abort, pause, resume). The reconciler (canary.py) drives a
rollout; these functions only record what is wanted, audited, and kick it.

Strategy JSON (a deployment's ``strategy``; ``{}`` or ``{"type": "rolling"}`` is rolling):

    {"type": "canary",
     "steps": [{"weight": 10, "seconds": 120}, {"weight": 50, "seconds": 120}],
     "analysis": {"min_samples": 100, ...},          # deployments/analysis.py DEFAULTS
     "inconclusive_deadline_s": 600}                   # per step, after its bake time
"""

from __future__ import annotations

import re
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record
from controlplane.lib.errors import ApplicationError, Conflict

from . import analysis
from .models import Deployment, Revision, Rollout

STRATEGY_TYPES = ("rolling", "canary")
MAX_STEPS = 10
MAX_STEP_SECONDS = 86400
DEFAULT_INCONCLUSIVE_DEADLINE_S = 600
ACTIONS = ("promote", "abort", "pause", "resume")


def _invalid(message: str) -> ApplicationError:
    return ApplicationError(message, code="invalid_strategy")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_strategy(strategy: Any) -> dict:
    """A strategy as stored; raises ApplicationError (400 invalid_strategy) when bad."""
    if strategy in (None, {}):
        return {}
    if not isinstance(strategy, dict):
        raise _invalid("strategy must be an object")
    kind = strategy.get("type")
    if kind not in STRATEGY_TYPES:
        raise _invalid(f"strategy.type must be one of {', '.join(STRATEGY_TYPES)}")
    if kind == "rolling":
        if set(strategy) - {"type"}:
            raise _invalid("a rolling strategy takes no other field")
        return {}
    unknown = set(strategy) - {"type", "steps", "analysis", "inconclusive_deadline_s"}
    if unknown:
        raise _invalid(f"unknown strategy field(s): {', '.join(sorted(unknown))}")
    steps = strategy.get("steps")
    if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_STEPS:
        raise _invalid(f"strategy.steps must be a list of 1 to {MAX_STEPS} steps")
    clean, last = [], 0
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or set(step) != {"weight", "seconds"}:
            raise _invalid(f'strategy.steps[{i}] must be {{"weight": W, "seconds": S}}')
        weight, seconds = step["weight"], step["seconds"]
        if not _int(weight) or not 1 <= weight <= 99:
            raise _invalid(f"strategy.steps[{i}].weight must be an integer from 1 to 99")
        if weight <= last:
            raise _invalid("strategy.steps weights must be ascending")
        if not _int(seconds) or not 0 < seconds <= MAX_STEP_SECONDS:
            raise _invalid(
                f"strategy.steps[{i}].seconds must be an integer from 1 to {MAX_STEP_SECONDS}"
            )
        clean.append({"weight": weight, "seconds": seconds})
        last = weight
    try:
        thresholds = analysis.validate_thresholds(strategy.get("analysis"))
    except ValueError as exc:
        raise _invalid(f"strategy.{exc}") from None
    deadline = strategy.get("inconclusive_deadline_s", DEFAULT_INCONCLUSIVE_DEADLINE_S)
    if not _int(deadline) or not 0 < deadline <= MAX_STEP_SECONDS:
        raise _invalid(
            f"strategy.inconclusive_deadline_s must be an integer from 1 to {MAX_STEP_SECONDS}"
        )
    return {
        "type": "canary",
        "steps": clean,
        "analysis": thresholds,
        "inconclusive_deadline_s": deadline,
    }


def rollout_for_new_revision(d: Deployment, revision: Revision) -> Rollout | None:
    """Called inside the transaction that made ``revision`` desired: earlier active rollouts
    are superseded; a canary strategy with a revision serving now gets a Rollout row."""
    now = timezone.now()
    for ro in Rollout.objects.filter(deployment=d, state__in=Rollout.ACTIVE).exclude(
        revision=revision
    ):
        _finish(ro, Rollout.State.SUPERSEDED, f"superseded by r{revision.number}", now=now)
    strategy = d.strategy or {}
    if strategy.get("type") != "canary" or not d.serving_revision_id:
        return None
    if d.serving_revision_id == revision.pk:
        return None
    return Rollout.objects.create(
        deployment=d, revision=revision, baseline_id=d.serving_revision_id, strategy=strategy
    )


def rollouts_cancel(d: Deployment, why: str) -> None:
    """A rollback: every active rollout ends (traffic returns with the rollback)."""
    for ro in Rollout.objects.filter(deployment=d, state__in=Rollout.ACTIVE):
        _finish(ro, Rollout.State.ABORTED, why)


def _finish(ro: Rollout, state: str, why: str, *, now=None) -> None:
    """End an active rollout by compare-and-swap on the row as read (state, step,
    ``updated_at``): a reconciler pass that wrote meanwhile is never overwritten (nor its
    decision lost); the row is read again, and left alone once it is no longer active."""
    now = now or timezone.now()
    for _ in range(5):
        entry = {"at": now.isoformat(), "decision": state, "reason": why, "step": ro.step}
        if Rollout.objects.filter(
            pk=ro.pk, state=ro.state, step=ro.step, updated_at=ro.updated_at
        ).update(
            state=state,
            decision=state,
            reason=why,
            decisions=[*ro.decisions, entry],
            updated_at=now,
        ):
            return
        ro.refresh_from_db()
        if ro.state not in Rollout.ACTIVE:
            return
    raise Conflict("the rollout keeps changing; try again", code="rollout_busy")


def active_rollout(d: Deployment) -> Rollout | None:
    return (
        Rollout.objects.select_related("revision", "baseline")
        .filter(deployment=d, revision_id=d.desired_revision_id)
        .first()
    )


_TRANSITIONS = {
    # action: (states it applies to, new state)
    "promote": ((Rollout.State.RUNNING, Rollout.State.PAUSED), Rollout.State.PROMOTING),
    "abort": (
        (Rollout.State.RUNNING, Rollout.State.PAUSED, Rollout.State.PROMOTING),
        Rollout.State.ABORTING,
    ),
    "pause": ((Rollout.State.RUNNING,), Rollout.State.PAUSED),
    "resume": ((Rollout.State.PAUSED,), Rollout.State.RUNNING),
}


@transaction.atomic
def rollout_control(
    *, deployment: Deployment, action: str, actor: AbstractBaseUser, reason: str = ""
) -> Rollout:
    """promote (skip the remaining steps: 100 % to the candidate), abort (100 % back to the
    baseline, the candidate fails), pause (hold the weights, no analysis), resume (the
    step's bake time starts again). Compare-and-swap on the state: two callers never both
    apply a transition."""
    from .services import _kick, _locked, event_record

    if action not in ACTIONS:
        raise ApplicationError(f"action must be one of {', '.join(ACTIONS)}", code="invalid_action")
    d = _locked(deployment)
    ro = active_rollout(d)
    if ro is None or ro.state not in Rollout.ACTIVE:
        raise Conflict(f"{d.name!r} has no rollout in progress", code="no_rollout")
    allowed, new_state = _TRANSITIONS[action]
    if ro.state not in allowed:
        raise Conflict(f"cannot {action} a rollout that is {ro.state}", code="invalid_transition")
    now = timezone.now()
    who = actor.get_username()
    why = reason or f"{action} by {who}"
    fields: dict[str, Any] = {"state": new_state, "updated_at": now}
    if action == "resume":
        fields.update(step_started_at=now if ro.step >= 0 else None, window_start={})
    entry = {"at": now.isoformat(), "decision": action, "reason": why, "step": ro.step}
    fields["decisions"] = [*ro.decisions, entry]
    if not Rollout.objects.filter(pk=ro.pk, state=ro.state).update(**fields):
        raise Conflict("the rollout changed meanwhile; try again", code="invalid_transition")
    event_record(d, f"rollout_{action}", f"rollout of r{ro.revision.number}: {why}", ro.revision)
    audit_record(
        actor=actor,
        action=f"deployment.rollout_{action}",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before={"rollout": ro.state, "step": ro.step},
        after={"rollout": new_state, "step": ro.step, "reason": why},
    )
    _kick(d)
    ro.refresh_from_db()
    return ro


def rollout_summary(d: Deployment) -> dict | None:
    """The ``rollout`` field of GET /api/v1/deployments/{name}: the desired revision's
    rollout, else the last one (so a finished canary's verdict stays visible)."""
    # Prefetched by selectors.deployment_list (no query per deployment in a list).
    ro = max(d.rollouts.all(), key=lambda r: r.revision.number, default=None)
    if ro is None:
        return None
    steps = ro.strategy.get("steps", [])
    return {
        "strategy": ro.strategy,
        "revision": ro.revision.number,
        "baseline": ro.baseline.number if ro.baseline else None,
        "state": ro.state,
        "step": ro.step,
        "steps": len(steps),
        "step_started_at": ro.step_started_at,
        "weights": ro.weights,
        "checks": ro.checks,
        "decision": ro.decision,
        "reason": ro.reason,
        "decisions": ro.decisions[-20:],
    }


HEADER_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")


def _split_invalid(message: str) -> ApplicationError:
    return ApplicationError(message, code="invalid_split")


def validate_split(variants: Any, sticky: Any) -> tuple[list[tuple[str, int]], str | None]:
    """Two variants ``[{"version": V, "weight": W}, ...]`` (weights 1..99 summing to 100)
    and an optional ``"header:NAME"``."""
    if not isinstance(variants, list) or len(variants) != 2:
        raise _split_invalid('variants must be a list of two {"version", "weight"} objects')
    out = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or set(v) != {"version", "weight"}:
            raise _split_invalid(f'variants[{i}] must be {{"version": V, "weight": W}}')
        if not _int(v["weight"]) or not 1 <= v["weight"] <= 99:
            raise _split_invalid(f"variants[{i}].weight must be an integer from 1 to 99")
        out.append((str(v["version"]), v["weight"]))
    if sum(w for _, w in out) != 100:
        raise _split_invalid("variant weights must add up to 100")
    if out[0][0] == out[1][0]:
        raise _split_invalid("the two variants must be different versions")
    header = None
    if sticky not in (None, ""):
        if not isinstance(sticky, str) or not sticky.startswith("header:"):
            raise _split_invalid('sticky must be "header:NAME"')
        header = sticky[len("header:") :]
        if not HEADER_RE.match(header):
            raise _split_invalid(f"{header!r} is not a header name")
    return out, header


@transaction.atomic
def deployment_split(
    *, deployment: Deployment, variants: Any, sticky: Any = None, actor: AbstractBaseUser
) -> Rollout:
    """An A/B split: fixed weights between the version serving now (the baseline) and one
    other version (a new revision), both kept serving; optionally sticky by a header's hash.
    It lasts until the next update, a rollback, or promote/abort."""
    from .services import (
        _deployment_snapshot,
        _kick,
        _locked,
        _new_revision,
        _resolve_target,
    )

    pairs, header = validate_split(variants, sticky)
    d = _locked(deployment)
    serving = (
        Revision.objects.filter(pk=d.serving_revision_id).select_related("model_version").first()
    )
    if serving is None:
        raise Conflict("a split needs a revision serving now (the baseline)", code="no_baseline")
    serving_version = str(serving.model_version.version)
    if serving_version not in {v for v, _ in pairs}:
        raise Conflict(
            f"one variant must be the version serving now (v{serving_version})",
            code="baseline_not_a_variant",
        )
    (other, other_weight) = next((v, w) for v, w in pairs if v != serving_version)
    mv, number, _ = _resolve_target(d.model, other, None)
    before = _deployment_snapshot(d)
    d.target_version, d.target_alias = number, ""
    d.stopped = False
    revision = _new_revision(d, mv, reason=f"split: v{serving_version}/v{other}", actor=actor)
    d.save()
    strategy = {
        "type": "split",
        "variants": [
            {"version": serving_version, "revision": serving.number, "weight": 100 - other_weight},
            {"version": other, "revision": revision.number, "weight": other_weight},
        ],
        "sticky": header,
    }
    ro, _ = Rollout.objects.update_or_create(
        revision=revision,
        defaults={
            "deployment": d,
            "baseline": serving,
            "strategy": strategy,
            "state": Rollout.State.RUNNING,
        },
    )
    audit_record(
        actor=actor,
        action="deployment.split",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before=before,
        after={**_deployment_snapshot(d), "split": strategy},
    )
    _kick(d)
    return ro
