"""Only what makes tests faster or isolated; everything else is base.py."""

import os
import tempfile
import uuid

# Each test session gets its own data directory and MLflow store, unless told otherwise;
# each pytest-xdist worker too (workers inherit the environment the controller set here).
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
_owner = os.environ.get("CONTROLPLANE_TEST_DATA_DIR_OWNER")  # who made the current one
if "CONTROLPLANE_DATA_DIR" not in os.environ or (_owner is not None and _owner != _worker):
    os.environ["CONTROLPLANE_DATA_DIR"] = tempfile.mkdtemp(prefix="controlplane-test-")
    os.environ["CONTROLPLANE_TEST_DATA_DIR_OWNER"] = _worker
    # Messages from a test run never reach another run's queue on a shared broker.
    os.environ["CONTROLPLANE_TASK_QUEUE"] = f"controlplane-test-{uuid.uuid4().hex[:12]}"
os.environ.setdefault("CONTROLPLANE_TASK_QUEUE", f"controlplane-test-{uuid.uuid4().hex[:12]}")

# Images cannot be pulled here: tests use the base image .ci/docker-setup.sh builds.
os.environ.setdefault("CONTROLPLANE_DOCKER_BASE_IMAGE", "controlplane-serving-base:bookworm")

# pytest-xdist: each worker process gets its own slice of the port range, so two workers'
# deployments never race for one port (each has its own database and data directory).
if _worker.startswith("gw") and os.environ.get("CONTROLPLANE_TEST_PORTS_OF") != _worker:
    os.environ["CONTROLPLANE_TEST_PORTS_OF"] = _worker
    _count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _low, _, _high = os.environ.get("CONTROLPLANE_PORT_RANGE", "31000-32999").partition("-")
    _size = (int(_high) - int(_low) + 1) // max(_count, 1)
    _start = int(_low) + int(_worker[2:]) * _size
    os.environ["CONTROLPLANE_PORT_RANGE"] = f"{_start}-{_start + _size - 1}"

from .base import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
WHITENOISE_AUTOREFRESH = True
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
# A file, not memory: the fault tests run the worker, beat and web app as processes on it.
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}  # noqa: F405
