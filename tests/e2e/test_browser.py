"""A user's journey through the running control plane, in headless Chromium.

Everything is real: ``python -m controlplane.run`` (gunicorn, Celery worker and
beat, the reconciler, an MLflow server), the model servers a deployment starts,
and the browser. Each page visited is saved as a screenshot under
``test-artifacts/e2e/`` so a reviewer can see what the user saw.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.e2e.conftest import VIEWPORT, ControlPlane

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MODEL = "churn"
DEPLOYMENT = "churn-web"
APPROVER = ("bob", "bob-approves-42")
STEP_TIMEOUT_MS = 30_000
MLFLOW_TIMEOUT_MS = 90_000  # the first MLflow call of a web worker imports mlflow
ROLLOUT_TIMEOUT_MS = 120_000


class Screens:
    """Numbered full-page screenshots, in the order the user saw the pages."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0
        self.started = time.monotonic()
        for old in directory.glob("*.png"):
            old.unlink()

    def __call__(self, page: Page, name: str) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"[{time.monotonic() - self.started:6.1f}s] {path.name}")
        return path


def _log_in(browser: Browser, cp: ControlPlane, username: str, password: str) -> Page:
    page = browser.new_context(viewport=VIEWPORT, base_url=cp.url).new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login/"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".userbox .username")).to_have_text(username)
    return page


def _message(page: Page) -> str:
    return page.locator("ul.messages").inner_text()


def _log_training_run(cp: ControlPlane, model_dir: Path) -> str:
    """What a data scientist does: log a run with metrics and the model to the
    control plane's MLflow server. Returns the run's model URI."""
    from mlflow import MlflowClient

    # The server refuses anonymous callers: here the control plane's credential from the
    # data dir (a person would use their own, from Tokens -> MLflow credential).
    os.environ["MLFLOW_TRACKING_USERNAME"] = "controlplane"
    os.environ["MLFLOW_TRACKING_PASSWORD"] = (
        (cp.data_dir / "mlflow" / "auth" / "controlplane.password").read_text().strip()
    )
    client = MlflowClient(tracking_uri=cp.mlflow_url)
    experiment_id = client.create_experiment("churn-training")
    run_id = client.create_run(experiment_id, run_name="logreg-c1").info.run_id
    client.log_metric(run_id, "accuracy", 0.931)
    client.log_metric(run_id, "f1", 0.912)
    client.log_param(run_id, "C", "1.0")
    client.log_artifacts(run_id, str(model_dir), "model")
    client.set_terminated(run_id)
    return f"runs:/{run_id}/model"


def _curl_call(page: Page) -> tuple[str, bytes]:
    """The URL and body of the copyable curl command on the deployment page."""
    command = page.locator("#curl-example").input_value().replace("\\\n", " ")
    args = shlex.split(command)
    url = next(a for a in args if a.startswith("http"))
    return url, args[args.index("-d") + 1].encode()


def _predict(url: str, body: bytes) -> tuple[str, list]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
        return resp.headers["X-Model-Version"], json.loads(resp.read())["predictions"]


