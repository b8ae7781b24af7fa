"""The deployments UI, through the views, logged in, against a real MLflow store.

Most tests set revision and instance states directly (no processes needed to
render a page); one creates a deployment through the form and converges it with
real model servers.
"""

from __future__ import annotations

import html
import json
import re
import shlex
import urllib.request

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from audit.models import AuditEvent
from deployments import services
from deployments.models import Deployment, DeploymentEvent, Instance, Revision
from tests.deployments.conftest import converge

pytestmark = pytest.mark.django_db


def text(resp) -> str:
    return resp.content.decode()


def messages_of(resp) -> list[str]:
    return [str(m) for m in resp.context["messages"]] if resp.context else []


@pytest.fixture
def model(registered) -> str:
    return registered(2)


def deploy(user, model: str, name: str = "web", **kwargs) -> Deployment:
    return services.deployment_create(
        name=name,
        model_name=model,
        version=kwargs.pop("version", "1"),
        runtime="local",
        actor=user,
        **kwargs,
    )


def serving(d: Deployment, number: int) -> Deployment:
    """Mark revision ``number`` as having gone live and serving, with one ready instance."""
    now = timezone.now()
    d = Deployment.objects.get(pk=d.pk)
    Revision.objects.filter(deployment=d, state=Revision.State.LIVE).update(
        state=Revision.State.SUPERSEDED
    )
    rev = Revision.objects.get(deployment=d, number=number)
    Revision.objects.filter(pk=rev.pk).update(
        state=Revision.State.LIVE, live_at=now, rollout_started_at=now
    )
    Instance.objects.update_or_create(
        deployment=d,
        ordinal=0,
        defaults={
            "revision": rev,
            "runtime": "local",
            "runtime_id": "4242:1",
            "port": d.port + 1000,
            "state": Instance.State.READY,
            "healthy_streak": 3,
            "last_probe_at": now,
        },
    )
    Deployment.objects.filter(pk=d.pk).update(
        serving_revision=rev, status=Deployment.Status.READY, phase=""
    )
    return Deployment.objects.get(pk=d.pk)


def two_revisions(user, model: str, name: str = "web") -> Deployment:
    """r1 went live, then r2 (version 2) replaced it and serves now."""
    d = deploy(user, model, name)
    serving(d, 1)
    services.deployment_update(deployment=d, version="2", actor=user)
    return serving(d, 2)


# --- access --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/deployments/",
        "/deployments/new",
        "/deployments/web/",
        "/deployments/web/logs",
        "/deployments/web/update",
        "/deployments/web/scale",
        "/deployments/web/rollback",
        "/deployments/web/stop",
        "/deployments/web/start",
        "/deployments/web/delete",
    ],
)
def test_anonymous_users_are_sent_to_login(client, url):
    for method in (client.get, client.post):
        resp = method(url)
        assert resp.status_code == 302
        assert resp.url.startswith(reverse("login") + "?next=")


def test_anonymous_posts_change_nothing(client, user, model):
    d = two_revisions(user, model)
    for action in ("rollback", "stop", "delete"):
        client.post(f"/deployments/web/{action}")
    d.refresh_from_db()
    assert d.desired_revision.number == 2 and not d.stopped and not d.deleted


def test_an_unknown_deployment_is_a_404_page(client_logged_in):
    resp = client_logged_in.get("/deployments/nope/")
    assert resp.status_code == 404
    assert "deployment &#x27;nope&#x27; not found" in text(resp)
    assert client_logged_in.post("/deployments/nope/rollback").status_code == 404


# --- list ----------------------------------------------------------------------------------


