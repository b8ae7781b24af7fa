"""Pages fit at 800 and 1,440 px: no page wider than the window, in Chromium.

The test's live server renders pages from real rows (a model with two versions from a
real MLflow run, a deployment with revisions and a rollback); no model server is
needed to draw them. Screenshots of each page at each width go to
test-artifacts/e2e/narrow/.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import Browser

from deployments import services
from tests.deployments.test_ui import deploy, serving

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

WIDTHS = (800, 1440)


@pytest.fixture
def site(api, user, model_name, model_zip, logged_run):
    """A model with two versions (metrics and parameters from a run), a deployment of
    it that went v1 -> v2 with several revisions, and was rolled back."""
    assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
    assert api.upload(f"/api/v1/models/{model_name}/versions", model_zip).status_code == 201
    resp = api.post(f"/api/v1/models/{model_name}/versions", {"source": logged_run["source"]})
    assert resp.status_code == 201, resp.content
    api.post(f"/api/v1/models/{model_name}/aliases/production", {"version": "2", "reason": "r"})
    d = deploy(user, model_name, "churn-web-production-eu")
    serving(d, 1)
    services.deployment_update(
        deployment=d,
        version="2",
        replicas=3,
        env={"FEATURE_FLAGS": "a-rather-long-value-" * 4},
        actor=user,
    )
    serving(d, 2)
    services.deployment_rollback(
        deployment=d, actor=user, reason="latency went up after the v2 rollout " * 3
    )
    return {"model": model_name, "deployment": d.name}


def _pages(site: dict) -> dict[str, str]:
    m, d = site["model"], site["deployment"]
    return {
        "models": "/",
        "model": f"/models/{m}/",  # the versions table
        "version": f"/models/{m}/versions/2/",
        "compare": f"/models/{m}/compare?versions=1&versions=2",
        "history": f"/models/{m}/history",
        "deployments": "/deployments/",
        "deployment": f"/deployments/{d}/",  # revisions, instances, events
        "update": f"/deployments/{d}/update",
        "rollback": f"/deployments/{d}/rollback",
        "tokens": "/tokens/",
    }


def test_every_page_fits_at_800_and_1440_px(
    live_server, site, chromium_with_db: Browser, artifacts
):
    shots = artifacts / "narrow"
    shots.mkdir(exist_ok=True)
    context = chromium_with_db.new_context(base_url=live_server.url)
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto("/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{live_server.url}/")
    too_wide = []
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        for name, url in _pages(site).items():
            resp = page.goto(url)
            assert resp is not None and resp.status == 200, f"{url}: {resp and resp.status}"
            page.screenshot(path=str(shots / f"{width}-{name}.png"), full_page=True)
            scroll, inner = page.evaluate(
                "[document.documentElement.scrollWidth, window.innerWidth]"
            )
            if scroll > inner:
                too_wide.append(f"{name} at {width}px: {scroll}px wide")
    assert too_wide == [], too_wide

    # Compare: the version pickers and the columns in the same order, and every column's
    # header aligned as its values.
    page.goto(_pages(site)["compare"])
    pickers = page.locator("fieldset.inline-checks label").all_inner_texts()
    columns = page.locator("table.compare thead th").all_inner_texts()[1:]
    assert [p.strip() for p in pickers] == [c.strip() for c in columns] == ["v1", "v2"]
    aligns = page.evaluate(
        """() => [...document.querySelectorAll('table.compare tr')].map(tr =>
            [...tr.children].slice(1).map(c => getComputedStyle(c).textAlign))
            .filter(row => row.length > 1)"""
    )
    assert aligns and all(row == aligns[0] for row in aligns), aligns
    context.close()
