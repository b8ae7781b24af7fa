"""Model-server instances as Docker containers, one container per instance.

Images: one per (model requirements, serving code, base image), tagged with a hash of
those, so a rollout or a rollback to a model with the same requirements builds nothing.
The packages are downloaded on this host (where pip is configured for the network, CA
bundle included) into a wheelhouse in the build context, and the build itself runs with
no network. The model is never in the image; it is bind-mounted read-only at /model.
The Dockerfile's build stage (the venv) ends as an untagged image labelled
``controlplane.stage=build`` and with the owner; after each build the runtime prunes its own
such images (hundreds of MB each, nothing references them), never another owner's.

Containers: hardened by default (non-root, no capabilities, no-new-privileges, read-only
root filesystem, pids/memory/CPU limits), labelled with the owner (this control plane's
install id) and the instance's deployment, revision, ordinal and port, so that
``list_owned`` finds them again from the engine alone after a restart of the control plane.

This module imports nothing from Django; docker SDK types never leave it.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import docker
import requests
from docker.errors import APIError, BuildError, DockerException, ImageNotFound, NotFound
from docker.types import LogConfig, Mount

from deployments import environments
from deployments.runtimes.base import InstanceSpec, InstanceStatus, Progress, RuntimeError_

logger = logging.getLogger(__name__)

SERVING_SOURCE = Path(__file__).resolve().parents[2] / "serving"
MODEL_MOUNT = "/model"
PREDICTION_LOG_MOUNT = "/predictions"
SOCKET_MOUNT = "/run/serving"  # network "none": the instance's socket directory
SOCKET_NAME = "serving.sock"
CONTAINER_PORT = 8080  # where the server listens inside the container in bridge mode
SERVING_UID = 10001  # the image's non-root user (serving/Dockerfile, ARG SERVING_UID)

LABEL_OWNER = "controlplane.owner"
LABEL_DEPLOYMENT = "controlplane.deployment"
LABEL_REVISION = "controlplane.revision"
LABEL_ORDINAL = "controlplane.ordinal"
LABEL_HOST = "controlplane.host"
LABEL_PORT = "controlplane.port"
LABEL_SOCKET = "controlplane.socket"  # host path of the server's socket (network "none")
LABEL_MODEL = "controlplane.model"
LABEL_IMAGE_KEY = "controlplane.image-key"
LABEL_STAGE = "controlplane.stage"  # "build": the Dockerfile's build stage (serving/Dockerfile)

# Bump when the build context's layout or the Dockerfile contract changes: every image
# key changes with it.
_RECIPE_VERSION = "1"
# Not copied into the image, and not part of its key: a docs edit rebuilds nothing.
_IGNORED_SOURCES = ("__pycache__", "*.pyc", ".*", "*.md")
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")
# GET /ping over the server's Unix socket (network "none") or its port; exit 1 unless 200.
_HEALTHCHECK_CMD = (
    "import os, socket, sys; p = os.environ.get('SERVING_UNIX_SOCKET'); "
    "s = socket.socket(socket.AF_UNIX) if p else socket.socket(); s.settimeout(2); "
    "s.connect(p or ('127.0.0.1', int(os.environ.get('SERVING_PORT', '8080')))); "
    "s.sendall(b'GET /ping HTTP/1.0\\r\\n\\r\\n'); "
    "sys.exit(0 if s.recv(64).split(b' ')[1:2] == [b'200'] else 1)"
)
_PROBE = (
    "import json, platform, sys; "
    "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], "
    "'impl': sys.implementation.name, 'machine': platform.machine(), "
    "'libc': platform.libc_ver()}))"
)
_NS = 1_000_000_000


def docker_available(base_url: str | None = None) -> tuple[bool, str]:
    """Is a Docker engine reachable? ``(True, description)`` or ``(False, reason)``."""
    try:
        client = _make_client(base_url, timeout=5)
        try:
            client.ping()
            version = client.version().get("Version", "?")
        finally:
            client.close()
    except (DockerException, requests.RequestException) as exc:
        return False, str(exc) or type(exc).__name__
    return True, f"Docker Engine {version}"


IDLE_CPU_SHARES = 2  # the kernel's minimum weight


class DockerRuntime:
    """The Runtime protocol (deployments/runtimes/base.py) on a Docker engine."""

    name = "docker"

    def __init__(
        self,
        *,
        owner: str,
        cache_dir: str | os.PathLike[str],
        admin_token: Callable[[str], str],
        base_image: str = "python:3.11-slim-bookworm",
        image_prefix: str = "controlplane-serving",
        network_mode: str = "none",
        sockets_dir: str | os.PathLike[str] | None = None,
        base_url: str | None = None,
        serving_source: str | os.PathLike[str] = SERVING_SOURCE,
        skinny_mlflow: bool = True,
        default_cpu: float = 1.0,
        default_memory_mb: int = 1024,
        pids_limit: int = 256,
        tmpfs_mb: int = 64,
        max_restarts: int = 5,
        pip_command: Sequence[str] = (sys.executable, "-m", "pip"),
        build_timeout: float = 1800.0,
        index: environments.IndexOptions | Callable[[], environments.IndexOptions] | None = None,
    ) -> None:
        """No I/O here: the engine is first contacted by the first call that needs it.

        ``owner`` is this control plane's install id (the ``controlplane.owner`` label);
        ``admin_token`` maps a deployment name to the token its servers' admin endpoints
        require (``SERVING_ADMIN_TOKEN``, see deployments/serving_token.py);
        ``network_mode`` is "none" (no network at all: the server listens on a Unix socket in
        ``sockets_dir``/<port>/, bind-mounted at /run/serving, which the router reaches),
        "host" (the server binds spec.host:spec.port on the host's network: it reaches every
        port of the host's loopback) or "bridge" (it listens on 0.0.0.0:8080 in the container,
        published on 127.0.0.1:spec.port only). ``skinny_mlflow`` installs mlflow-skinny of the same
        version where a model asks for mlflow: enough to load pyfunc models, far smaller.
        """
        if not owner or _NAME_UNSAFE.search(owner):
            raise ValueError(f"owner must be a non-empty [a-zA-Z0-9_.-] string, got {owner!r}")
        if network_mode not in ("none", "host", "bridge"):
            raise ValueError(
                f"network_mode must be 'none', 'host' or 'bridge', got {network_mode!r}"
            )
        self.owner = owner
        self.cache_dir = Path(cache_dir)
        self.admin_token = admin_token
        self.base_image = base_image
        self.image_prefix = image_prefix
        self.network_mode = network_mode
        self.sockets_dir = Path(sockets_dir) if sockets_dir else self.cache_dir / "sockets"
        self.base_url = base_url
        self.serving_source = Path(serving_source)
        self.skinny_mlflow = skinny_mlflow
        self.default_cpu = default_cpu
        self.default_memory_mb = default_memory_mb
        self.pids_limit = pids_limit
        self.tmpfs_mb = tmpfs_mb
        self.max_restarts = max_restarts
        self.pip_command = list(pip_command)
        self.build_timeout = build_timeout
        self._index = index
        self.builds = 0  # images this object built (reuse leaves it unchanged)
        self._client_obj: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._build_thread_lock = threading.Lock()
        self._platforms: dict[str, dict] = {}  # base image id -> probe result

    # --- the Runtime protocol --------------------------------------------------------------

    def address(self, port: int) -> str:
        if self.network_mode == "none":
            return f"unix:{self.sockets_dir / str(port) / SOCKET_NAME}"
        return f"127.0.0.1:{port}"

    def prepare(self, spec: InstanceSpec, *, progress: Progress | None = None) -> None:
        """Build (or find) the serving image, before the rollout's progress deadline starts."""
        _check_model_dir(spec.model_dir)
        self.ensure_image(spec, progress=progress)

    def start(self, spec: InstanceSpec) -> InstanceStatus:
        _check_model_dir(spec.model_dir)
        if self.network_mode == "bridge":
            self._check_bridge_network()
        image = self.ensure_image(spec)
        name = f"{_NAME_UNSAFE.sub('-', spec.instance_name).strip('-.')}-{secrets.token_hex(3)}"
        if self.network_mode in ("host", "none"):
            listen_host, listen_port, ports = spec.host, spec.port, None
        else:
            listen_host, listen_port = "0.0.0.0", CONTAINER_PORT
            ports = {f"{CONTAINER_PORT}/tcp": ("127.0.0.1", spec.port)}
        environment = {
            **spec.env,
            "SERVING_MODEL_DIR": MODEL_MOUNT,
            "SERVING_MODEL_NAME": spec.model_name,
            "SERVING_MODEL_VERSION": spec.model_version,
            "SERVING_HOST": listen_host,
            "SERVING_PORT": str(listen_port),
            "SERVING_MAX_BATCH_SIZE": str(spec.max_batch_size),
            "SERVING_MAX_BATCH_DELAY_MS": str(spec.max_batch_delay_ms),
            # Like any container's environment, readable by whoever may use the engine (root
            # or equivalent) and by the container's own uid, nobody else.
            "SERVING_ADMIN_TOKEN": self.admin_token(spec.deployment),
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        mounts = [Mount(MODEL_MOUNT, spec.model_dir, type="bind", read_only=True)]
        user = f"{SERVING_UID}:{SERVING_UID}"
        socket_label = {}
        if self.network_mode == "none":
            directory, user = self._socket_dir(spec.port)
            mounts.append(Mount(SOCKET_MOUNT, str(directory), type="bind"))
            environment["SERVING_UNIX_SOCKET"] = f"{SOCKET_MOUNT}/{SOCKET_NAME}"
            socket_label = {LABEL_SOCKET: str(directory / SOCKET_NAME)}
        if spec.prediction_log_dir:
            _prepare_prediction_log_dir(spec.prediction_log_dir)
            mounts.append(Mount(PREDICTION_LOG_MOUNT, spec.prediction_log_dir, type="bind"))
            environment["SERVING_PREDICTION_LOG_DIR"] = PREDICTION_LOG_MOUNT
        labels = {
            LABEL_OWNER: self.owner,
            LABEL_DEPLOYMENT: spec.deployment,
            LABEL_REVISION: str(spec.revision),
            LABEL_ORDINAL: str(spec.ordinal),
            LABEL_HOST: "127.0.0.1" if self.network_mode == "bridge" else spec.host,
            LABEL_PORT: str(spec.port),
            LABEL_MODEL: f"{spec.model_name}/{spec.model_version}",
            **socket_label,
        }
        cpu = spec.cpu if spec.cpu is not None else self.default_cpu
        memory_mb = spec.memory_mb if spec.memory_mb is not None else self.default_memory_mb
        with self._translate(f"starting container {name}"):
            container = self._client.containers.create(
                image,
                name=name,
                labels=labels,
                environment=environment,
                network_mode=self.network_mode,
                ports=ports,
                mounts=mounts,
                user=user,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
                privileged=False,
                read_only=True,
                # Not noexec: some native libraries load code they write to a temp dir.
                tmpfs={"/tmp": f"rw,nosuid,nodev,size={self.tmpfs_mb}m,mode=1777"},
                init=True,  # tini as PID 1: signals forwarded, workers reaped
                restart_policy={"Name": "on-failure", "MaximumRetryCount": self.max_restarts},
                healthcheck={
                    "test": ["CMD", "python", "-c", _HEALTHCHECK_CMD],
                    "interval": 10 * _NS,
                    "timeout": 3 * _NS,
                    "retries": 3,
                    "start_period": 300 * _NS,
                },
                mem_limit=f"{memory_mb}m",
                memswap_limit=f"{memory_mb}m",  # no swap beyond the limit
                nano_cpus=int(cpu * _NS),
                # A best-effort instance (a shadow): the lowest CPU weight (1024 is the default),
                # so under contention it gets what the serving containers leave.
                cpu_shares=IDLE_CPU_SHARES if spec.priority == "idle" else None,
                pids_limit=self.pids_limit,
                log_config=LogConfig(
                    type=LogConfig.types.JSON, config={"max-size": "10m", "max-file": "3"}
                ),
                stop_signal="SIGTERM",
            )
            try:
                container.start()
            except BaseException:
                with contextlib.suppress(DockerException, requests.RequestException):
                    container.remove(force=True)
                raise
            container.reload()
        logger.info("started container %s (%s) from %s", name, container.short_id, image)
        return self._status(container)

    def stop(self, runtime_id: str, *, timeout: float = 10.0) -> None:
        with self._translate(f"stopping container {runtime_id}"):
            container = self._owned_container(runtime_id)
            if container is None:
                return
            with contextlib.suppress(NotFound):
                # The engine sends the image's stop signal (SIGTERM), then SIGKILL.
                container.stop(timeout=max(0, math.ceil(timeout)))
            self._keep_logs(container)
            try:
                container.remove(force=True)
            except NotFound:
                pass
            except APIError as exc:
                if exc.status_code != 409:  # 409: a removal already in progress
                    raise

    def inspect(self, runtime_id: str) -> InstanceStatus | None:
        with self._translate(f"inspecting container {runtime_id}"):
            container = self._owned_container(runtime_id)
            return None if container is None else self._status(container)

    def list_owned(self) -> list[InstanceStatus]:
        with self._translate("listing containers"):
            containers = self._client.containers.list(
                all=True, filters={"label": f"{LABEL_OWNER}={self.owner}"}, ignore_removed=True
            )
            statuses = [self._status(c) for c in containers]
        return sorted(statuses, key=lambda s: (s.deployment, s.revision, s.ordinal))

    def logs(self, runtime_id: str, *, tail: int = 100) -> str:
        with self._translate(f"reading logs of container {runtime_id}"):
            container = self._owned_container(runtime_id)
            if container is None:
                return ""
            raw = container.logs(stdout=True, stderr=True, tail=tail)
        return raw.decode("utf-8", errors="replace")

    def _socket_dir(self, port: int) -> tuple[Path, str]:
        """The instance's socket directory (empty, mode 0700) and the container's user: uid
        SERVING_UID owning it where this process is root, else this process's own uid (a
        non-root control plane cannot give a directory away; its uid is not root either)."""
        root = self.sockets_dir
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o711)
        directory = root / str(port)
        with self._translate(f"preparing the socket directory {directory}"):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(mode=0o700)
            if os.geteuid() == 0:
                os.chown(directory, SERVING_UID, SERVING_UID)
                return directory, f"{SERVING_UID}:{SERVING_UID}"
        return directory, f"{os.geteuid()}:{os.getegid()}"

    def instance_logs(self, instance_name: str, *, tail: int = 100) -> str:
        """The log a stopped container left (``<deployment>-r<N>-<i>``): kept on stop, so a
        failed revision's servers can be read after their containers are removed."""
        if not instance_name or "/" in instance_name or instance_name.startswith("."):
            return ""
        try:
            lines = (self.cache_dir / "logs" / f"{instance_name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(lines.splitlines()[-tail:])

    def _keep_logs(self, container) -> None:
        labels = container.labels
        name = (
            f"{labels.get(LABEL_DEPLOYMENT, '')}-r{labels.get(LABEL_REVISION, '0')}"
            f"-{labels.get(LABEL_ORDINAL, '0')}"
        )
        if _NAME_UNSAFE.search(name) or name.startswith("."):
            return
        try:
            raw = container.logs(stdout=True, stderr=True, tail=1000)
            (self.cache_dir / "logs").mkdir(parents=True, exist_ok=True)
            (self.cache_dir / "logs" / f"{name}.log").write_bytes(raw)
        except (DockerException, requests.RequestException, OSError) as exc:
            logger.info("keeping the log of %s: %s", name, exc)

    def _check_bridge_network(self) -> None:
        # Without it the engine still starts the container, with loopback only and nothing
        # published: an instance that can never answer.
        with self._translate("looking up the engine's bridge network"):
            try:
                self._client.networks.get("bridge")
            except NotFound:
                raise RuntimeError_(
                    "network mode 'bridge' needs the engine's default bridge network, and this "
                    "engine has none (dockerd --bridge=none): use network mode 'none' or 'host'"
                ) from None

    # --- images ----------------------------------------------------------------------------

    @property
    def index(self) -> environments.IndexOptions | None:
        if callable(self._index):
            self._index = self._index()
        return self._index

    def ensure_image(self, spec: InstanceSpec, *, progress: Progress | None = None) -> str:
        """The serving image for this model, built unless one with the same key exists."""
        resolved = environments.resolve(
            spec.model_dir,
            serving_requirements=self.serving_source / "requirements.txt",
            skinny_mlflow=self.skinny_mlflow,
        )
        model_requirements = list(resolved.model_requirements)
        serving_requirements = list(resolved.serving_requirements)
        with self._translate(f"looking up base image {self.base_image}"):
            try:
                base_id = self._client.images.get(self.base_image).id
            except ImageNotFound:
                raise RuntimeError_(
                    f"base image {self.base_image} not found on the Docker engine: "
                    "build it with .ci/docker-setup.sh, or pull or load it"
                ) from None
        key = self._image_key(base_id, serving_requirements, model_requirements)
        tag = f"{self.image_prefix}:{key[:24]}"
        if self._image_exists(tag):
            return tag
        with self._build_lock():
            if self._image_exists(tag):  # another thread or process built it meanwhile
                return tag
            started = time.monotonic()
            if progress:
                progress(
                    f"building image {tag}: {len(resolved.requirements)} requirements "
                    f"({', '.join(resolved.top_level[:12])})"
                )
            self._build(tag, key, base_id, serving_requirements, model_requirements)
            self.builds += 1
            self.prune_build_leftovers()
            logger.info("built %s in %.0fs", tag, time.monotonic() - started)
            if progress:
                progress(f"image {tag} built in {time.monotonic() - started:.1f} s")
        return tag

    def _build(
        self,
        tag: str,
        key: str,
        base_id: str,
        serving_requirements: list[str],
        model_requirements: list[str],
    ) -> None:
        contexts = self.cache_dir / "contexts"
        contexts.mkdir(parents=True, exist_ok=True)
        context = Path(tempfile.mkdtemp(prefix=f"{key[:12]}-", dir=contexts))
        try:
            shutil.copytree(
                self.serving_source,
                context / "serving",
                ignore=shutil.ignore_patterns(*_IGNORED_SOURCES),
            )
            shutil.copy2(self.serving_source / "Dockerfile", context / "Dockerfile")
            (context / "requirements-serving.txt").write_text(
                "\n".join(serving_requirements) + "\n"
            )
            (context / "requirements-model.txt").write_text("\n".join(model_requirements) + "\n")
            self._download_wheels(
                context,
                self._platform(base_id),
                ["requirements-serving.txt", "requirements-model.txt"],
            )
            with self._translate(f"building image {tag}"):
                try:
                    self._client.images.build(
                        path=str(context),
                        tag=tag,
                        buildargs={"BASE_IMAGE": self.base_image, "CONTROLPLANE_OWNER": self.owner},
                        labels={LABEL_IMAGE_KEY: key},
                        network_mode="none",
                        pull=False,
                        rm=True,
                        forcerm=True,
                        timeout=int(self.build_timeout),
                    )
                except BuildError as exc:
                    lines = [
                        chunk.get("stream") or chunk.get("error") or ""
                        for chunk in exc.build_log
                        if isinstance(chunk, dict)
                    ]
                    tail = "".join(lines).strip().splitlines()[-15:]
                    raise RuntimeError_(
                        f"building image {tag} failed: {exc.msg}\n" + "\n".join(tail)
                    ) from None
        finally:
            shutil.rmtree(context, ignore_errors=True)

    def prune_build_leftovers(self) -> int:
        """Remove the dangling build-stage images this owner's builds left; returns how many
        images the engine deleted. Other owners' images and tagged images are never touched."""
        with self._translate("pruning the build stage images"):
            result = self._client.images.prune(
                filters={
                    "dangling": True,
                    "label": [f"{LABEL_STAGE}=build", f"{LABEL_OWNER}={self.owner}"],
                }
            )
        deleted = [item for item in (result or {}).get("ImagesDeleted") or [] if "Deleted" in item]
        if deleted:
            logger.info("pruned %d build-stage image layers", len(deleted))
        return len(deleted)

    def prune_unused_images(
        self, *, retention_seconds: float, now: float | None = None
    ) -> list[str]:
        """Remove the serving images (``image_prefix``, built by a runtime: they carry the
        image-key label) that no container uses, once unused for ``retention_seconds``;
        returns the removed tags. "Unused since" is kept per image id in
        ``cache_dir/images-seen.json``: the last pass that saw a container on it (or its build
        time, for an image never seen in use). Images in use, of another prefix, or without
        the label are never touched; the engine refuses to remove an image a container
        started on meanwhile."""
        now = time.time() if now is None else now
        state_path = self.cache_dir / "images-seen.json"
        try:
            seen: dict[str, float] = json.loads(state_path.read_text())
        except (OSError, ValueError):
            seen = {}
        removed: list[str] = []
        with self._translate("pruning unused serving images"):
            client = self._client
            in_use = {c.attrs.get("Image") for c in client.containers.list(all=True)}
            images = client.images.list(name=self.image_prefix, filters={"label": LABEL_IMAGE_KEY})
            current: dict[str, float] = {}
            for image in images:
                if image.id in in_use:
                    current[image.id] = now
                    continue
                created = _parse_created(image.attrs.get("Created"))
                last = max(seen.get(image.id, 0.0), created)
                if now - last < retention_seconds:
                    current[image.id] = last
                    continue
                for tag in image.tags:
                    try:
                        client.images.remove(tag, noprune=False)
                        removed.append(tag)
                    except docker.errors.APIError as exc:  # in use since, or already gone
                        logger.info("keeping %s: %s", tag, exc)
                        current[image.id] = last
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current))
        os.replace(tmp, state_path)
        if removed:
            logger.info("removed %d unused serving image(s): %s", len(removed), ", ".join(removed))
        return removed

    def _download_wheels(self, context: Path, platform: dict, requirement_files: list[str]) -> None:
        """Every distribution the image needs, as wheels for the base image's Python."""
        python = platform["python"]
        abi = "cp" + python.replace(".", "")
        command = [
            *self.pip_command,
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--dest",
            str(context / "wheels"),
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            python,
            "--abi",
            abi,
        ]
        for tag in platform["platform_tags"]:
            command += ["--platform", tag]
        for name in requirement_files:
            command += ["--requirement", str(context / name)]
        if self.index is not None:
            command += self.index.pip_args()
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=self.build_timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError_(f"downloading the image's packages failed: {exc}") from None
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "is ignored" not in line]
            raise RuntimeError_(
                "downloading the image's packages failed (pip download exit code "
                f"{result.returncode}):\n" + "\n".join(errors[-15:])
            )

    def _platform(self, base_id: str) -> dict:
        """Python version and wheel platform tags of the base image, probed once per image."""
        if base_id in self._platforms:
            return self._platforms[base_id]
        with self._translate(f"probing base image {self.base_image}"):
            output = self._client.containers.run(
                base_id,
                ["python3", "-c", _PROBE],
                entrypoint=[],
                network_mode="none",
                remove=True,
                read_only=True,
                cap_drop=["ALL"],
                stdout=True,
                stderr=False,
            )
        probe = json.loads(output.decode().strip().splitlines()[-1])
        libc, libc_version = probe["libc"]
        if probe["impl"] != "cpython" or libc != "glibc":
            raise RuntimeError_(
                f"base image {self.base_image} has {probe['impl']} on {libc or 'no glibc'}; "
                "the serving image needs CPython on a glibc distribution"
            )
        machine = probe["machine"]
        major, minor = (int(part) for part in libc_version.split(".")[:2])
        tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 4, -1)]
        legacy = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}
        tags += [
            f"{name}_{machine}" for (ma, mi), name in legacy.items() if (major, minor) >= (ma, mi)
        ]
        result = {"python": probe["python"], "platform_tags": tags}
        self._platforms[base_id] = result
        return result

    def _image_key(
        self, base_id: str, serving_requirements: list[str], model_requirements: list[str]
    ) -> str:
        digest = hashlib.sha256()
        digest.update(f"recipe {_RECIPE_VERSION}\nbase {base_id}\n".encode())
        for line in serving_requirements:
            digest.update(f"serving-req {line}\n".encode())
        for line in model_requirements:
            digest.update(f"model-req {line}\n".encode())
        for path in sorted(self.serving_source.rglob("*")):
            relative = path.relative_to(self.serving_source)
            if path.is_dir() or _ignored(relative):
                continue
            digest.update(f"file {relative.as_posix()} ".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    def _image_exists(self, tag: str) -> bool:
        with self._translate(f"looking up image {tag}"):
            try:
                self._client.images.get(tag)
            except ImageNotFound:
                return False
        return True

    @contextlib.contextmanager
    def _build_lock(self) -> Iterator[None]:
        """One build at a time, across threads and processes (a file lock in the cache dir).

        Builds share the machine's two or so CPUs and the engine's build cache: in parallel
        they are no faster, and two of the same requirements would both install them.
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with self._build_thread_lock, open(self.cache_dir / "build.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- helpers ---------------------------------------------------------------------------

    @property
    def _client(self) -> docker.DockerClient:
        with self._lock:
            if self._client_obj is None:
                try:
                    self._client_obj = _make_client(self.base_url, timeout=120)
                except (DockerException, requests.RequestException) as exc:
                    raise RuntimeError_(f"Docker engine not reachable: {exc}") from exc
            return self._client_obj

    def _owned_container(self, runtime_id: str):
        """The container if it exists and this control plane owns it, else None."""
        try:
            container = self._client.containers.get(runtime_id)
        except NotFound:
            return None
        if container.labels.get(LABEL_OWNER) != self.owner:
            return None
        return container

    def _status(self, container) -> InstanceStatus:
        attrs = container.attrs
        labels = attrs["Config"].get("Labels") or {}
        state = attrs.get("State") or {}
        # While waiting to be restarted a container is "Running" and "Restarting" at once.
        running = bool(state.get("Running")) and not state.get("Restarting")
        return InstanceStatus(
            runtime_id=attrs["Id"],
            deployment=labels.get(LABEL_DEPLOYMENT, ""),
            revision=int(labels.get(LABEL_REVISION, 0)),
            ordinal=int(labels.get(LABEL_ORDINAL, 0)),
            address=(
                f"unix:{labels[LABEL_SOCKET]}"
                if labels.get(LABEL_SOCKET)
                else f"{labels.get(LABEL_HOST, '127.0.0.1')}:{labels.get(LABEL_PORT, '0')}"
            ),
            running=running,
            exit_code=None if running else state.get("ExitCode"),
            restarts=int(attrs.get("RestartCount") or 0),
        )

    @contextlib.contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError_:
            raise
        except (DockerException, requests.RequestException) as exc:
            raise RuntimeError_(f"{action}: {_explain(exc)}") from exc


def _make_client(base_url: str | None, *, timeout: int) -> docker.DockerClient:
    if base_url:
        return docker.DockerClient(base_url=base_url, timeout=timeout)
    return docker.from_env(timeout=timeout)


def _explain(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        return str(exc.explanation or exc)
    if isinstance(exc, requests.ConnectionError) or "Connection" in type(exc).__name__:
        return f"Docker engine not reachable ({exc})"
    return str(exc) or type(exc).__name__


def _ignored(relative: Path) -> bool:
    return any(
        fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in _IGNORED_SOURCES
    )


def _check_model_dir(model_dir: str) -> None:
    """The container user (not root, no capabilities) must be able to read the whole model."""
    path = Path(model_dir)
    if not path.is_absolute():
        raise RuntimeError_(f"model dir {model_dir} is not an absolute path")
    if not (path / "MLmodel").is_file():
        raise RuntimeError_(f"model dir {model_dir} is not an MLflow model (no MLmodel file)")
    for root, dirs, files in os.walk(path):
        for name in ["", *dirs, *files]:
            entry = Path(root, name)
            try:
                mode = entry.stat().st_mode
            except OSError as exc:  # a dangling symlink, or a file removed meanwhile
                raise RuntimeError_(f"model dir {model_dir}: cannot read {entry}: {exc}") from None
            need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
            if mode & need != need:
                raise RuntimeError_(
                    f"{entry} is not readable by the container's user (uid {SERVING_UID}): "
                    f"make the model world-readable (chmod -R a+rX {model_dir})"
                )


def _prepare_prediction_log_dir(directory: str) -> None:
    """The server (uid SERVING_UID) writes its prediction log files here."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid == SERVING_UID or info.st_mode & stat.S_IWOTH:
        return
    if os.geteuid() == 0:
        os.chown(path, SERVING_UID, SERVING_UID)
        return
    raise RuntimeError_(
        f"prediction log dir {directory} is not writable by the container's user "
        f"(uid {SERVING_UID}): chown it to {SERVING_UID} or make it world-writable"
    )


def _parse_created(value: object) -> float:
    """The engine's ``Created`` (RFC 3339 with nanoseconds) as unix seconds; 0 if unreadable."""
    if not isinstance(value, str) or not value:
        return 0.0
    text = value.rstrip("Z")
    base, _, frac = text.partition(".")
    try:
        stamp = datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return 0.0
    return stamp.timestamp() + (float(f"0.{frac[:6]}") if frac.isdigit() else 0.0)