def test_the_list_shows_each_deployment_at_a_glance(client_logged_in, user, model):
    two_revisions(user, model, "web")
    deploy(user, model, "batch", replicas=2)
    resp = client_logged_in.get("/deployments/")
    assert resp.status_code == 200
    page = text(resp)
    rows = {
        name: re.search(
            rf'<tr>\s*<td><a class="strong" href="/deployments/{name}/">.*?</tr>', page, re.S
        ).group(0)
        for name in ("web", "batch")
    }
    web = Deployment.objects.get(name="web")
    assert "badge-ready" in rows["web"] and ">Ready<" in rows["web"]
    assert model in rows["web"] and '<span class="muted">v2</span>' in rows["web"]
    assert '<td class="nowrap">r2</td>' in rows["web"]
    assert web.endpoint in rows["web"] and '<td class="num">1/1</td>' in rows["web"]
    assert ">Pending<" in rows["batch"] and "0/0" in rows["batch"] and "(wants 2)" in rows["batch"]
    assert (
        '<a href="/deployments/" aria-current="page">Deployments</a>' in page
    )  # the nav lights up


def test_the_list_shows_the_alias_a_deployment_follows(client_logged_in, user, api, model):
    api.post(f"/api/v1/models/{model}/aliases/production", {"version": "2", "reason": "best"})
    services.deployment_create(
        name="follow", model_name=model, alias="production", runtime="local", actor=user
    )
    page = text(client_logged_in.get("/deployments/"))
    assert "@production" in page and "→ v2" in page


def test_the_list_runs_a_constant_number_of_queries(client_logged_in, user, model):
    deploy(user, model, "d0")
    with CaptureQueriesContext(connection) as one:
        client_logged_in.get("/deployments/")
    for i in range(1, 5):
        serving(deploy(user, model, f"d{i}", replicas=2), 1)
    with CaptureQueriesContext(connection) as five:
        resp = client_logged_in.get("/deployments/")
    assert text(resp).count('class="strong" href="/deployments/d') == 5
    assert len(five.captured_queries) == len(one.captured_queries)


def test_a_new_deployment_says_it_waits_for_the_reconciler(client_logged_in, user, model):
    deploy(user, model)
    page = text(client_logged_in.get("/deployments/web/"))
    assert '<p class="muted small" id="dep-queued">Queued: waiting for the reconciler' in page
    assert '<p id="dep-steps" class="small">' in page


def test_an_empty_list_invites_to_deploy(client_logged_in):
    page = text(client_logged_in.get("/deployments/"))
    assert "No deployments yet." in page and 'href="/deployments/new"' in page


# --- create --------------------------------------------------------------------------------


def form_data(model_name: str, **overrides) -> dict:
    data = {
        "name": "web",
        "model": model_name,
        "version": "2",
        "alias": "",
        "runtime": "local",
        "replicas": "2",
        "cpu": "0.5",
        "memory_mb": "512",
    }
    data.update(overrides)
    return data


def test_the_create_form_offers_the_registered_models(client_logged_in, model):
    resp = client_logged_in.get(f"/deployments/new?model={model}&version=2")
    page = text(resp)
    assert resp.status_code == 200
    assert f'<option value="{model}" selected>{model} (latest v2)</option>' in page
    assert 'name="version" value="2"' in page
    assert '<option value="local" selected>local</option>' in page


def test_the_create_form_creates_a_deployment(client_logged_in, user, model):
    resp = client_logged_in.post("/deployments/new", form_data(model))
    assert resp.status_code == 302 and resp.url == "/deployments/web/"
    d = Deployment.objects.get(name="web")
    assert (d.model.name, d.target_version, d.runtime, d.replicas, d.cpu, d.memory_mb) == (
        model,
        2,
        "local",
        2,
        0.5,
        512,
    )
    assert d.created_by == user
    assert d.desired_revision.number == 1 and d.desired_revision.model_version.version == 2
    event = AuditEvent.objects.get(action="deployment.create", object_id="web")
    assert event.actor == user and event.after["version"] == "2" and event.after["replicas"] == 2
    page = text(client_logged_in.get(resp.url))
    assert "Deployment web created: rolling out revision 1." in page


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"name": "Bad_Name"}, "name", "name must be 1-63 lowercase letters"),
        ({"version": "9"}, "version", "version 9 of"),
        ({"version": "one"}, "version", "version &#x27;one&#x27; is not a version number"),
        ({"version": "", "alias": ""}, "version", "give exactly one of"),
        ({"alias": "production"}, "version", "give exactly one of"),
        ({"version": "", "alias": "nope"}, "alias", "has no alias &#x27;nope&#x27;"),
        ({"replicas": "0"}, "replicas", "greater than or equal to 1"),
        ({"cpu": "-1"}, "cpu", "resources.cpu must be a number of cores"),
        ({"model": "no-such-model"}, "model", "Select a valid choice"),
    ],
)
def test_bad_create_input_shows_an_error_and_creates_nothing(
    client_logged_in, model, overrides, field, message
):
    resp = client_logged_in.post("/deployments/new", form_data(model, **overrides))
    assert resp.status_code == 400
    assert message in text(resp)
    assert resp.context["form"].errors[field]
    assert Deployment.objects.count() == 0
    assert not AuditEvent.objects.filter(action__startswith="deployment.").exists()


