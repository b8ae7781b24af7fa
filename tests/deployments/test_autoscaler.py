"""The autoscaling decision from synthetic router counts (deployments/autoscaler.py): no
server, no database, no clock."""

from __future__ import annotations

from deployments.autoscaler import Policy, Sample, decide

POLICY = Policy(
    min_replicas=1,
    max_replicas=8,
    target_in_flight=8,
    scale_up_window_s=6,
    scale_down_window_s=60,
    idle_before_zero_s=30,
)


def samples(values, *, start: float = 1000.0, step: float = 1.0, counter_step: int = 10):
    """One sample per second from ``start`` with these in-flight counts; the request counter
    grows while anything is in flight."""
    out, total = [], 0
    for i, v in enumerate(values):
        total += counter_step if v else 0
        out.append(Sample(t=start + i * step, in_flight=v, requests_total=total, ready=1))
    return out


def now_of(series) -> float:
    return series[-1].t


def test_load_above_the_target_scales_up_within_seconds():
    # 70 s at 4 in flight on one replica, then 32 concurrent clients for 3 s
    series = samples([4] * 70 + [32] * 3)
    d = decide(policy=POLICY, samples=series, current=1, now=now_of(series))
    # average over the 6 s window: (3 * 4 + 3 * 32) / 6 = 18 -> ceil(18 / 8) = 3
    assert d.replicas == 3
    assert d.figures["in_flight_avg"] == 18.0 and "target 8" in d.reason
    full = samples([4] * 70 + [32] * 6)
    assert decide(policy=POLICY, samples=full, current=3, now=now_of(full)).replicas == 4


def test_load_at_the_target_holds_the_count():
    series = samples([16] * 90)
    d = decide(policy=POLICY, samples=series, current=2, now=now_of(series))
    assert (d.replicas, d.reason) == (2, "steady")


def test_never_above_max_replicas():
    series = samples([500] * 10)
    assert decide(policy=POLICY, samples=series, current=2, now=now_of(series)).replicas == 8
    # a lowered maximum takes the count down at once
    tight = Policy(min_replicas=1, max_replicas=3, target_in_flight=8)
    d = decide(policy=tight, samples=series, current=6, now=now_of(series))
    assert d.replicas == 3 and "max_replicas" in d.reason


def test_scale_down_waits_for_the_whole_window():
    # 60 s of 32 in flight, then the load drops to 4
    busy_then_quiet = samples([32] * 60 + [4] * 30)
    d = decide(policy=POLICY, samples=busy_then_quiet, current=4, now=now_of(busy_then_quiet))
    assert d.replicas == 4  # the busy part is still inside the 60 s window
    quiet = samples([32] * 60 + [4] * 70)
    d = decide(policy=POLICY, samples=quiet, current=4, now=now_of(quiet))
    assert d.replicas == 1 and d.figures["highest_in_window"] == 1
    assert "over the last 60 s" in d.reason


def test_a_short_burst_inside_the_window_keeps_the_replicas():
    series = samples([4] * 30 + [24] * 2 + [4] * 40)
    d = decide(policy=POLICY, samples=series, current=3, now=now_of(series))
    # the burst's 6 s average ((2 * 24 + 4 * 4) / 6 = 10.7 -> 2) is within the window
    assert d.replicas == 2


def test_no_scale_down_without_samples_covering_the_window():
    # a control plane that just restarted: 20 s of samples, all quiet
    series = samples([1] * 20)
    d = decide(policy=POLICY, samples=series, current=5, now=now_of(series))
    assert (d.replicas, d.reason) == (5, "steady")


def test_no_scale_down_within_a_window_of_the_last_scale_up():
    series = samples([2] * 120)
    now = now_of(series)
    d = decide(policy=POLICY, samples=series, current=4, now=now, last_scale_up_at=now - 10)
    assert d.replicas == 4 and "scaled up" in d.reason
    d = decide(policy=POLICY, samples=series, current=4, now=now, last_scale_up_at=now - 61)
    assert d.replicas == 1


def test_never_below_min_replicas():
    two = Policy(min_replicas=2, max_replicas=8, target_in_flight=8, idle_before_zero_s=30)
    idle = samples([0] * 120)
    assert decide(policy=two, samples=idle, current=5, now=now_of(idle)).replicas == 2
    d = decide(policy=two, samples=idle, current=1, now=now_of(idle))
    assert d.replicas == 2 and "min_replicas" in d.reason
    # min_replicas 1 never reaches zero, however idle
    assert decide(policy=POLICY, samples=idle, current=1, now=now_of(idle)).replicas == 1


ZERO = Policy(
    min_replicas=0,
    max_replicas=4,
    target_in_flight=8,
    scale_down_window_s=60,
    idle_before_zero_s=30,
)


def test_zero_after_the_idle_period_only():
    series = samples([3] * 20 + [0] * 25)
    assert decide(policy=ZERO, samples=series, current=1, now=now_of(series)).replicas == 1
    series = samples([3] * 20 + [0] * 31)
    d = decide(policy=ZERO, samples=series, current=1, now=now_of(series))
    assert d.replicas == 0 and "no request for 30 s" in d.reason


def test_a_request_finished_between_two_polls_is_not_idle():
    # in flight is 0 at every poll, but the counter moved: requests were served
    series = [Sample(t=1000.0 + i, in_flight=0, requests_total=i // 10) for i in range(60)]
    assert decide(policy=ZERO, samples=series, current=1, now=now_of(series)).replicas == 1


def test_a_waiting_request_scales_from_zero_at_once():
    idle = samples([0] * 100)
    assert decide(policy=ZERO, samples=idle, current=0, now=now_of(idle)).replicas == 0
    woken = [*idle, Sample(t=now_of(idle) + 1, in_flight=1, requests_total=0, waiting=1)]
    d = decide(policy=ZERO, samples=woken, current=0, now=now_of(woken))
    assert d.replicas == 1 and "scale from zero: 1 request(s) waiting" in d.reason
    crowd = [*idle, Sample(t=now_of(idle) + 1, in_flight=60, waiting=60)]
    # 60 held in the 6 s window averages 10 -> 2 replicas straight away
    assert decide(policy=ZERO, samples=crowd, current=0, now=now_of(crowd)).replicas == 2


def test_requests_per_second_target():
    rps = Policy(min_replicas=1, max_replicas=8, target_in_flight=100, target_rps=50)
    # 2 in flight, but 200 requests per second
    series = samples([2] * 10, counter_step=200)
    d = decide(policy=rps, samples=series, current=1, now=now_of(series))
    assert d.replicas == 4 and d.figures["rps"] == 200.0 and "requests/s" in d.reason
    # a router restart (counter back to 0) is not a negative rate
    restarted = [*series, Sample(t=now_of(series) + 1, in_flight=2, requests_total=5)]
    d = decide(policy=rps, samples=restarted, current=4, now=now_of(restarted))
    assert d.replicas == 4
