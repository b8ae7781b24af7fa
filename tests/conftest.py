"""Shared fixtures. MLflow runs for real: the test settings give each test
session its own data directory, so its own SQLite MLflow store."""

from __future__ import annotations

import io
import os
import uuid
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def sklearn_model_dir(tmp_path_factory) -> Path:
    """A saved scikit-learn MLflow model (20 features), built once per session."""
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    import sklearn
    import skops
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(200, 20)), columns=[f"f{i}" for i in range(20)])
    y = (X["f0"] + X["f1"] > 0).astype(int)
    model = LogisticRegression(max_iter=200).fit(X, y)
    path = tmp_path_factory.mktemp("models") / "sklearn"
    mlflow.sklearn.save_model(
        model,
        str(path),
        signature=infer_signature(X, model.predict(X)),
        input_example=X.head(3),
        pip_requirements=[
            f"scikit-learn=={sklearn.__version__}",
            f"mlflow=={mlflow.__version__}",
            f"skops=={skops.__version__}",
        ],
    )
    return path


def zip_dir(directory: Path, *, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(directory.rglob("*")):
            if file.is_file():
                zf.write(file, prefix + str(file.relative_to(directory)))
    return buf.getvalue()


@pytest.fixture(scope="session")
def model_zip(sklearn_model_dir) -> bytes:
    """The sklearn model as an upload archive (MLmodel at the root)."""
    return zip_dir(sklearn_model_dir)


@pytest.fixture
def make_model_zip(sklearn_model_dir):
    def make(**kwargs) -> bytes:
        return zip_dir(sklearn_model_dir, **kwargs)

    return make


@pytest.fixture(scope="session")
def logged_run(sklearn_model_dir) -> dict:
    """A real MLflow run with metrics, params and the model logged as artifacts.

    Returns ``{"run_id", "source"}`` where source is ``runs:/<id>/model``.
    """
    from registry.mlflow_store import get_store

    store = get_store()
    client = store.client
    experiment = client.get_experiment_by_name("tests")
    if experiment is None:
        root = Path(store.artifact_root) / "tests"
        root.mkdir(parents=True, exist_ok=True)
        experiment_id = client.create_experiment("tests", artifact_location=root.as_uri())
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "accuracy", 0.93)
    client.log_metric(run.info.run_id, "f1", 0.91)
    client.log_param(run.info.run_id, "C", "1.0")
    client.log_param(run.info.run_id, "penalty", "l2")
    client.log_artifacts(run.info.run_id, str(sklearn_model_dir), "model")
    client.set_terminated(run.info.run_id)
    return {"run_id": run.info.run_id, "source": f"runs:/{run.info.run_id}/model"}


@pytest.fixture
def model_name() -> str:
    """A model name no other test uses (MLflow state outlives each test's DB rollback)."""
    return f"model-{uuid.uuid4().hex[:10]}"


def with_roles(user, *roles: str):
    """``user`` with the role groups ``roles``, reloaded (no stale permission cache)."""
    from django.contrib.auth.models import Group

    user.groups.add(*Group.objects.filter(name__in=roles))
    assert user.groups.count() == len(roles), f"unknown role among {roles}"
    return type(user).objects.get(pk=user.pk)


@pytest.fixture
def user(django_user_model):
    """Alice registers, promotes and deploys (the roles the existing tests exercise)."""
    alice = django_user_model.objects.create_user(username="alice", password="pw-alice-123")
    return with_roles(alice, "model-developer", "deployer")


@pytest.fixture
def role_admin(django_user_model):
    """Dana has the admin role (not a superuser): users, policies, the audit log."""
    dana = django_user_model.objects.create_user(username="dana", password="pw-dana-123")
    return with_roles(dana, "admin")


@pytest.fixture
def other_user(django_user_model):
    """Carol registers and promotes; she approves nothing."""
    carol = django_user_model.objects.create_user(username="carol", password="pw-carol-123")
    return with_roles(carol, "model-developer")


@pytest.fixture
def approver(django_user_model):
    approver = django_user_model.objects.create_user(username="bob", password="pw-bob-123")
    return with_roles(approver, "approver", "model-developer")


@pytest.fixture
def client_logged_in(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def token_for(db):
    """token_for(user, scopes=None) -> plaintext bearer token."""
    from accounts.services import api_token_create

    def make(user, scopes=None, **kwargs) -> str:
        return api_token_create(user=user, name="test", scopes=scopes, **kwargs).plaintext

    return make


@pytest.fixture
def api(client, user, token_for):
    """A JSON API client authenticated with a full-scope token of ``user``."""
    return ApiClient(client, token_for(user))


@pytest.fixture
def api_as(client, token_for):
    def make(user, scopes=None) -> ApiClient:
        return ApiClient(client, token_for(user, scopes))

    return make


class ApiClient:
    """Django's test client speaking JSON with a bearer token."""

    def __init__(self, client, token: str | None) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _call(self, method: str, path: str, data=None, **kwargs):
        fn = getattr(self.client, method)
        if data is None:
            return fn(path, headers=self.headers, **kwargs)
        if "content_type" not in kwargs and method != "get":
            kwargs["content_type"] = "application/json"
        return fn(path, data=data, headers=self.headers, **kwargs)

    def get(self, path, data=None, **kw):
        return self._call("get", path, data, **kw)

    def post(self, path, data=None, **kw):
        return self._call("post", path, data, **kw)

    def patch(self, path, data=None, **kw):
        return self._call("patch", path, data, **kw)

    def delete(self, path, data=None, **kw):
        return self._call("delete", path, data, **kw)

    def upload(self, path, payload: bytes, filename: str = "model.zip", **fields):
        from django.core.files.uploadedfile import SimpleUploadedFile

        data = {
            "artifact": SimpleUploadedFile(filename, payload, content_type="application/zip"),
            **fields,
        }
        return self.client.post(path, data=data, headers=self.headers)
