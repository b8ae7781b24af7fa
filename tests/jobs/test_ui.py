"""The jobs pages: server-rendered views, and live progress bars in a real Chromium."""

from __future__ import annotations

import uuid

import pytest

from jobs import services
from jobs.context import JobContext
from jobs.models import Job
from tests.conftest import with_roles
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS


def running_job(user, *, done: int, total: int) -> tuple[Job, JobContext, str]:
    """A convert job taken by a runner, driven by hand (so the test sets the pace): the
    runner's own steps (acquire, progress), without a kind handler."""
    job = services.job_submit(
        kind="convert",
        input={"model": "churn", "version": 3, "target": "onnx", "quantize": None, "opset": None},
        actor=user,
    )
    owner = uuid.uuid4().hex
    job = services._acquire(job.pk, owner)
    ctx = JobContext(job, lease_owner=owner)
    ctx.progress(done, total)
    ctx.log("converting with skl2onnx")
    return job, ctx, owner


@pytest.mark.django_db
def test_the_pages_show_only_your_jobs_and_cancel_asks_the_runner_to_stop(client, user, other_user):
    job, _, _ = running_job(user, done=3, total=10)
    client.force_login(user)
    page = client.get("/jobs/").content.decode()
    assert f'href="/jobs/{job.pk}/"' in page and 'value="30.0"' in page
    detail = client.get(f"/jobs/{job.pk}/").content.decode()
    assert "converting with skl2onnx" in detail and "Cancel job" in detail
    resp = client.post(f"/jobs/{job.pk}/cancel/")
    assert resp.status_code == 302
    assert Job.objects.get(pk=job.pk).cancel_requested
    client.force_login(other_user)
    assert client.get(f"/jobs/{job.pk}/").status_code == 404
    assert f"/jobs/{job.pk}/" not in client.get("/jobs/").content.decode()


@pytest.mark.django_db
def test_past_its_commit_point_a_job_shows_no_working_cancel_button(client, user):
    job, _, owner = running_job(user, done=3, total=4)
    assert services.job_commit(job_id=job.pk, lease_owner=owner)
    client.force_login(user)
    detail = client.get(f"/jobs/{job.pk}/").content.decode()
    assert "Cancel job" not in detail
    assert "Finishing (cannot cancel)" in detail and 'data-field="cancel" disabled' in detail
    assert "it can no longer be cancelled" in detail
    resp = client.post(f"/jobs/{job.pk}/cancel/", follow=True)
    assert "registering its output and will finish" in resp.content.decode()
    row = Job.objects.get(pk=job.pk)
    assert row.state == "running" and not row.cancel_requested


@pytest.mark.django_db(transaction=True)
def test_progress_bars_move_live_in_a_browser(
    live_server, django_user_model, artifacts, monkeypatch
):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is not installed (run .ci/browser-setup.sh)"
    # Playwright's sync API runs an event loop in this thread, which the test's own ORM calls
    # (the runner's steps) share with it; the browser lives only in this test's body.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            _drive(browser, live_server, django_user_model, artifacts)
        finally:
            browser.close()


def _drive(chromium, live_server, django_user_model, artifacts) -> None:
    user = with_roles(
        django_user_model.objects.create_user(username="erin", password="pw-erin-12345"),
        "model-developer",
    )
    job, ctx, owner = running_job(user, done=10, total=200)
    page = chromium.new_page(viewport={"width": 1366, "height": 800})
    try:
        page.goto(f"{live_server.url}/login/?next=/jobs/")
        page.fill("input[name=username]", "erin")
        page.fill("input[name=password]", "pw-erin-12345")
        page.click("button[type=submit]")
        page.wait_for_url(f"{live_server.url}/jobs/")
        assert page.get_attribute("a[aria-current=page]", "href") == "/jobs/"
        row = page.locator(f"tr[data-job-id='{job.pk}']")
        assert row.locator("[data-field=bar]").evaluate("b => b.value") == 5
        ctx.progress(120, 200)  # the runner moves on: the page follows without a reload
        page.wait_for_function(
            f"document.querySelector(\"tr[data-job-id='{job.pk}'] [data-field=bar]\").value == 60",
            timeout=10_000,
        )
        assert row.locator("[data-field=count]").inner_text() == "120/200"
        assert row.locator("[data-field=state]").inner_text() == "Running"
        page.screenshot(path=str(artifacts / "jobs-list.png"), full_page=True)

        page.click(f"a[href='/jobs/{job.pk}/']")
        page.wait_for_selector("#job-live[data-live]")
        ctx.progress(200, 200)
        assert services._finish(job.pk, owner, "succeeded", result={"version": "4"})
        page.wait_for_selector("#job-live:not([data-live]) .badge-ready", timeout=10_000)
        assert page.locator("#job-live [data-field=state]").inner_text() == "Succeeded"
        assert "'version': '4'" in page.locator("#job-result").inner_text()
        page.screenshot(path=str(artifacts / "jobs-detail.png"), full_page=True)
    finally:
        page.close()