def test_a_duplicate_name_is_refused_on_the_name_field(client_logged_in, user, model):
    deploy(user, model, "web")
    resp = client_logged_in.post("/deployments/new", form_data(model))
    assert resp.status_code == 400
    assert resp.context["form"].errors["name"] == ["deployment 'web' already exists"]
    assert Revision.objects.count() == 1


def test_with_no_model_the_create_page_sends_to_the_registry(client_logged_in):
    page = text(client_logged_in.get("/deployments/new"))
    assert (
        "There is no registered model version to deploy yet." in page and "Register a model" in page
    )


# --- the deployment page ---------------------------------------------------------------------


def test_the_page_shows_revisions_endpoint_instances_and_events(client_logged_in, user, model):
    d = two_revisions(user, model)
    DeploymentEvent.objects.create(
        deployment=d, kind="traffic", message="traffic moved to r2 from r1"
    )
    resp = client_logged_in.get("/deployments/web/")
    assert resp.status_code == 200
    page = text(resp)
    assert f'<dd class="mono">{d.endpoint}</dd>' in page
    assert f"r2 · {model} v2" in page  # serving revision
    assert "update: version 2" in page and "created" in page  # revision reasons
    assert (
        "traffic moved to r2 from r1" in page
        and f"revision 2: {model} v2 (update: version 2)" in page
    )
    inst = Instance.objects.get(deployment=d)  # 127.0.0.1:PORT, or unix:/path when sandboxed
    assert inst.address.endswith(f"{d.port + 1000}/serving.sock") or inst.address.endswith(
        f":{d.port + 1000}"
    )
    assert inst.address in page and "r2 #0" in page  # the instance
    assert 'href="/deployments/web/rollback?revision=1"' in page  # roll back to r1 from its row
    assert 'href="/deployments/web/rollback?revision=2"' not in page  # r2 is current
    assert "Stop…" in page and "Start…" not in page


def test_the_curl_example_uses_the_saved_input_example(client_logged_in, user, model):
    d = two_revisions(user, model)
    page = html.unescape(text(client_logged_in.get("/deployments/web/")))
    curl = re.search(r'<textarea id="curl-example"[^>]*>(.*?)</textarea>', page, re.S).group(1)
    assert curl.startswith(f"curl -sS -X POST {d.endpoint}/invocations")
    body = json.loads(shlex.split(curl.replace("\\\n", " "))[-1])
    assert body["dataframe_split"]["columns"] == [f"f{i}" for i in range(20)]
    assert len(body["dataframe_split"]["data"]) == 3
    assert "The body is the input example saved with the model." in page


