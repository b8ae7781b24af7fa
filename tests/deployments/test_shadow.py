"""Shadow traffic end to end on the local runtime: real model servers, the real router,
real MLflow; the reconciler runs as the Celery task would."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest

from audit.models import AuditEvent
from deployments import router
from deployments.models import Deployment, Instance, Revision, ShadowPair, ShadowRun
from tests.conftest import zip_dir
from tests.deployments.conftest import converge

pytestmark = [pytest.mark.django_db, pytest.mark.slow, pytest.mark.timeout(600)]

COLUMNS = [f"f{i}" for i in range(20)]


@pytest.fixture(scope="module")
def flipped_zip(tmp_path_factory) -> bytes:
    """The test model's twin trained on flipped labels: it predicts the other class."""
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    import sklearn
    import skops
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(200, 20)), columns=COLUMNS)
    y = 1 - (X["f0"] + X["f1"] > 0).astype(int)
    model = LogisticRegression(max_iter=200).fit(X, y)
    path = tmp_path_factory.mktemp("flipped") / "model"
    mlflow.sklearn.save_model(
        model, str(path), signature=infer_signature(X, model.predict(X)),
        pip_requirements=[f"scikit-learn=={sklearn.__version__}", f"mlflow=={mlflow.__version__}",
                          f"skops=={skops.__version__}"],
    )  # fmt: skip
    return zip_dir(path)


def predict(endpoint: str, row: list[float]) -> str:
    body = json.dumps({"dataframe_split": {"columns": COLUMNS, "data": [row]}}).encode()
    req = urllib.request.Request(
        f"{endpoint}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.headers["X-Model-Version"]


def rows(n: int) -> list[list[float]]:
    return [[((i * 7 + j) % 11 - 5) / 3.0 for j in range(20)] for i in range(n)]


def sched_policies(inst: Instance) -> set[int]:
    """The scheduling policies of every thread of an instance's server process."""
    pid = int(inst.runtime_id.split(":")[0])
    return {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def mirroring(run_id: int):
    return lambda d: ShadowRun.objects.get(pk=run_id).mirroring_since is not None


def pairs_at_least(run_id: int, n: int):
    return lambda d: ShadowPair.objects.filter(run_id=run_id).count() >= n


def test_shadow_mirrors_reports_agreement_and_promotes_through_the_rollout(
    api, registered, flipped_zip
):
    name = registered(2)  # v1 and v2: the same files
    registered(1, payload=flipped_zip)  # v3: predicts the other class
    resp = api.post(
        "/api/v1/deployments",
        {"name": "shadowed", "model": name, "version": "1", "runtime": "local"},
    )
    assert resp.status_code in (201, 202), resp.content
    d = converge("shadowed")
    url = "/api/v1/deployments/shadowed"

    # 1. An identical candidate at 100 %: every answer agrees.
    assert api.patch(url, {"shadow": {"version": "2", "fraction": 1.0}}).status_code == 200
    run = ShadowRun.objects.get(deployment=d, state="active")
    converge("shadowed", until=mirroring(run.pk))
    shadow_inst = Instance.objects.get(revision=run.revision)
    # Best effort: the candidate's server runs at idle CPU priority, the primary's does not.
    assert sched_policies(shadow_inst) == {os.SCHED_IDLE}
    assert sched_policies(Instance.objects.get(revision=d.serving_revision)) == {os.SCHED_OTHER}
    mirror = json.loads(router.backends_file("shadowed").read_text())["mirror"]
    assert mirror["backends"] == [shadow_inst.address] and mirror["fraction"] == 1.0
    assert [predict(d.endpoint, row) for row in rows(30)] == ["1"] * 30  # the primary answers
    converge("shadowed", until=pairs_at_least(run.pk, 30))
    shown = api.get(url).json()["shadow"]
    report = shown["report"]
    assert shown["version"] == "2" and shown["mirroring"]
    assert report["compared"] == 30 and report["agreement"] == 1.0
    assert report["outputs"]["predictions"]["max_abs_diff"] == 0.0
    assert report["mirror"]["sent"] == 30 and report["mirror"]["dropped"] == 0
    assert report["candidate"]["error_rate"] == 0.0
    assert report["primary"]["latency_ms"]["p50"] > 0 and report["candidate"]["latency_ms"]["p99"]

    # A crashed shadow server never fails a caller; the reconciler restarts it (desired state
    # in the database) and mirroring resumes to the new process.
    os.kill(int(shadow_inst.runtime_id.split(":")[0]), signal.SIGKILL)
    assert [predict(d.endpoint, row) for row in rows(10)] == ["1"] * 10
    converge(
        "shadowed",
        until=lambda x: (
            Instance.objects.get(pk=shadow_inst.pk).restarts == 1
            and Instance.objects.get(pk=shadow_inst.pk).state == "ready"
            and "mirror" in json.loads(router.backends_file("shadowed").read_text())
        ),
    )

    # 2. A different candidate replaces it: agreement drops below 1; the old one is drained.
    assert api.patch(url, {"shadow": {"version": "3", "fraction": 1.0}}).status_code == 200
    run3 = ShadowRun.objects.get(deployment=d, state="active")
    assert ShadowRun.objects.get(pk=run.pk).state == "stopped"
    converge("shadowed", until=mirroring(run3.pk))
    assert [predict(d.endpoint, row) for row in rows(30)] == ["1"] * 30
    converge(
        "shadowed",
        until=lambda x: (
            pairs_at_least(run3.pk, 30)(x)
            and not Instance.objects.filter(revision=run.revision).exists()
        ),
    )
    report = api.get(url).json()["shadow"]["report"]
    assert report["compared"] == 30 and report["agreement"] < 1.0
    assert report["outputs"]["predictions"]["max_abs_diff"] == 1.0

    # 3. Promote: the shadow's revision rolls out the normal way and then serves.
    resp = api.post(f"{url}/shadow/promote")
    assert resp.status_code == 202, resp.content
    # The shadow ran at idle priority: a fresh revision of v3 rolls out at normal priority.
    d = converge(
        "shadowed",
        until=lambda x: (
            x.serving_revision.model_version_id == run3.revision.model_version_id
            and x.serving_revision_id != run3.revision_id
            and x.status == "ready"
        ),
    )
    assert predict(d.endpoint, rows(1)[0]) == "3"
    assert Revision.objects.get(pk=d.serving_revision_id).state == Revision.State.LIVE
    serving = Instance.objects.get(revision=d.serving_revision)
    assert sched_policies(serving) == {os.SCHED_OTHER}
    assert "mirror" not in json.loads(router.backends_file("shadowed").read_text())
    assert api.get(url).json()["shadow"] is None
    assert d.events.filter(
        kind="traffic", message__contains=f"r{d.serving_revision.number}"
    ).exists()
    actions = set(AuditEvent.objects.filter(object_id="shadowed").values_list("action", flat=True))
    assert {"deployment.shadow_start", "deployment.shadow_promote"} <= actions
    assert Deployment.objects.get(pk=d.pk).target_version == 3
