"""The MLflow adapter: the only module that talks to MLflow.

Returns plain dataclasses; MLflow types and exceptions do not leave it.
Nothing here loads (unpickles) a model: it reads MLmodel (YAML), JSON
examples and requirements text, and moves files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from .archives import MLMODEL_MAX_BYTES, load_yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

logger = logging.getLogger(__name__)

UPLOAD_EXPERIMENT = "controlplane-uploads"
UPLOAD_TAG = "controlplane.upload"
_EXAMPLE_MAX_BYTES = 256 * 1024
_REQUIREMENTS_MAX_BYTES = 256 * 1024
_RUN_ID = r"[0-9a-fA-F]{1,64}"
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_RUNS_URI = re.compile(rf"^runs:/{_RUN_ID}(/{_SEGMENT})+$")
_MODELS_URI = re.compile(
    rf"^models:/(?:{_SEGMENT}/(?:\d+|latest)|{_SEGMENT}@{_SEGMENT}|m-[0-9a-f]{{1,64}})$"
)
ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$")


class MlflowStoreError(Exception):
    """MLflow refused or failed. ``kind``: not_found, invalid, conflict, unavailable."""

    def __init__(self, message: str, *, kind: str = "unavailable") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class VersionMeta:
    version: int
    source: str
    run_id: str
    description: str
    tags: dict
    metrics: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    flavors: list = field(default_factory=list)
    signature: dict | None = None
    input_example: object = None
    requirements: list = field(default_factory=list)


@dataclass(frozen=True)
class ModelSnapshot:
    name: str
    description: str
    tags: dict
    versions: dict[int, str]  # version -> source
    aliases: dict[str, int]


def is_valid_source(uri: str) -> bool:
    return bool(_RUNS_URI.match(uri) or _MODELS_URI.match(uri))


def _translate(exc: Exception) -> MlflowStoreError:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowStoreError):
        return exc
    if isinstance(exc, MlflowException):
        code = getattr(exc, "error_code", "")
        message = getattr(exc, "message", str(exc))
        if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in message.lower():
            return MlflowStoreError(message, kind="not_found")
        if code in ("RESOURCE_ALREADY_EXISTS",):
            return MlflowStoreError(message, kind="conflict")
        if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            return MlflowStoreError(message, kind="invalid")
        return MlflowStoreError(message, kind="unavailable")
    return MlflowStoreError(f"MLflow is unavailable: {exc}", kind="unavailable")


class MlflowStore:
    def __init__(
        self,
        tracking_uri: str,
        artifact_root: str | None = None,
        *,
        username: str = "",
        password: str = "",
    ) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.username = username
        self._password = password
        # MLflow's client reads its basic-auth credential from the process environment on
        # every request; the process-wide adapter sets it (or clears it) for its server.
        # Set here, it is not in /proc/<pid>/environ, and the runtimes give model servers
        # an environment of their own.
        if username:
            os.environ["MLFLOW_TRACKING_USERNAME"] = username
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        else:
            os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
            os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # --- registered models -------------------------------------------------------
    def create_model(self, name: str, *, description: str = "", tags: dict | None = None) -> None:
        try:
            self.client.create_registered_model(
                name, tags=tags or None, description=description or None
            )
        except Exception as exc:
            err = _translate(exc)
            if err.kind != "conflict":
                raise err from exc
            # Already in MLflow (created with MLflow's own client): adopt it.

    def update_model(self, name: str, *, description: str | None, tags: dict | None) -> None:
        try:
            if description is not None:
                self.client.update_registered_model(name, description=description)
            if tags is not None:
                current = self.client.get_registered_model(name).tags or {}
                for key in set(current) - set(tags):
                    self.client.delete_registered_model_tag(name, key)
                for key, value in tags.items():
                    self.client.set_registered_model_tag(name, key, str(value))
        except Exception as exc:
            raise _translate(exc) from exc

    def delete_model(self, name: str) -> None:
        try:
            self.client.delete_registered_model(name)
        except Exception as exc:
            err = _translate(exc)
            if err.kind != "not_found":
                raise err from exc

    # --- versions --------------------------------------------------------------------
    def register_version(
        self, name: str, source: str, *, description: str = "", tags: dict | None = None
    ) -> VersionMeta:
        if not is_valid_source(source):
            raise MlflowStoreError(
                f"source {source!r} is not a runs:/<run_id>/<path> or models:/<name>/<version> URI",
                kind="invalid",
            )
        try:
            mv = self._mlflow.register_model(
                source, name, tags=tags or None, await_registration_for=60
            )
            if description:
                self.client.update_model_version(name, mv.version, description=description)
        except Exception as exc:
            raise _translate(exc) from exc
        try:
            return self.version_meta(name, int(mv.version))
        except MlflowStoreError:
            # Registered, but it is not an MLflow model: undo and refuse.
            self.delete_version(name, int(mv.version))
            raise

    def upload_version(
        self, name: str, model_dir: Path, *, description: str = "", tags: dict | None = None
    ) -> VersionMeta:
        """Log ``model_dir`` as a run of the upload experiment and register it. If
        anything fails, the run and its files are deleted again; a worker that dies
        half-way leaves the run RUNNING, for ``sweep_upload_runs``."""
        run_id = None
        try:
            experiment_id = self._upload_experiment_id(create=True)
            run = self.client.create_run(
                experiment_id, run_name=f"upload-{name}", tags={UPLOAD_TAG: "true"}
            )
            run_id = run.info.run_id
            self.client.log_artifacts(run_id, str(model_dir), "model")
            self.client.set_terminated(run_id)
            return self.register_version(
                name, f"runs:/{run_id}/model", description=description, tags=tags
            )
        except Exception as exc:
            if run_id is not None:
                self.delete_run(run_id)
            raise _translate(exc) from exc

    def _upload_experiment_id(self, *, create: bool) -> str | None:
        experiment = self.client.get_experiment_by_name(UPLOAD_EXPERIMENT)
        if experiment is not None:
            return experiment.experiment_id
        if not create:
            return None
        location = None
        if self.artifact_root and not self.tracking_uri.startswith(("http://", "https://")):
            Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
            location = Path(self.artifact_root).resolve().as_uri()
        try:
            return self.client.create_experiment(UPLOAD_EXPERIMENT, artifact_location=location)
        except Exception:
            return self.client.get_experiment_by_name(UPLOAD_EXPERIMENT).experiment_id

    def delete_run(self, run_id: str) -> None:
        """Delete a run's files, then the run (best effort: logged, never raised)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            run = self.client.get_run(run_id)
            get_artifact_repository(run.info.artifact_uri).delete_artifacts()
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the real error
            logger.warning("could not delete the files of run %s: %s", run_id, exc)
        try:
            self.client.delete_run(run_id)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not delete run %s: %s", run_id, exc)

    def stale_upload_runs(self, *, older_than_ms: int) -> list[str]:
        """Ids of upload runs still RUNNING that started before ``older_than_ms``."""
        try:
            experiment_id = self._upload_experiment_id(create=False)
            if experiment_id is None:
                return []
            runs = self.client.search_runs(
                [experiment_id],
                filter_string=(
                    f"attributes.status = 'RUNNING' and attributes.start_time < {int(older_than_ms)}"
                ),
                max_results=1000,
            )
        except Exception as exc:
            raise _translate(exc) from exc
        return [r.info.run_id for r in runs if r.data.tags.get(UPLOAD_TAG) == "true"]

    def version_meta(self, name: str, version: int) -> VersionMeta:
        try:
            mv = self.client.get_model_version(name, str(version))
        except Exception as exc:
            raise _translate(exc) from exc
        with tempfile.TemporaryDirectory(prefix="mlmodel-") as tmp:
            try:
                path = self._mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{name}/{version}/MLmodel", dst_path=tmp
                )
                mlmodel = load_yaml(
                    _read_head(Path(path), MLMODEL_MAX_BYTES + 1),
                    max_bytes=MLMODEL_MAX_BYTES,
                    what="MLmodel",
                )
            except ValueError as exc:
                raise MlflowStoreError(f"{mv.source}: {exc}", kind="invalid") from exc
            except Exception as exc:
                raise MlflowStoreError(
                    f"no MLmodel file at {mv.source}: not an MLflow model", kind="invalid"
                ) from exc
            if not isinstance(mlmodel, dict) or not isinstance(mlmodel.get("flavors"), dict):
                raise MlflowStoreError(f"MLmodel at {mv.source} has no flavors", kind="invalid")
            example = self._small_json(name, version, mlmodel, tmp)
            requirements = self._requirements(name, version, tmp)
        metrics: dict = {}
        params: dict = {}
        if mv.run_id:
            try:
                run = self.client.get_run(mv.run_id)
                metrics, params = dict(run.data.metrics), dict(run.data.params)
            except Exception:
                logger.info("run %s of %s v%s is gone; no metrics", mv.run_id, name, version)
        meta = VersionMeta(
            version=int(mv.version),
            source=mv.source,
            run_id=mv.run_id or "",
            description=mv.description or "",
            tags=dict(mv.tags or {}),
            metrics=metrics,
            params=params,
            flavors=sorted(mlmodel["flavors"]),
            signature=_parse_signature(mlmodel.get("signature")),
            input_example=example,
            requirements=requirements,
        )
        _check_bounds(meta)
        return meta

    def _small_json(self, name: str, version: int, mlmodel: dict, tmp: str):
        info = mlmodel.get("saved_input_example_info") or {}
        artifact = info.get("artifact_path") if isinstance(info, dict) else None
        if not artifact or not re.match(r"^[A-Za-z0-9._-]+$", str(artifact)):
            return None
        try:
            path = self._mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}/{artifact}", dst_path=tmp
            )
            if os.path.getsize(path) > _EXAMPLE_MAX_BYTES:
                return None
            return json.loads(Path(path).read_text())
        except Exception:
            return None

    def _requirements(self, name: str, version: int, tmp: str) -> list[str]:
        try:
            path = self._mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}/requirements.txt", dst_path=tmp
            )
            raw = _read_head(Path(path), _REQUIREMENTS_MAX_BYTES + 1)
        except Exception:
            return []
        if len(raw) > _REQUIREMENTS_MAX_BYTES:
            raise MlflowStoreError(
                f"requirements.txt is larger than {_REQUIREMENTS_MAX_BYTES} bytes", kind="invalid"
            )
        lines = raw.decode(errors="replace").splitlines()
        return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]

    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        try:
            self.client.set_model_version_tag(name, str(version), key, value)
        except Exception as exc:
            raise _translate(exc) from exc

    def update_version(self, name: str, version: int, *, description: str) -> None:
        try:
            self.client.update_model_version(name, str(version), description=description)
        except Exception as exc:
            raise _translate(exc) from exc

    def delete_version(self, name: str, version: int) -> None:
        try:
            self.client.delete_model_version(name, str(version))
        except Exception as exc:
            err = _translate(exc)
            if err.kind != "not_found":
                raise err from exc

    def download_version(self, name: str, version: int, dest: Path) -> Path:
        """Copy the version's files to ``dest`` (a new directory). Files only: no loading."""
        try:
            path = self._mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)
            )
        except Exception as exc:
            raise _translate(exc) from exc
        return Path(path)

    def download_artifact(self, uri: str, dest: Path) -> Path:
        """Copy the artifact at ``uri`` (``runs:/``, ``models:/`` or ``mlflow-artifacts:/``) to
        ``dest`` (a directory). Files only."""
        if not uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
            raise MlflowStoreError(
                "an artifact URI starts with runs:/, models:/ or mlflow-artifacts:/",
                kind="invalid",
            )
        try:
            path = self._mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))
        except Exception as exc:
            raise _translate(exc) from exc
        return Path(path)

    # --- aliases -----------------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int) -> None:
        try:
            self.client.set_registered_model_alias(name, alias, str(version))
        except Exception as exc:
            raise _translate(exc) from exc

    def delete_alias(self, name: str, alias: str) -> None:
        try:
            self.client.delete_registered_model_alias(name, alias)
        except Exception as exc:
            err = _translate(exc)
            if err.kind != "not_found":
                raise err from exc

    def get_alias(self, name: str, alias: str) -> int | None:
        """The version ``alias`` points at in MLflow now, or None."""
        try:
            aliases = self.client.get_registered_model(name).aliases or {}
        except Exception as exc:
            raise _translate(exc) from exc
        value = aliases.get(alias)
        return int(value) if value is not None else None

    # --- users (MLflow's basic-auth app; the control plane's credential must be its admin) --
    def auth_user_set(self, username: str, password: str, *, can_edit: bool) -> bool:
        """Create ``username`` with ``password``, or set the password of an existing one;
        then give it EDIT on every experiment (runs, logged models, artifacts) if
        ``can_edit``, else only the server's default (READ). Registered models stay READ:
        aliases move through the control plane. True if the user was created."""
        created = (
            self._auth_call("GET", "/api/2.0/mlflow/users/get", query_username=username) is None
        )
        if created:
            self._auth_call(
                "POST",
                "/api/2.0/mlflow/users/create",
                body={"username": username, "password": password},
            )
        else:
            self._auth_call(
                "PATCH",
                "/api/2.0/mlflow/users/update-password",
                body={"username": username, "password": password},
            )
        grant = {"username": username, "resource_type": "experiment", "resource_id": "*"}
        if can_edit:
            self._auth_call(
                "POST",
                "/api/3.0/mlflow/users/permissions/grant",
                body={**grant, "permission": "EDIT"},
                exists_ok=True,  # granted at an earlier issue
            )
        elif not created:
            self._auth_call("POST", "/api/3.0/mlflow/users/permissions/revoke", body=grant)
        return created

    def _auth_call(
        self,
        method: str,
        path: str,
        *,
        body: dict | None = None,
        query_username: str = "",
        exists_ok: bool = False,
    ):
        """One call to the auth API with the control plane's credential; None on 404."""
        import base64
        from urllib.parse import quote

        from controlplane.lib.http import HttpError, HttpStatusError, request

        if not self.tracking_uri.startswith(("http://", "https://")) or not self.username:
            raise MlflowStoreError(
                "MLflow credentials need an MLflow server with authentication "
                f"(MLFLOW_TRACKING_URI is {self.tracking_uri}, with no control plane credential)",
                kind="invalid",
            )
        token = base64.b64encode(f"{self.username}:{self._password}".encode()).decode()
        url = self.tracking_uri.rstrip("/") + path
        if query_username:
            url += f"?username={quote(query_username)}"
        try:
            resp = request(
                method, url, json=body, timeout=15, headers={"Authorization": f"Basic {token}"}
            )
        except HttpStatusError as exc:
            if exc.status == 404 or "RESOURCE_DOES_NOT_EXIST" in exc.body:
                return None
            if exists_ok and "RESOURCE_ALREADY_EXISTS" in exc.body:
                return {}
            if exc.status in (401, 403):
                raise MlflowStoreError(
                    f"MLflow refused the control plane's credential for user management "
                    f"(HTTP {exc.status}): it must be the MLflow server's admin",
                    kind="invalid",
                ) from exc
            raise MlflowStoreError(f"MLflow user management failed: {exc}") from exc
        except HttpError as exc:
            raise MlflowStoreError(f"MLflow is unavailable: {exc}") from exc
        return resp.json() if resp.body else {}

    # --- sync ----------------------------------------------------------------------------
    def snapshot(self) -> list[ModelSnapshot]:
        """Every registered model with its versions and aliases, as MLflow has them now."""
        try:
            models = []
            token = None
            while True:
                page = self.client.search_registered_models(max_results=200, page_token=token)
                models.extend(page)
                token = page.token
                if not token:
                    break
            snapshots = []
            for rm in models:
                versions: dict[int, str] = {}
                vtoken = None
                while True:
                    vpage = self.client.search_model_versions(
                        f"name='{_quote(rm.name)}'", max_results=1000, page_token=vtoken
                    )
                    versions.update({int(v.version): v.source for v in vpage})
                    vtoken = vpage.token
                    if not vtoken:
                        break
                snapshots.append(
                    ModelSnapshot(
                        name=rm.name,
                        description=rm.description or "",
                        tags=dict(rm.tags or {}),
                        versions=versions,
                        aliases={k: int(v) for k, v in (rm.aliases or {}).items()},
                    )
                )
            return snapshots
        except Exception as exc:
            raise _translate(exc) from exc