def _served_version_becomes(url: str, body: bytes, version: str, timeout: float = 30) -> list:
    """Traffic switches once the new instances are ready; until then the old one answers."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen, predictions = _predict(url, body)
        if seen == version:
            return predictions
        time.sleep(0.3)
    raise AssertionError(f"the endpoint still serves version {seen}, not {version}")


def _wait_until_serving(page: Page, revision: int, version: int) -> None:
    """The page polls while it rolls out and reloads once it has settled."""
    expect(page.locator("#dep-status")).to_have_text("Ready", timeout=ROLLOUT_TIMEOUT_MS)
    expect(page.locator("#dep-serving")).to_have_text(
        f"r{revision} · {MODEL} v{version}", timeout=ROLLOUT_TIMEOUT_MS
    )
    expect(page.locator("#dep-ready")).to_have_text("1/1", timeout=ROLLOUT_TIMEOUT_MS)


@pytest.mark.timeout(420)  # about 2 minutes here, a third of it starting the control plane
def test_a_user_uploads_promotes_with_approval_deploys_rolls_back_and_monitors(
    chromium: Browser,
    control_plane: ControlPlane,
    model_zip: bytes,
    sklearn_model_dir: Path,
    artifacts: Path,
    tmp_path: Path,
) -> None:
    cp = control_plane
    shot = Screens(artifacts)

    # --- log in ---------------------------------------------------------------------------
    login = chromium.new_context(viewport=VIEWPORT, base_url=cp.url).new_page()
    login.goto("/")
    expect(login.get_by_role("heading", name="Log in")).to_be_visible()
    shot(login, "login")
    login.context.close()
    page = _log_in(chromium, cp, "admin", cp.admin_password)
    expect(page.get_by_role("heading", name="Models", exact=True)).to_be_visible()
    shot(page, "models-empty")

    # --- upload version 1 as a zip -------------------------------------------------------
    archive = tmp_path / "churn-model.zip"
    archive.write_bytes(model_zip)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Upload").click()
    upload = page.locator("form", has=page.locator("input[name=kind][value=upload]"))
    upload.get_by_label("Model name").fill(MODEL)
    upload.get_by_label("Model archive (.zip)").set_input_files(archive)
    upload.get_by_label("Description").fill("Logistic regression on 20 features.")
    shot(page, "upload-form")
    upload.get_by_role("button", name="Upload and register").click(timeout=MLFLOW_TIMEOUT_MS)
    expect(page).to_have_url(re.compile(rf"/models/{MODEL}/versions/1/$"))
    assert f"Registered {MODEL} version 1." in _message(page)
    signature = page.locator("section.card", has=page.get_by_role("heading", name="Signature"))
    inputs = signature.locator("table").first
    expect(inputs.locator("tbody tr")).to_have_count(20)
    expect(inputs).to_contain_text("f0")
    expect(inputs).to_contain_text("f19")
    expect(inputs).to_contain_text("double")
    expect(page.locator("section.card", has_text="Input example")).to_contain_text('"columns"')
    expect(page.locator(".kv")).to_contain_text("sklearn")
    shot(page, "version-1")

    # --- version 2: a training run logged to MLflow, registered from the UI ---------------
    source = _log_training_run(cp, sklearn_model_dir)
    page.goto(f"/models/new?model={MODEL}")
    register = page.locator("form", has=page.locator("input[name=kind][value=source]"))
    expect(register.get_by_label("Model name")).to_have_value(MODEL)
    register.get_by_label("MLflow URI").fill(source)
    register.get_by_role("button", name="Register").click(timeout=MLFLOW_TIMEOUT_MS)
    expect(page).to_have_url(re.compile(rf"/models/{MODEL}/versions/2/$"))
    metrics = page.locator("section.card", has=page.get_by_role("heading", name="Metrics"))
    expect(metrics.locator("tbody tr", has_text="accuracy")).to_contain_text("0.931")
    expect(metrics.locator("tbody tr", has_text="f1")).to_contain_text("0.912")
    params = page.locator("section.card", has=page.get_by_role("heading", name="Parameters"))
    expect(params.locator("tbody tr", has_text="C")).to_contain_text("1.0")
    expect(signature.locator("table").first.locator("tbody tr")).to_have_count(20)
    shot(page, "version-2")
    page.get_by_role("link", name=MODEL, exact=True).first.click()
    expect(page.locator("#compare-form tbody tr")).to_have_count(2)
    shot(page, "model")

    # --- the admin: an approval gate on @production, and an approver -----------------------
    page.goto("/admin/registry/approvalpolicy/add/")
    page.get_by_label("Alias").fill("production")
    page.get_by_label("Model").select_option(label=MODEL)
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator(".messagelist")).to_contain_text("was added successfully")
    policy = page.locator("#result_list tbody tr")
    expect(policy).to_have_count(1)
    expect(policy.locator("th")).to_have_text("production")
    expect(policy.locator("td").nth(1)).to_have_text(MODEL)
    shot(page, "admin-approval-policy")

    page.goto("/admin/auth/user/add/")
    page.get_by_label("Username").fill(APPROVER[0])
    page.locator("#id_password1").fill(APPROVER[1])
    page.locator("#id_password2").fill(APPROVER[1])
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator(".messagelist")).to_contain_text("was added successfully")
    page.locator("#id_groups_input").press_sequentially("approver")  # the approver role
    page.locator("#id_groups_from option", has_text="approver").dblclick()
    expect(page.locator("#id_groups_to option")).to_have_count(1)
    shot(page, "admin-approver")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator(".messagelist")).to_contain_text("was changed successfully")

    # --- promote v1 to staging (no approval) -----------------------------------------------
    page.goto(f"/models/{MODEL}/versions/1/")
    page.get_by_role("link", name="Promote…").click()
    expect(page.get_by_label("Version")).to_have_value("1")
    page.get_by_label("Alias").fill("staging")
    page.get_by_label("Reason").fill("Offline evaluation passed: AUC 0.97 on the holdout set.")
    shot(page, "promote-form")
    page.get_by_role("button", name="Review…").click()
    expect(page.locator(".confirm")).to_contain_text("The alias moves immediately")
    shot(page, "promote-staging-confirm")
    page.get_by_role("button", name="Promote now").click()
    assert "@staging now points at version 1." in _message(page)

    # --- promote v1 to production: needs approval ------------------------------------------
    page.goto(f"/models/{MODEL}/promote?version=1&alias=production")
    page.get_by_label("Reason").fill("A week in staging without incidents.")
    page.get_by_role("button", name="Review…").click()
    expect(page.locator(".confirm")).to_contain_text("Approval required.")
    shot(page, "promote-production-confirm")
    page.get_by_role("button", name="Request approval").click()
    assert re.search(r"waiting for approval \(request #\d+\)", _message(page))
    shot(page, "model-pending")

    # --- the approver approves it in the inbox ----------------------------------------------
    approver = _log_in(chromium, cp, *APPROVER)
    nav_count = approver.get_by_role("navigation", name="Main").locator(".count")
    expect(nav_count).to_have_text("1")
    approver.get_by_role("link", name=re.compile(r"^Approvals")).click()
    request = approver.locator("article.request")
    expect(request).to_have_count(1)
    expect(request).to_contain_text("v1 → @production")
    expect(request).to_contain_text("requested by admin")
    expect(request).to_contain_text("A week in staging without incidents.")
    shot(approver, "approvals-inbox")
    request.get_by_label("Comment").fill("Checked the staging dashboards.")
    request.get_by_role("button", name="Approve").click()
    assert f"Approved: {MODEL}@production now points at version 1." in _message(approver)
    decided = approver.locator("table tbody tr").first
    expect(decided).to_contain_text("Approved")
    expect(decided).to_contain_text("Checked the staging dashboards.")
    shot(approver, "approvals-decided")
    approver.context.close()

    # --- the history shows both moves, with reasons and the approver -------------------------
    page.goto(f"/models/{MODEL}/history")
    rows = page.locator("table tbody tr")
    expect(rows).to_have_count(2)
    production, staging = rows.nth(0), rows.nth(1)  # newest first
    expect(production).to_contain_text("@production")
    expect(production.locator("td").nth(3)).to_have_text("v1")
    expect(production).to_contain_text("A week in staging without incidents.")
    expect(production.locator("td").nth(4)).to_have_text("admin")
    expect(production.locator("td").nth(7)).to_have_text(APPROVER[0])
    expect(staging).to_contain_text("@staging")
    expect(staging).to_contain_text("Offline evaluation passed")
    expect(staging.locator("td").nth(7)).to_have_text("—")
    shot(page, "history")

    # --- deploy @production with the local runtime and watch it become ready -----------------
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Deployments").click()
    page.get_by_role("link", name="New deployment").click()
    page.get_by_label("Name").fill(DEPLOYMENT)
    page.get_by_label("Model").select_option(MODEL)
    page.get_by_label("Alias").fill("production")
    page.get_by_label("Runtime").select_option("local")
    page.get_by_label("Replicas").fill("1")
    shot(page, "deployment-form")
    page.get_by_role("button", name="Create deployment").click()
    expect(page).to_have_url(re.compile(rf"/deployments/{DEPLOYMENT}/$"))
    assert f"Deployment {DEPLOYMENT} created" in _message(page)
    expect(page.locator("#dep-live-note")).to_be_visible()  # it polls while rolling out
    shot(page, "deployment-rolling-out")
    _wait_until_serving(page, revision=1, version=1)
    expect(page.locator("#dep-live-note")).to_be_hidden()
    shot(page, "deployment-ready")

    url, body = _curl_call(page)
    version, predictions = _predict(url, body)
    assert version == "1"
    assert len(predictions) == 3 and set(predictions) <= {0, 1}

    # --- update to v2, then roll back from the admin -----------------------------------------
    page.get_by_role("link", name="Update…").click()
    page.get_by_label("Version").fill("2")
    page.get_by_role("button", name="Review…").click()
    expect(page.locator(".confirm table")).to_contain_text("v2")
    page.get_by_role("button", name="Update now").click()
    assert "Revision 2 created" in _message(page)
    _wait_until_serving(page, revision=2, version=2)
    _served_version_becomes(url, body, "2")

    page.goto("/admin/deployments/deployment/")
    page.locator("#result_list tr", has_text=DEPLOYMENT).locator("input.action-select").check()
    page.locator("select[name=action]").select_option(label="Roll back to the previous revision")
    shot(page, "admin-rollback")
    page.get_by_role("button", name="Go").click()
    # The action asks first, as Django's delete does.
    expect(page.locator("#rollback-list")).to_contain_text(DEPLOYMENT)
    shot(page, "admin-rollback-confirm")
    page.get_by_role("button", name="Yes, roll back").click()
    expect(page.locator(".messagelist")).to_contain_text(f"Rolling back: {DEPLOYMENT}.")
    page.goto(f"/deployments/{DEPLOYMENT}/")
    _wait_until_serving(page, revision=1, version=1)
    events = page.locator("section.card", has=page.get_by_role("heading", name="Events"))
    expect(events).to_contain_text("rollback from r2 to r1: admin rollback")
    shot(page, "deployment-rolled-back")
    _served_version_becomes(url, body, "1")
    for _ in range(20):  # some traffic for the charts
        assert _predict(url, body)[0] == "1"

    page.goto("/audit/")
    who = {  # newest row of each action -> its actor
        action: page.locator("table.audit tbody tr", has_text=action).first.locator("td").nth(1)
        for action in ("deployment.rollback", "deployment.create", "promotion.approve")
    }
    expect(who["deployment.rollback"]).to_have_text("admin")
    expect(who["deployment.create"]).to_have_text("admin")
    expect(who["promotion.approve"]).to_have_text(APPROVER[0])
    shot(page, "audit")

    # --- monitoring: the fleet and the deployment's charts -----------------------------------
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Monitoring").click()
    fleet_row = page.locator("table.fleet tbody tr", has_text=DEPLOYMENT)
    expect(fleet_row).to_contain_text("v1")
    shot(page, "monitoring-fleet")
    fleet_row.get_by_role("link", name=DEPLOYMENT).click()
    expect(page).to_have_url(re.compile(rf"/monitoring/deployments/{DEPLOYMENT}/"))
    page.get_by_role("link", name="1h", exact=True).click()
    no_throughput = page.locator(
        "section.chart", has=page.locator("#chart-throughput")
    ).get_by_text("No data in this range.")
    deadline = time.monotonic() + 30  # the collector scrapes the servers every 2 s
    while no_throughput.is_visible() and time.monotonic() < deadline:
        _predict(url, body)
        page.wait_for_timeout(2000)
        page.reload()
    expect(no_throughput).to_have_count(0)
    assert page.evaluate("typeof window.Plotly") == "object"
    # plotly.js (4.8 MB) has a hashed name and is cached for good (ManifestStaticFilesStorage).
    plotly_src = page.locator("script[src*='plotly']").first.get_attribute("src")
    assert re.search(r"/plotly\.min\.[0-9a-f]{12}\.js(\?|$)", plotly_src), plotly_src
    cache_control = page.request.get(plotly_src).headers["cache-control"]
    assert "immutable" in cache_control and "max-age=315360000" in cache_control, cache_control
    chart_ids = page.locator(".chart .plotly-graph-div").evaluate_all("els => els.map(e => e.id)")
    assert {"chart-latency", "chart-throughput", "chart-errors", "chart-accuracy"} <= set(chart_ids)
    for chart_id in chart_ids:
        expect(page.locator(f"#{chart_id} svg.main-svg").first).to_be_visible()
    # The throughput line of v1 was drawn, with its deploy and rollback markers.
    expect(page.locator("#chart-throughput .scatterlayer .trace")).not_to_have_count(0)
    expect(page.locator("#chart-throughput .legendtext", has_text="v1")).to_have_count(1)
    rollback_marker = page.locator("#chart-throughput .annotation-text", has_text="rollback r1")
    expect(rollback_marker.first).to_be_visible()
    shot(page, "monitoring-deployment")
    page.context.close()
