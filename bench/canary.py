"""Canary rollouts under load, end to end through the REST API of a real control plane
(`python -m controlplane.run`: gunicorn, Celery worker and beat, MLflow) on the local
runtime with real model servers. Candidates are custom pyfuncs (tests/deployments/
canary_support.py) against a baseline that labels ``x > 0.8``:

  (a) fail: raises on ~30 % of inputs          -> aborted in its first step (error rate)
  (b) slow: sleeps --sleep-ms per request       -> aborted on latency
  (c) flip: flipped labels                      -> aborted on prediction divergence (no labels)
  (d) good: identical                           -> promoted through every step, 0 failures

For each: the step the decision came in, the checks that decided, requests and failures in
the candidate's step, the bound ``weight × failure share × requests in the step``, failures
after the abort, and the time from the abort decision to 100 % baseline (as the reconciler
measured it: router rewritten and confirmed), plus the last candidate answer a client saw
after the decision.

Usage: CONTROLPLANE_PORT_RANGE=33000-33499 .venv/bin/python bench/canary.py \
           [--clients 4] [--steps 10:15,50:15] [--only fail,slow,flip,good]
Prints a markdown table. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from bench.harness import Api, control_plane  # noqa: E402
from tests.deployments.canary_support import TimedLoad, model_zip  # noqa: E402

SCENARIOS = {"fail": "(a) fails on ~30 %", "slow": "(b) 10× slower", "flip": "(c) flipped labels",
             "good": "(d) identical"}  # fmt: skip


class Shots:
    """Screenshots of the deployment page in Chromium (``--screenshots DIR``)."""

    def __init__(self, base: str, directory: Path) -> None:
        from playwright.sync_api import sync_playwright

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"]
        )
        self.page = self.browser.new_context(
            viewport={"width": 1366, "height": 1400}, base_url=base
        ).new_page()
        self.page.goto("/")
        self.page.get_by_label("Username").fill("admin")
        self.page.get_by_label("Password").fill("bench-password-1")
        self.page.get_by_role("button", name="Log in").click()
        self.page.wait_for_selector(".userbox .username")

    def take(self, name: str, file: str) -> None:
        self.page.goto(f"/deployments/{name}/")
        self.page.wait_for_timeout(800)  # the chart renders
        self.page.screenshot(path=str(self.directory / file), full_page=True)

    def close(self) -> None:
        self.browser.close()
        self._pw.stop()


def run_scenario(
    api: Api, mode: str, version: str, strategy: dict, clients: int, shots: Shots | None = None
) -> dict:
    name = f"canary-{mode}"
    d = api.call(
        "POST",
        "/deployments",
        {"name": name, "model": "canary", "version": "1", "runtime": "local"},
    )
    port = int(d["endpoint"].rsplit(":", 1)[1])
    while api.call("GET", f"/deployments/{name}")["status"] != "ready":
        time.sleep(0.2)
    with TimedLoad(port, clients=clients) as load:
        time.sleep(2)
        started = time.time()
        api.call("PATCH", f"/deployments/{name}", {"version": version, "strategy": strategy})
        mid_shot = False
        while True:
            got = api.call("GET", f"/deployments/{name}")
            ro = got.get("rollout") or {}
            if shots and not mid_shot and ro.get("step", -1) >= 1 and ro.get("state") == "running":
                shots.take(name, f"{mode}-during.png")
                mid_shot = True
            if ro.get("revision", 0) >= 2 and ro.get("state") in ("promoted", "aborted"):
                if got["status"] == "ready":
                    break
            if time.time() - started > 600:
                raise SystemExit(f"{name}: no decision within 600 s: {ro}")
            time.sleep(0.2)
        time.sleep(2)
    results = load.snapshot()
    if shots:
        shots.take(name, f"{mode}-after.png")
    api.call("DELETE", f"/deployments/{name}")
    final = ro["decisions"][-1]
    decided_at = datetime.fromisoformat(final["at"]).timestamp()
    decision_made = decided_at - final.get("to_baseline_ms", 0) / 1000.0
    # The candidate's last step: from its start to the decision.
    candidate_weight = strategy["steps"][final["step"]]["weight"]
    step_start = datetime.fromisoformat(ro["step_started_at"].replace("Z", "+00:00")).timestamp()
    in_step = [r for r in results if step_start <= r[0] <= decision_made]
    failed_in_step = [r for r in in_step if r[1] != 200]
    failed_after = [r for r in results if r[0] > decided_at and r[1] != 200]
    cand_version = version
    cand_after = [r[0] for r in results if r[0] > decision_made and r[2] == cand_version]
    checks = {c["name"]: c for c in final.get("checks") or []}
    deciding = [
        f"{n} {c['value']:.3g}>{c['threshold']:.3g}" if c["value"] is not None else n
        for n, c in checks.items()
        if c["verdict"] == "fail"
    ]
    return {
        "mode": mode,
        "decision": final["decision"],
        "step": final["step"] + 1,
        "weight": candidate_weight,
        "by": ", ".join(deciding) or "all passed",
        "requests": len(results),
        "in_step": len(in_step),
        "failed_in_step": len(failed_in_step),
        # weight × the candidate's measured failure share (its error rate in the step) ×
        # requests in the step; the nominal share is ~30 % of inputs.
        "bound": candidate_weight
        / 100
        * ((checks.get("error_rate", {}).get("value") or 0.0) if mode == "fail" else 0.0)
        * len(in_step),
        "failed_total": sum(1 for r in results if r[1] != 200),
        "failed_after": len(failed_after),
        "to_baseline_ms": final.get("to_baseline_ms"),
        "last_candidate_s": (max(cand_after) - decision_made) if cand_after else 0.0,
        "p95": {n: checks.get("latency_p95", {}).get(n) for n in ("value", "threshold")},
        "psi": checks.get("prediction_psi", {}).get("value"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", default="10:15,50:15", help="weight:seconds,...")
    parser.add_argument("--only", default="fail,slow,flip,good")
    parser.add_argument("--sleep-ms", type=float, default=30.0, help="the slow candidate's delay")
    parser.add_argument("--min-samples", type=int, default=100)
    parser.add_argument("--screenshots", type=Path, help="save deployment-page screenshots here")
    args = parser.parse_args()
    steps = [
        {"weight": int(w), "seconds": int(s)}
        for w, s in (part.split(":") for part in args.steps.split(","))
    ]
    strategy = {
        "type": "canary",
        "steps": steps,
        "analysis": {"min_samples": args.min_samples},
        "inconclusive_deadline_s": 120,
    }

    rows = []
    with control_plane("bench-canary-") as cp:
        api, work, port = cp.api, cp.work, cp.port
        api.call("POST", "/models", {"name": "canary"})
        versions = {}
        for i, mode in enumerate(["good", "fail", "slow", "flip", "good"], start=1):
            payload = model_zip(work, mode, sleep_s=args.sleep_ms / 1000.0)
            api.call("POST", "/models/canary/versions", files=payload)
            if i > 1:
                versions[mode] = str(i)
        shots = Shots(f"http://127.0.0.1:{port}", args.screenshots) if args.screenshots else None
        for mode in args.only.split(","):
            row = run_scenario(api, mode, versions[mode], strategy, args.clients, shots)
            rows.append(row)
            print(row, flush=True)
        if shots:
            shots.close()
    print()
    print(
        f"local runtime, {args.clients} concurrent clients, steps {args.steps} (weight %:seconds), "
        f"min {args.min_samples} samples per variant"
    )
    print(
        "| candidate | decision | in step (weight) | decided by | requests in step | failed in step "
        "| bound (weight × candidate's failure share × requests) | failed after decision | decision → 100 % baseline "
        "| last candidate answer after decision |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {SCENARIOS[r['mode']]} | {r['decision']} | {r['step']} ({r['weight']} %) | {r['by']} "
            f"| {r['in_step']} | {r['failed_in_step']} | {r['bound']:.0f} | {r['failed_after']} "
            f"| {r['to_baseline_ms'] if r['to_baseline_ms'] is not None else '-'} ms "
            f"| {r['last_candidate_s']:.2f} s |"
        )


if __name__ == "__main__":
    main()