def _read_head(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a file: enough to tell it is too large."""
    with open(path, "rb") as fh:
        return fh.read(limit)


def _check_bounds(meta: VersionMeta) -> None:
    """What one version row may hold (settings CONTROLPLANE_VERSION_MAX_*): a model
    that exceeds them is refused, not stored truncated or stored whole."""
    max_sig = settings.CONTROLPLANE_VERSION_MAX_SIGNATURE_BYTES
    if meta.signature is not None and len(json.dumps(meta.signature)) > max_sig:
        raise MlflowStoreError(
            f"the model signature is larger than {max_sig} bytes "
            "(CONTROLPLANE_VERSION_MAX_SIGNATURE_BYTES)",
            kind="invalid",
        )
    max_req = settings.CONTROLPLANE_VERSION_MAX_REQUIREMENTS
    if len(meta.requirements) > max_req or any(len(r) > 1000 for r in meta.requirements):
        raise MlflowStoreError(
            f"requirements.txt has more than {max_req} requirements "
            "(CONTROLPLANE_VERSION_MAX_REQUIREMENTS) or a line over 1000 characters",
            kind="invalid",
        )
    max_tags = settings.CONTROLPLANE_VERSION_MAX_TAGS
    if len(meta.tags) > max_tags:
        raise MlflowStoreError(
            f"the version has more than {max_tags} tags (CONTROLPLANE_VERSION_MAX_TAGS)",
            kind="invalid",
        )


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _parse_signature(raw) -> dict | None:
    if not isinstance(raw, dict):
        return None
    parsed = {}
    for key in ("inputs", "outputs", "params"):
        value = raw.get(key)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        parsed[key] = value
    return parsed


_store: MlflowStore | None = None
_lock = threading.Lock()


def get_store() -> MlflowStore:
    """The process-wide adapter for the configured MLflow."""
    global _store
    with _lock:
        username = settings.MLFLOW_TRACKING_USERNAME
        password = settings.MLFLOW_TRACKING_PASSWORD
        if (
            _store is None
            or _store.tracking_uri != settings.MLFLOW_TRACKING_URI
            or (_store.username, _store._password) != (username, password)
        ):
            _store = MlflowStore(
                settings.MLFLOW_TRACKING_URI,
                settings.MLFLOW_ARTIFACT_ROOT,
                username=username,
                password=password,
            )
        return _store