def test_while_deploying_the_page_shows_the_rollout_step_and_polls(client_logged_in, user, model):
    deploy(user, model)
    Deployment.objects.filter(name="web").update(
        status=Deployment.Status.DEPLOYING,
        phase="waiting for readiness",
        status_message="0/1 instances ready",
    )
    page = text(client_logged_in.get("/deployments/web/"))
    steps = re.search(r'<p id="dep-steps" class="small">(.*?)</p>', page, re.S).group(1)
    assert re.findall(r'data-step="[^"]+" class="step-(\w+)"', steps) == [
        "done",
        "done",
        "done",  # preparing environment
        "current",
        "todo",
        "todo",
    ]
    assert '<span class="strong">waiting for readiness</span>' in steps
    assert "0/1 instances ready" in page and 'id="dep-refresh"' in page
    assert '<p class="muted small" id="dep-queued" hidden>' in page  # the reconciler has it
    config = json.loads(re.search(r'id="dep-live-config"[^>]*>(.*?)</script>', page, re.S).group(1))
    assert config["url"] == "/api/v1/deployments/web"
    assert "deploying" not in config["settled"] and "ready" in config["settled"]
    assert 'id="dep-live" aria-live="polite" data-polling>' in page
    assert "controlplane/deployments.js" in page
    # The polled URL answers the browser's session with the live state.
    live = client_logged_in.get(config["url"]).json()
    assert (live["status"], live["phase"]) == ("deploying", "waiting for readiness")


def test_a_settled_page_hides_the_rollout_steps(client_logged_in, user, model):
    two_revisions(user, model)
    page = text(client_logged_in.get("/deployments/web/"))
    assert '<p id="dep-steps" class="small" hidden>' in page
    assert 'id="dep-live" aria-live="polite">' in page  # nothing to wait for: no polling


def test_the_monitoring_tab_appears_only_when_monitoring_exists(client_logged_in, user, model):
    two_revisions(user, model)
    page = text(client_logged_in.get("/deployments/web/"))
    try:
        url = reverse("monitoring:deployment", kwargs={"name": "web"})
    except NoReverseMatch:
        assert ">Monitoring</a>" not in page.split("<main", 1)[1]
    else:
        assert f'href="{url}">Monitoring</a>' in page


def test_the_logs_page_accepts_any_tail(client_logged_in, user, model):
    two_revisions(user, model)
    for tail in ("abc", "0", "999999", "50"):
        resp = client_logged_in.get(f"/deployments/web/logs?tail={tail}")
        assert resp.status_code == 200
        assert "web r2#0" in text(resp)
    assert resp.context["tail"] == 50


# --- update and scale --------------------------------------------------------------------------


def test_update_shows_a_review_then_creates_a_revision(client_logged_in, user, model):
    d = deploy(user, model)
    data = {"version": "2", "alias": "", "replicas": "3", "cpu": "", "memory_mb": ""}
    resp = client_logged_in.post("/deployments/web/update", data)
    assert resp.status_code == 200
    page = text(resp)
    assert "Update web?" in page and "<strong>v2</strong>" in page and "<strong>3</strong>" in page
    assert Revision.objects.filter(deployment=d).count() == 1  # nothing yet
    resp = client_logged_in.post("/deployments/web/update", {**data, "confirm": "yes"})
    assert resp.status_code == 302
    d.refresh_from_db()
    assert (d.desired_revision.number, d.desired_revision.model_version.version, d.replicas) == (
        2,
        2,
        3,
    )
    assert AuditEvent.objects.filter(
        action="deployment.update", object_id="web", actor=user
    ).exists()


def test_an_update_to_an_unknown_version_shows_an_error(client_logged_in, user, model):
    d = deploy(user, model)
    resp = client_logged_in.post(
        "/deployments/web/update", {"version": "7", "replicas": "1", "confirm": "yes"}
    )
    assert resp.status_code == 400
    assert resp.context["form"].errors["version"] == [f"version 7 of '{model}' not found"]
    assert Revision.objects.filter(deployment=d).count() == 1


def test_an_update_that_changes_nothing_says_so(client_logged_in, user, model):
    deploy(user, model)
    resp = client_logged_in.post(
        "/deployments/web/update", {"replicas": "1", "confirm": "yes"}, follow=True
    )
    assert "Nothing changed: no new revision." in messages_of(resp)
    assert Revision.objects.count() == 1


