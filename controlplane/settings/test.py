"""Only what makes tests faster or isolated; everything else is base.py."""

import os
import tempfile
import uuid

# Each test session gets its own data directory and MLflow store, unless told otherwise.
if "CONTROLPLANE_DATA_DIR" not in os.environ:
    os.environ["CONTROLPLANE_DATA_DIR"] = tempfile.mkdtemp(prefix="controlplane-test-")
# Messages from a test run never reach another run's queue on a shared broker.
os.environ.setdefault("CONTROLPLANE_TASK_QUEUE", f"controlplane-test-{uuid.uuid4().hex[:12]}")

# Images cannot be pulled here: tests use the base image .ci/docker-setup.sh builds.
os.environ.setdefault("CONTROLPLANE_DOCKER_BASE_IMAGE", "controlplane-serving-base:bookworm")

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
