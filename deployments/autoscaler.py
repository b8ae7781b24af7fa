"""The autoscaling decision: a pure function of the routers' recent counts.

Modelled on Knative's concurrency autoscaler (KPA) and the Kubernetes HPA's stabilisation:

- **Recommendation** at a moment: ``ceil(average in-flight requests over the scale-up window
  / target_in_flight)`` (and, with ``target_rps``, ``ceil(requests/s over that window /
  target_rps)``, the larger of the two). The router's in-flight count includes requests it
  holds while no backend runs.
- **Scale up** as soon as the recommendation now exceeds the current count: the window is
  short (6 s by default, Knative's panic window), so the reaction comes within seconds.
- **Scale down** only to the highest recommendation seen over the whole scale-down window
  (60 s by default, Knative's stable window, like the HPA's downscale stabilisation), only
  once samples cover that window (after a control-plane restart the window fills first) and
  not within that window after the last scale-up: a short lull changes nothing.
- **Scale to zero** (``min_replicas: 0``): after ``idle_before_zero_s`` (60 s) without a
  request (in flight zero and the request counter unchanged over the whole period).
  **From zero**: a request waiting at the router (or any traffic) starts the first replicas
  at once, ignoring the windows.
- Never below ``min_replicas`` (nor below 1 while not idle), never above ``max_replicas``.

No Django, no clock, no I/O: the caller passes samples and ``now``; tests feed synthetic
counts. deployments/scaling.py polls the routers, stores samples and applies decisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_SCALE_UP_WINDOW_S = 6.0
DEFAULT_SCALE_DOWN_WINDOW_S = 60.0
DEFAULT_IDLE_BEFORE_ZERO_S = 60.0
# Samples must reach back this share of a window before a decision needs the whole window.
COVERAGE = 0.9


@dataclass(frozen=True)
class Policy:
    """A deployment's ``autoscaling`` settings, defaults filled in."""

    min_replicas: int
    max_replicas: int
    target_in_flight: float
    target_rps: float | None = None
    scale_up_window_s: float = DEFAULT_SCALE_UP_WINDOW_S
    scale_down_window_s: float = DEFAULT_SCALE_DOWN_WINDOW_S
    idle_before_zero_s: float = DEFAULT_IDLE_BEFORE_ZERO_S


@dataclass(frozen=True)
class Sample:
    """One poll of a deployment's router: ``t`` in seconds (epoch), requests in flight (all
    replicas, plus those held), the router's request counter (resets if it restarts) and
    the replicas ready at that moment."""

    t: float
    in_flight: int
    requests_total: int = 0
    waiting: int = 0
    ready: int = 0


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    figures: dict = field(default_factory=dict)


def _in(samples: Sequence[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start < s.t <= end]


def _rate(samples: Sequence[Sample]) -> float:
    """Requests per second over the samples; a counter that went down (the router
    restarted) counts from zero."""
    if len(samples) < 2:
        return 0.0
    total = 0
    for a, b in zip(samples, samples[1:], strict=False):
        total += (
            b.requests_total - a.requests_total
            if b.requests_total >= a.requests_total
            else b.requests_total
        )
    span = samples[-1].t - samples[0].t
    return total / span if span > 0 else 0.0


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def recommend(policy: Policy, samples: Sequence[Sample], end: float) -> tuple[int, dict]:
    """The replicas the scale-up window ending at ``end`` asks for, with its figures."""
    window = _in(samples, end - policy.scale_up_window_s, end)
    if not window:
        return 0, {"in_flight_avg": 0.0, "samples": 0}
    avg = sum(s.in_flight for s in window) / len(window)
    wanted = _ceil(avg / policy.target_in_flight)
    figures = {"in_flight_avg": round(avg, 2), "samples": len(window)}
    if policy.target_rps:
        rps = _rate(window)
        figures["rps"] = round(rps, 2)
        wanted = max(wanted, _ceil(rps / policy.target_rps))
    return wanted, figures


def _idle(samples: Sequence[Sample]) -> bool:
    return all(s.in_flight == 0 and s.waiting == 0 for s in samples) and _rate(samples) == 0


def _covers(samples: Sequence[Sample], now: float, window: float) -> bool:
    return bool(samples) and samples[0].t <= now - window * COVERAGE


def decide(
    *,
    policy: Policy,
    samples: Sequence[Sample],
    current: int,
    now: float,
    last_scale_up_at: float | None = None,
) -> Decision:
    """The replica count to run now, why, and the figures behind it. ``samples``: the
    router's recent polls (any order, at least the longest window back), ``current``: the
    desired count now."""
    samples = sorted(samples, key=lambda s: s.t)
    floor = max(policy.min_replicas, 1)
    ceiling = policy.max_replicas
    wanted, figures = recommend(policy, samples, now)
    figures = {**figures, "current": current, "target_in_flight": policy.target_in_flight}
    if policy.target_rps:
        figures["target_rps"] = policy.target_rps
    latest = samples[-1] if samples and samples[-1].t > now - policy.scale_up_window_s else None
    if latest is not None:
        figures.update(in_flight=latest.in_flight, waiting=latest.waiting, ready=latest.ready)

    if current == 0:
        recent = _in(samples, now - policy.scale_up_window_s, now)
        if recent and not _idle(recent):
            new = min(max(wanted, floor), ceiling)
            waiting = max(s.waiting for s in recent)
            return Decision(
                new,
                f"scale from zero: {waiting} request(s) waiting at the router, "
                f"in flight {figures['in_flight_avg']} on average over "
                f"{policy.scale_up_window_s:g} s",
                figures,
            )
        if policy.min_replicas > 0:
            return Decision(floor, f"below min_replicas {policy.min_replicas}", figures)
        return Decision(0, "idle: scaled to zero", figures)

    if current < floor:
        return Decision(floor, f"below min_replicas {policy.min_replicas}", figures)
    if current > ceiling:
        return Decision(ceiling, f"above max_replicas {ceiling}", figures)

    if wanted > current:
        new = min(wanted, ceiling)
        return Decision(
            new,
            f"in flight {figures['in_flight_avg']} on average over "
            f"{policy.scale_up_window_s:g} s"
            + (f", {figures['rps']} requests/s" if "rps" in figures else "")
            + f": {figures['in_flight_avg'] / current:.2f} per replica > target "
            f"{policy.target_in_flight:g}",
            figures,
        )

    if policy.min_replicas == 0:
        idle_window = _in(samples, now - policy.idle_before_zero_s, now)
        if _covers(samples, now, policy.idle_before_zero_s) and _idle(idle_window):
            figures["idle_s"] = policy.idle_before_zero_s
            return Decision(
                0, f"no request for {policy.idle_before_zero_s:g} s: scale to zero", figures
            )

    down_window = policy.scale_down_window_s
    if wanted < current and _covers(samples, now, down_window):
        if last_scale_up_at is not None and now - last_scale_up_at < down_window:
            return Decision(current, "holding: scaled up less than a window ago", figures)
        # The highest recommendation over the whole window: a lull shorter than it keeps
        # the replicas.
        highest = max(
            recommend(policy, samples, s.t)[0] for s in _in(samples, now - down_window, now)
        )
        new = max(highest, floor)
        figures["highest_in_window"] = highest
        if new < current:
            return Decision(
                new,
                f"at most {highest} replica(s) needed over the last {down_window:g} s "
                f"(in flight {figures['in_flight_avg']} now, target "
                f"{policy.target_in_flight:g} per replica)",
                figures,
            )
    return Decision(current, "steady", figures)