def test_scale_changes_only_the_replicas(client_logged_in, user, model):
    d = deploy(user, model, resources={"cpu": 0.5})
    page = text(client_logged_in.post("/deployments/web/scale", {"replicas": "4"}))
    assert "Scale web?" in page and "Scale to 4" in page
    client_logged_in.post("/deployments/web/scale", {"replicas": "4", "confirm": "yes"})
    d.refresh_from_db()
    assert d.replicas == 4 and d.desired_revision.spec["replicas"] == 4 and d.cpu == 0.5
    assert d.desired_revision.model_version.version == 1


# --- rollback, stop, start, delete --------------------------------------------------------------


def test_rollback_asks_first_then_rolls_back_on_post(client_logged_in, user, model):
    d = two_revisions(user, model)
    resp = client_logged_in.get("/deployments/web/rollback")
    assert resp.status_code == 200
    page = text(resp)
    assert "Roll back web?" in page and 'name="revision" value="1"' in page
    assert 'name="revision" value="2"' not in page  # the current revision is no choice
    d.refresh_from_db()
    assert d.desired_revision.number == 2
    resp = client_logged_in.post(
        "/deployments/web/rollback", {"revision": "", "reason": "latency up"}, follow=True
    )
    assert "Rolling back to revision 1." in messages_of(resp)
    d.refresh_from_db()
    assert d.desired_revision.number == 1 and d.status == Deployment.Status.DEPLOYING
    event = AuditEvent.objects.get(action="deployment.rollback", object_id="web")
    assert event.actor == user and event.after["reason"] == "latency up"


def test_rollback_to_a_chosen_revision(client_logged_in, user, model):
    d = two_revisions(user, model)
    services.deployment_update(deployment=d, replicas=2, actor=user)  # r3, not live yet
    client_logged_in.post("/deployments/web/rollback", {"revision": "1"})
    d.refresh_from_db()
    assert d.desired_revision.number == 1


def test_a_refused_rollback_shows_the_reason(client_logged_in, user, model):
    d = deploy(user, model)
    resp = client_logged_in.post("/deployments/web/rollback", {"revision": ""}, follow=True)
    assert resp.status_code == 200
    assert messages_of(resp) == [
        "Rollback refused: there is no earlier revision that served successfully"
    ]
    resp = client_logged_in.post("/deployments/web/rollback", {"revision": "x"}, follow=True)
    assert messages_of(resp) == ["'x' is not a revision number."]
    d.refresh_from_db()
    assert d.desired_revision.number == 1
    assert not AuditEvent.objects.filter(action="deployment.rollback").exists()


def test_after_a_rollback_pages_show_what_the_earlier_revision_runs(client_logged_in, user, model):
    d = deploy(user, model)  # r1: v1 x 1
    serving(d, 1)
    services.deployment_update(deployment=d, version="2", replicas=3, actor=user)  # r2: v2 x 3
    serving(d, 2)
    client_logged_in.post("/deployments/web/rollback", {"revision": "1"})
    page = text(client_logged_in.get("/deployments/web/"))
    assert re.search(r'<p class="lead">.*?</a>\s*v1\s*·.*?· 1 replica</p>', page, re.S)
    row = (
        text(client_logged_in.get("/deployments/"))
        .split('href="/deployments/web/"')[1]
        .split("</tr>")[0]
    )
    assert '<span class="muted">v1</span>' in row and "(wants 3)" not in row
    form = client_logged_in.get("/deployments/web/update").context["form"]
    assert form.initial["replicas"] == 1
    assert "Now: <strong>" + model + " v1</strong>" in text(
        client_logged_in.get("/deployments/web/update")
    )


def test_stop_and_start_ask_first(client_logged_in, user, model):
    d = two_revisions(user, model)
    page = text(client_logged_in.get("/deployments/web/stop"))
    assert "Stop web?" in page and "Yes, stop web" in page
    d.refresh_from_db()
    assert not d.stopped
    client_logged_in.post("/deployments/web/stop")
    d.refresh_from_db()
    assert d.stopped
    assert AuditEvent.objects.filter(action="deployment.stop", object_id="web", actor=user).exists()
    page = text(client_logged_in.get("/deployments/web/"))
    assert (
        "Start…" in page
        and "Stop requested: the instances and the endpoint are being shut down." in page
    )
    config = json.loads(re.search(r'id="dep-live-config"[^>]*>(.*?)</script>', page, re.S).group(1))
    assert (
        config["settled"] == ["stopped"] and "data-polling" in page
    )  # until the reconciler stopped it
    Deployment.objects.filter(pk=d.pk).update(
        status=Deployment.Status.STOPPED
    )  # as the reconciler would
    page = text(client_logged_in.get("/deployments/web/"))
    assert (
        "Stopped: nothing runs and the endpoint does not answer." in page
        and "data-polling" not in page
    )
    client_logged_in.post("/deployments/web/start")
    d.refresh_from_db()
    assert not d.stopped
    page = text(client_logged_in.get("/deployments/web/"))
    assert "Start requested" in page and "data-polling" in page
    assert AuditEvent.objects.filter(
        action="deployment.start", object_id="web", actor=user
    ).exists()


def test_delete_asks_first_then_marks_the_deployment_deleted(client_logged_in, user, model):
    d = two_revisions(user, model)
    page = text(client_logged_in.get("/deployments/web/delete"))
    assert "Delete web?" in page and "cannot be undone" in page
    d.refresh_from_db()
    assert not d.deleted
    resp = client_logged_in.post("/deployments/web/delete", follow=True)
    assert resp.redirect_chain[-1][0] == "/deployments/"
    d.refresh_from_db()
    assert d.deleted and d.stopped
    assert "/deployments/web/" not in text(resp)
    assert AuditEvent.objects.filter(
        action="deployment.delete", object_id="web", actor=user
    ).exists()
    assert client_logged_in.get("/deployments/web/").status_code == 404


# --- for real ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_deployment_created_in_the_ui_becomes_ready_and_serves(client_logged_in, model):
    resp = client_logged_in.post(
        "/deployments/new",
        form_data(model, name="live", version="1", replicas="1", cpu="", memory_mb=""),
    )
    assert resp.status_code == 302
    d = converge("live")
    page = text(client_logged_in.get("/deployments/live/"))
    inst = Instance.objects.get(deployment=d)
    assert re.search(r'id="dep-status">Ready<', page)
    assert inst.address in page and ">Ready</span>" in page.split('id="dep-instances"')[1]
    assert "traffic moved to r1" in page
    # The copyable example is a working request.
    curl = html.unescape(
        re.search(r'<textarea id="curl-example"[^>]*>(.*?)</textarea>', page, re.S).group(1)
    )
    body = shlex.split(curl.replace("\\\n", " "))[-1]
    req = urllib.request.Request(
        f"{d.endpoint}/invocations",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as out:
        assert len(json.loads(out.read())["predictions"]) == 3
    assert "ready" in page.split("<h2>Logs</h2>")[1]  # the server's own log lines


def test_after_a_rollback_a_following_deployment_says_it_is_pinned(
    client_logged_in, user, api, model
):
    api.post(f"/api/v1/models/{model}/aliases/production", {"version": "1", "reason": "first"})
    d = services.deployment_create(
        name="follow", model_name=model, alias="production", runtime="local", actor=user
    )
    serving(d, 1)
    page = text(client_logged_in.get("/deployments/follow/"))
    assert "following" in page and "pinned" not in page
    api.post(f"/api/v1/models/{model}/aliases/production", {"version": "2", "reason": "better"})
    services.deployment_follow_alias(deployment_id=d.pk)
    serving(d, 2)
    client_logged_in.post("/deployments/follow/rollback", {"revision": "1"})
    page = text(client_logged_in.get("/deployments/follow/"))
    assert "following" not in page.split('<p class="lead">')[1].split("</p>")[0]
    assert re.search(r"pinned to v1 by rollback; <span[^>]*>@production</span> is v2", page)
    row = text(client_logged_in.get("/deployments/")).split('href="/deployments/follow/"')[1]
    assert "(@production is v2)" in row.split("</tr>")[0] and "→ v1" not in row.split("</tr>")[0]
