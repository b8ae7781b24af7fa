"""All settings. Production differs from the embedded defaults only through
environment variables (see the README's configuration table)."""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from controlplane.lib.datadir import data_dir_secure
from controlplane.lib.env import (
    database_from_url,
    env_bool,
    env_choice,
    env_int,
    env_list,
    env_str,
)

# MLflow must never phone home, in any process that imports it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

BASE_DIR = Path(__file__).resolve().parent.parent.parent
DATA_DIR = Path(env_str("CONTROLPLANE_DATA_DIR", str(BASE_DIR / "var"))).resolve()


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        if len(key) < 32:
            raise ImproperlyConfigured("SECRET_KEY must be at least 32 characters long")
        return key
    # Embedded default: a random key kept in the data directory, created once.
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
# Earlier keys, still accepted for signatures and for reading encrypted fields during a rotation.
SECRET_KEY_FALLBACKS = env_list("SECRET_KEY_FALLBACKS", [])
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "axes",
    "controlplane",
    "accounts",
    "audit",
    "registry",
    "deployments",
    "monitoring",
    "jobs",
]

MIDDLEWARE = [
    "controlplane.lib.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "controlplane.lib.middleware.ApiContentTypeMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes requires: turns a locked-out login into its 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "controlplane.urls"
WSGI_APPLICATION = "controlplane.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": database_from_url(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'controlplane.sqlite3'}")
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# 0700, its secret files 0600 (controlplane/lib/datadir.py)
data_dir_secure(
    DATA_DIR,
    sqlite_path=(
        Path(DATABASES["default"]["NAME"])
        if DATABASES["default"]["ENGINE"].endswith("sqlite3")
        and os.path.isabs(str(DATABASES["default"]["NAME"]))
        else None
    ),
)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": env_int("CONTROLPLANE_PASSWORD_MIN_LENGTH", 12, minimum=8)},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Login throttling (django-axes): after CONTROLPLANE_LOGIN_FAILURE_LIMIT wrong passwords
# for one username from one address, that pair is locked out (429) for the cool-off.
# API tokens never go through authenticate(): token calls are not counted nor locked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("CONTROLPLANE_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("CONTROLPLANE_LOGIN_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = {
    "username_and_ip": [["username", "ip_address"]],
    "ip": ["ip_address"],
    "username_or_ip": ["username", "ip_address"],
}[
    env_choice(
        "CONTROLPLANE_LOGIN_LOCKOUT_BY",
        "username_and_ip",
        ("username_and_ip", "ip", "username_or_ip"),
    )
]
AXES_RESET_ON_SUCCESS = True
# The same address the audit log records (REMOTE_ADDR; X-Forwarded-For is client-controlled).
AXES_CLIENT_IP_CALLABLE = "controlplane.lib.middleware.client_address"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "registry:model-list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "controlplane" / "static"]
# Hashed names (app.3f2a….css), so whitenoise serves them as immutable for a year: plotly.js
# (4.8 MB) is fetched once per version. `make run` runs collectstatic, which writes the manifest.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# --- security defaults -------------------------------------------------------
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
# Behind TLS (production) these must be on; the embedded default serves plain
# HTTP on loopback, where secure cookies would make login impossible.
_TLS = env_bool("CONTROLPLANE_TLS", False)
SESSION_COOKIE_SECURE = _TLS
CSRF_COOKIE_SECURE = _TLS
SECURE_SSL_REDIRECT = env_bool("CONTROLPLANE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("CONTROLPLANE_HSTS_SECONDS", 31536000 if _TLS else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _TLS
# Preloading is a commitment an operator makes for the whole domain: opt-in.
SECURE_HSTS_PRELOAD = env_bool("CONTROLPLANE_HSTS_PRELOAD", False)
if env_bool("CONTROLPLANE_BEHIND_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# --- uploads -------------------------------------------------------------------
CONTROLPLANE_UPLOAD_MAX_BYTES = env_int(
    "CONTROLPLANE_UPLOAD_MAX_BYTES", 512 * 1024 * 1024, minimum=1
)
CONTROLPLANE_UPLOAD_MAX_ENTRIES = env_int("CONTROLPLANE_UPLOAD_MAX_ENTRIES", 10_000, minimum=1)
CONTROLPLANE_UPLOAD_MAX_UNCOMPRESSED_BYTES = env_int(
    "CONTROLPLANE_UPLOAD_MAX_UNCOMPRESSED_BYTES", 2 * 1024 * 1024 * 1024, minimum=1
)
# An entry over 1 MiB may expand at most this many times its compressed size (zip bombs).
CONTROLPLANE_UPLOAD_MAX_RATIO = env_int("CONTROLPLANE_UPLOAD_MAX_RATIO", 200, minimum=1)
# What one version row may hold; a model over these is refused with 400.
CONTROLPLANE_VERSION_MAX_SIGNATURE_BYTES = env_int(
    "CONTROLPLANE_VERSION_MAX_SIGNATURE_BYTES", 512 * 1024, minimum=1024
)
CONTROLPLANE_VERSION_MAX_REQUIREMENTS = env_int(
    "CONTROLPLANE_VERSION_MAX_REQUIREMENTS", 500, minimum=1
)
CONTROLPLANE_VERSION_MAX_TAGS = env_int("CONTROLPLANE_VERSION_MAX_TAGS", 100, minimum=1)
# Uploads older than this whose MLflow run is still RUNNING are swept (worker died).
# Jobs (jobs/): batch-scoring inputs and the runner's lease.
CONTROLPLANE_JOBS_DIR = DATA_DIR / "jobs"
CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES = env_int(
    "CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES", 256 * 1024 * 1024, minimum=1
)
CONTROLPLANE_BATCH_MAX_ROWS = env_int("CONTROLPLANE_BATCH_MAX_ROWS", 10_000_000, minimum=1)
CONTROLPLANE_BATCH_MAX_CHUNK_ROWS = env_int("CONTROLPLANE_BATCH_MAX_CHUNK_ROWS", 50_000, minimum=1)
CONTROLPLANE_JOB_LEASE_SECONDS = env_int("CONTROLPLANE_JOB_LEASE_SECONDS", 30, minimum=3)
CONTROLPLANE_JOB_MAX_ATTEMPTS = env_int("CONTROLPLANE_JOB_MAX_ATTEMPTS", 5, minimum=1)
CONTROLPLANE_JOB_LOG_LINES = env_int("CONTROLPLANE_JOB_LOG_LINES", 500, minimum=10)
CONTROLPLANE_UPLOAD_STALE_SECONDS = env_int("CONTROLPLANE_UPLOAD_STALE_SECONDS", 3600, minimum=60)
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
# Request bodies spooled to disk and extracted archives live here, where the sweep finds
# what a killed worker left.
CONTROLPLANE_UPLOAD_TMP_DIR = DATA_DIR / "tmp" / "uploads"
CONTROLPLANE_UPLOAD_TMP_DIR.mkdir(parents=True, exist_ok=True)
FILE_UPLOAD_TEMP_DIR = str(CONTROLPLANE_UPLOAD_TMP_DIR)

# --- MLflow ----------------------------------------------------------------------
MLFLOW_DIR = DATA_DIR / "mlflow"
# Unset: the local store under the data directory (make run starts an MLflow
# server on it and points everything at that server).
MLFLOW_TRACKING_URI = env_str("MLFLOW_TRACKING_URI", f"sqlite:///{MLFLOW_DIR / 'mlflow.db'}")
MLFLOW_ARTIFACT_ROOT = env_str("CONTROLPLANE_MLFLOW_ARTIFACT_ROOT", str(MLFLOW_DIR / "artifacts"))
# The control plane's own credential on an MLflow server that requires authentication
# (MLflow's basic-auth app). `make run` generates one for its embedded server, kept in
# <data>/mlflow/auth with mode 0600, and passes MLFLOW_TRACKING_PASSWORD_FILE.
MLFLOW_TRACKING_USERNAME = env_str("MLFLOW_TRACKING_USERNAME", "") or ""
MLFLOW_TRACKING_PASSWORD = env_str("MLFLOW_TRACKING_PASSWORD", "") or ""
if bool(MLFLOW_TRACKING_USERNAME) != bool(MLFLOW_TRACKING_PASSWORD):
    raise ImproperlyConfigured(
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or _FILE) go together"
    )
CONTROLPLANE_MODEL_CACHE_DIR = DATA_DIR / "models"

# --- REST API ----------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["accounts.permissions.HasScope"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # JSON only; the upload endpoint adds multipart for itself.
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_PAGINATION_CLASS": "controlplane.lib.pagination.Pagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "controlplane.lib.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "controlplane.lib.schema.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Control plane API",
    "DESCRIPTION": "Model registry, deployments and monitoring. Authenticate with `Authorization: Bearer <token>`.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    # Swagger UI assets come from the installed sidecar package: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "ModelVersionStatusEnum": "registry.models.ModelVersion.Status",
        "PromotionRequestStatusEnum": "registry.models.PromotionRequest.Status",
        "DeploymentStatusEnum": "deployments.models.Deployment.Status",
        "RevisionStateEnum": "deployments.models.Revision.State",
        "InstanceStateEnum": "deployments.models.Instance.State",
        "JobStateEnum": "jobs.models.Job.State",
    },
}

# --- monitoring ----------------------------------------------------------------------
# Intervals are read here because the beat schedule below uses them.
CONTROLPLANE_METRICS_INTERVAL = env_int("CONTROLPLANE_METRICS_INTERVAL", 15, minimum=1)
CONTROLPLANE_PROBE_INTERVAL = env_int("CONTROLPLANE_PROBE_INTERVAL", 300, minimum=5)
CONTROLPLANE_PROBE_TIMEOUT = env_int("CONTROLPLANE_PROBE_TIMEOUT", 10, minimum=1, maximum=120)
CONTROLPLANE_ALERT_INTERVAL = env_int("CONTROLPLANE_ALERT_INTERVAL", 60, minimum=5)
CONTROLPLANE_METRICS_RAW_RETENTION_HOURS = env_int(
    "CONTROLPLANE_METRICS_RAW_RETENTION_HOURS", 48, minimum=1
)
CONTROLPLANE_METRICS_MINUTE_RETENTION_DAYS = env_int(
    "CONTROLPLANE_METRICS_MINUTE_RETENTION_DAYS", 35, minimum=1
)
CONTROLPLANE_METRICS_HOUR_RETENTION_DAYS = env_int(
    "CONTROLPLANE_METRICS_HOUR_RETENTION_DAYS", 400, minimum=1
)
CONTROLPLANE_PREDICTION_RETENTION_DAYS = env_int(
    "CONTROLPLANE_PREDICTION_RETENTION_DAYS", 30, minimum=1
)
# Drift is not judged against a reference smaller than this (the default reference is the
# model's input example, often 3 rows): the UI says why instead of showing a PSI.
CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS = env_int(
    "CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS", 100, minimum=1
)
# Sent as a bearer token when pulling a model server's GET /predictions (SERVING_ADMIN_TOKEN).
CONTROLPLANE_SERVING_ADMIN_TOKEN = env_str("CONTROLPLANE_SERVING_ADMIN_TOKEN")
# The control plane's own GET /metrics answers a bearer token or an allow-listed address;
# with neither configured it answers nobody.
CONTROLPLANE_PROMETHEUS_TOKEN = env_str("CONTROLPLANE_PROMETHEUS_TOKEN")
if CONTROLPLANE_PROMETHEUS_TOKEN is not None and len(CONTROLPLANE_PROMETHEUS_TOKEN) < 16:
    raise ImproperlyConfigured("CONTROLPLANE_PROMETHEUS_TOKEN must be at least 16 characters long")


def _networks(name: str) -> list[str]:
    import ipaddress

    values = env_list(name, [])
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ImproperlyConfigured(
                f"{name}: {value!r} is not an IP address or network"
            ) from exc
    return values


CONTROLPLANE_PROMETHEUS_ALLOW = _networks("CONTROLPLANE_PROMETHEUS_ALLOW")
# Alert webhooks never go to private, loopback or link-local addresses unless listed here.
CONTROLPLANE_WEBHOOK_ALLOWED_NETWORKS = _networks("CONTROLPLANE_WEBHOOK_ALLOWED_NETWORKS")
CONTROLPLANE_WEBHOOK_TIMEOUT = env_int("CONTROLPLANE_WEBHOOK_TIMEOUT", 5, minimum=1, maximum=60)
CONTROLPLANE_WEBHOOK_RETRIES = env_int("CONTROLPLANE_WEBHOOK_RETRIES", 3, minimum=1, maximum=10)
# Alert e-mail goes through Django's mail backend (SMTP).
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1, maximum=65535)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "controlplane@localhost")
# plotly.min.js comes from the installed plotly package (no CDN).
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    "monitoring.staticfiles.PlotlyFinder",
]

# --- Celery ------------------------------------------------------------------------
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    # kombu's filesystem transport, writing each message atomically (see the module).
    CELERY_BROKER_TRANSPORT = "controlplane.lib.broker:Transport"
    _broker_dir = DATA_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.1,  # the embedded broker is a directory: look often, it is cheap
    }
else:
    # One connection attempt per publish, no retry loop: a request that enqueues after its
    # commit must not stall seconds while the broker is down (kombu's default retries for
    # up to 6 s). Nothing is lost by failing fast: the periodic pass redoes the work, and
    # workers reconnect on their own (Celery's broker_connection_retry).
    CELERY_BROKER_TRANSPORT_OPTIONS = {"max_retries": 0}
    if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
        CELERY_BROKER_TRANSPORT_OPTIONS["socket_connect_timeout"] = 2
    if CELERY_BROKER_URL.startswith("redis://"):
        # kombu's Redis transport, mended so a late ack on a lost connection does not stop
        # the worker (see the module). rediss:// keeps kombu's own: its TLS defaults come
        # with the scheme's name.
        CELERY_BROKER_TRANSPORT = "controlplane.lib.broker:RedisTransport"
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = env_str("CONTROLPLANE_TASK_QUEUE", "controlplane")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"
# Periodic work, declared in one place (editable afterwards in the admin).
CELERY_BEAT_SCHEDULE = {
    "deployments-reconcile": {
        "task": "deployments.tasks.reconcile_all",
        "schedule": float(env_int("CONTROLPLANE_RECONCILE_INTERVAL", 3, minimum=1)),
        "options": {"expires": 15},  # a stale pass is worthless: the next one is coming
    },
    "registry-sync-aliases": {
        "task": "registry.tasks.registry_sync",
        "schedule": float(env_int("CONTROLPLANE_REGISTRY_SYNC_INTERVAL", 60, minimum=5)),
    },
    "monitoring-collect": {
        "task": "monitoring.tasks.collect_all",
        "schedule": float(CONTROLPLANE_METRICS_INTERVAL),
        "options": {"expires": CONTROLPLANE_METRICS_INTERVAL * 2},
    },
    "monitoring-probe": {
        "task": "monitoring.tasks.probe_all",
        "schedule": float(CONTROLPLANE_PROBE_INTERVAL),
        "options": {"expires": CONTROLPLANE_PROBE_INTERVAL},
    },
    "monitoring-alerts": {
        "task": "monitoring.tasks.evaluate_alerts",
        "schedule": float(CONTROLPLANE_ALERT_INTERVAL),
        "options": {"expires": CONTROLPLANE_ALERT_INTERVAL * 2},
    },
    "registry-upload-sweep": {
        "task": "registry.tasks.upload_leftovers_sweep",
        "schedule": 900.0,
    },
    "monitoring-retention": {
        "task": "monitoring.tasks.apply_retention",
        "schedule": 3600.0,
    },
    "deployments-autoscale": {
        "task": "deployments.tasks.autoscale_all",
        "schedule": float(env_int("CONTROLPLANE_AUTOSCALE_INTERVAL", 1, minimum=1)),
        "options": {"expires": 2},  # a late poll is worthless: the next one is coming
    },
    "deployments-autoscale-prune": {
        "task": "deployments.tasks.autoscale_samples_prune",
        "schedule": 3600.0,
    },
    "jobs-sweep": {
        "task": "jobs.tasks.jobs_sweep",
        "schedule": float(env_int("CONTROLPLANE_JOBS_SWEEP_INTERVAL", 15, minimum=1)),
        "options": {"expires": 60},
    },
    "deployments-docker-images-cleanup": {
        "task": "deployments.tasks.docker_images_cleanup",
        "schedule": 3600.0,
        "options": {"expires": 3600},
    },
    "deployments-environments-cleanup": {
        "task": "deployments.tasks.environments_cleanup",
        "schedule": 3600.0,
        "options": {"expires": 3600},
    },
}

# --- logging -----------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "controlplane.lib.middleware.RequestIdLogFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"}
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["request_id"],
        }
    },
    "root": {
        "handlers": ["console"],
        "level": env_choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
    },
    "loggers": {
        "django.request": {"level": "ERROR"},
        "mlflow": {"level": "WARNING"},
        "alembic": {"level": "WARNING"},
    },
}

# --- product settings -------------------------------------------------------------
CONTROLPLANE_DEFAULT_RUNTIME = env_choice(
    "CONTROLPLANE_DEFAULT_RUNTIME", "local", ("local", "docker", "ray")
)
# The Ray cluster of the "ray" runtime (its GCS address, host:port; Ray's own RAY_ADDRESS
# when unset); empty: no cluster. CONTROLPLANE_RAY_NODE_IP: the address this control plane's
# Ray driver listens on (default: 127.0.0.1 for a cluster on loopback, else Ray's choice).
CONTROLPLANE_RAY_ADDRESS = env_str("CONTROLPLANE_RAY_ADDRESS", os.environ.get("RAY_ADDRESS", ""))
CONTROLPLANE_RAY_NODE_IP = env_str("CONTROLPLANE_RAY_NODE_IP")
# Where a ray deployment's router (its stable endpoint) runs: "auto", as a detached Ray actor
# on a node with an "ingress" custom resource when the cluster has one (the endpoint then
# outlives the control plane's host), else on the control plane's host; "off": always there.
CONTROLPLANE_RAY_INGRESS = env_choice("CONTROLPLANE_RAY_INGRESS", "auto", ("auto", "off"))
# Seconds after which what the actors leave on a node (model files and code, environments,
# logs, router directories) is removed once no live actor uses it (swept when an actor starts).
CONTROLPLANE_RAY_GC_AFTER_S = env_int("CONTROLPLANE_RAY_GC_AFTER_S", 86400, minimum=0)
CONTROLPLANE_ADMIN_PASSWORD = env_str("CONTROLPLANE_ADMIN_PASSWORD")
CONTROLPLANE_TOKEN_DEFAULT_DAYS = env_int("CONTROLPLANE_TOKEN_DEFAULT_DAYS", 90, minimum=1)
CONTROLPLANE_INSTALL_ID = env_str("CONTROLPLANE_INSTALL_ID")
CONTROLPLANE_DOCKER_BASE_IMAGE = env_str(
    "CONTROLPLANE_DOCKER_BASE_IMAGE", "python:3.11-slim-bookworm"
)
# "none": containers have no network; the router reaches each through a Unix socket.
CONTROLPLANE_DOCKER_NETWORK = env_choice(
    "CONTROLPLANE_DOCKER_NETWORK", "none", ("none", "host", "bridge")
)
# Refuse pickle/cloudpickle models on the local runtime where it cannot sandbox them (the
# control plane is not root): loading a pickle runs its code as the control plane's user.
CONTROLPLANE_LOCAL_REFUSE_PICKLE = env_bool("CONTROLPLANE_LOCAL_REFUSE_PICKLE", False)
# Shadow candidates are best effort: their servers run at idle CPU priority (local: SCHED_IDLE,
# docker: cpu_shares 2), so they never take CPU from the serving instances; the mirrors they
# cannot take are dropped and counted. A promoted shadow rolls out as a fresh revision.
CONTROLPLANE_SHADOW_IDLE_PRIORITY = env_bool("CONTROLPLANE_SHADOW_IDLE_PRIORITY", True)
CONTROLPLANE_PORT_RANGE = env_str("CONTROLPLANE_PORT_RANGE", "31000-32999")
CONTROLPLANE_RECONCILE_INTERVAL = env_int("CONTROLPLANE_RECONCILE_INTERVAL", 3, minimum=1)
# Seconds the previous revision's instances stay running (without traffic) after a
# rollout, so a rollback is a traffic switch instead of a cold start. 0 stops them at once.
CONTROLPLANE_ROLLBACK_WINDOW = env_int("CONTROLPLANE_ROLLBACK_WINDOW", 600, minimum=0)
CONTROLPLANE_PROGRESS_DEADLINE = env_int("CONTROLPLANE_PROGRESS_DEADLINE", 120, minimum=5)

# --- autoscaling (deployments/autoscaler.py, deployments/scaling.py) -----------------------
# Seconds between two polls of each autoscaled deployment's router (the beat task below).
CONTROLPLANE_AUTOSCALE_INTERVAL = env_int("CONTROLPLANE_AUTOSCALE_INTERVAL", 1, minimum=1)
# Defaults of a deployment's "autoscaling" windows (each can be set per deployment).
CONTROLPLANE_AUTOSCALE_SCALE_UP_WINDOW = env_int(
    "CONTROLPLANE_AUTOSCALE_SCALE_UP_WINDOW", 6, minimum=1, maximum=600
)
CONTROLPLANE_AUTOSCALE_SCALE_DOWN_WINDOW = env_int(
    "CONTROLPLANE_AUTOSCALE_SCALE_DOWN_WINDOW", 60, minimum=1, maximum=3600
)
CONTROLPLANE_AUTOSCALE_IDLE_BEFORE_ZERO = env_int(
    "CONTROLPLANE_AUTOSCALE_IDLE_BEFORE_ZERO", 60, minimum=1, maximum=86400
)
# While scaled to zero the router holds up to this many requests this long for a first
# instance, then answers 503 with Retry-After.
CONTROLPLANE_AUTOSCALE_HOLD_QUEUE = env_int(
    "CONTROLPLANE_AUTOSCALE_HOLD_QUEUE", 64, minimum=1, maximum=10000
)
CONTROLPLANE_AUTOSCALE_HOLD_TIMEOUT = env_int(
    "CONTROLPLANE_AUTOSCALE_HOLD_TIMEOUT", 30, minimum=1, maximum=600
)
# A queue of its own for the autoscaler's poll (`python -m controlplane.run` sets it and
# runs a one-slot worker on it); unset: the default queue.
CONTROLPLANE_AUTOSCALE_QUEUE = env_str("CONTROLPLANE_AUTOSCALE_QUEUE")
if CONTROLPLANE_AUTOSCALE_QUEUE:
    CELERY_TASK_ROUTES = {
        "deployments.tasks.autoscale_all": {"queue": CONTROLPLANE_AUTOSCALE_QUEUE}
    }
CONTROLPLANE_AUTOSCALE_SAMPLE_RETENTION_HOURS = env_int(
    "CONTROLPLANE_AUTOSCALE_SAMPLE_RETENTION_HOURS", 48, minimum=1
)

# --- per-model environments (deployments/environments.py) ---------------------------------
# "auto": the control plane's own interpreter when it has every requirement, else a built
# environment; "isolated": always built; "shared": always the control plane's.
CONTROLPLANE_DEFAULT_ENVIRONMENT = env_choice(
    "CONTROLPLANE_DEFAULT_ENVIRONMENT", "auto", ("auto", "isolated", "shared")
)
# Environments (<data>/environments/<key>/) no revision uses are removed this long after their last use.
CONTROLPLANE_ENV_RETENTION_DAYS = env_int("CONTROLPLANE_ENV_RETENTION_DAYS", 7, minimum=0)
# Serving images (docker runtime) no container used for this long are removed (hourly).
CONTROLPLANE_DOCKER_IMAGE_RETENTION_DAYS = env_int(
    "CONTROLPLANE_DOCKER_IMAGE_RETENTION_DAYS", 7, minimum=0
)
CONTROLPLANE_ENV_BUILD_TIMEOUT = env_int(
    "CONTROLPLANE_ENV_BUILD_TIMEOUT", 900, minimum=30, maximum=7200
)
# Where every build (local environments, docker images) finds packages. Unset: what pip is
# configured with on this host (PIP_* variables, pip.conf); set to empty: nothing.
# CONTROLPLANE_PIP_INDEX_URL=none builds from CONTROLPLANE_PIP_FIND_LINKS only.
CONTROLPLANE_PIP_INDEX_URL = env_str("CONTROLPLANE_PIP_INDEX_URL")
CONTROLPLANE_PIP_EXTRA_INDEX_URL = env_str("CONTROLPLANE_PIP_EXTRA_INDEX_URL")  # space/comma
CONTROLPLANE_PIP_CERT = env_str("CONTROLPLANE_PIP_CERT")  # CA bundle
CONTROLPLANE_PIP_FIND_LINKS = env_str("CONTROLPLANE_PIP_FIND_LINKS")  # wheelhouse dirs
CONTROLPLANE_PIP_CONSTRAINT = env_str("CONTROLPLANE_PIP_CONSTRAINT")  # constraint files
for _name in ("CONTROLPLANE_PIP_CERT", "CONTROLPLANE_PIP_CONSTRAINT"):
    _value = globals()[_name]
    for _path in (_value or "").replace(",", " ").split():
        if not Path(_path).is_file():
            raise ImproperlyConfigured(f"{_name}: {_path} is not a file")

# --- single sign-on (OpenID Connect, mozilla-django-oidc; accounts/oidc.py) -----------------
# Off unless CONTROLPLANE_OIDC_CLIENT_ID is set. The endpoints are the provider's (its
# /.well-known/openid-configuration lists them); no discovery call is made at start-up.
CONTROLPLANE_OIDC_ENABLED = bool(env_str("CONTROLPLANE_OIDC_CLIENT_ID"))
CONTROLPLANE_OIDC_PROVIDER_NAME = env_str("CONTROLPLANE_OIDC_PROVIDER_NAME", "single sign-on")
# The claim listing the user's groups, and IdP group -> our role ("grp-a=deployer,grp-b=viewer").
CONTROLPLANE_OIDC_ROLES_CLAIM = env_str("CONTROLPLANE_OIDC_ROLES_CLAIM", "groups")
CONTROLPLANE_OIDC_ROLE_MAP = env_str("CONTROLPLANE_OIDC_ROLE_MAP", "")
# Least privilege: a user whose groups map to no role gets this one ("" = none, or "viewer").
CONTROLPLANE_OIDC_DEFAULT_ROLE = env_choice("CONTROLPLANE_OIDC_DEFAULT_ROLE", "", ("", "viewer"))
CONTROLPLANE_OIDC_USERNAME_CLAIM = env_str("CONTROLPLANE_OIDC_USERNAME_CLAIM", "preferred_username")
# Off: the login page and the admin refuse passwords (API tokens keep working).
CONTROLPLANE_LOCAL_LOGIN = env_bool("CONTROLPLANE_LOCAL_LOGIN", True)
OIDC_AUTHENTICATION_CALLBACK_URL = "oidc-callback"
if not CONTROLPLANE_LOCAL_LOGIN and not CONTROLPLANE_OIDC_ENABLED:
    raise ImproperlyConfigured(
        "CONTROLPLANE_LOCAL_LOGIN=false needs single sign-on (CONTROLPLANE_OIDC_CLIENT_ID ...)"
    )
if CONTROLPLANE_OIDC_ENABLED:
    OIDC_RP_CLIENT_ID = env_str("CONTROLPLANE_OIDC_CLIENT_ID")
    OIDC_RP_CLIENT_SECRET = env_str("CONTROLPLANE_OIDC_CLIENT_SECRET")
    for _name in (
        "CONTROLPLANE_OIDC_CLIENT_SECRET",
        "CONTROLPLANE_OIDC_AUTHORIZATION_ENDPOINT",
        "CONTROLPLANE_OIDC_TOKEN_ENDPOINT",
        "CONTROLPLANE_OIDC_USERINFO_ENDPOINT",
        "CONTROLPLANE_OIDC_JWKS_ENDPOINT",
    ):
        if not env_str(_name):
            raise ImproperlyConfigured(f"{_name} is required with CONTROLPLANE_OIDC_CLIENT_ID")
    OIDC_OP_AUTHORIZATION_ENDPOINT = env_str("CONTROLPLANE_OIDC_AUTHORIZATION_ENDPOINT")
    OIDC_OP_TOKEN_ENDPOINT = env_str("CONTROLPLANE_OIDC_TOKEN_ENDPOINT")
    OIDC_OP_USER_ENDPOINT = env_str("CONTROLPLANE_OIDC_USERINFO_ENDPOINT")
    OIDC_OP_JWKS_ENDPOINT = env_str("CONTROLPLANE_OIDC_JWKS_ENDPOINT")
    OIDC_OP_LOGOUT_ENDPOINT = env_str("CONTROLPLANE_OIDC_LOGOUT_ENDPOINT")
    OIDC_RP_SIGN_ALGO = env_choice(
        "CONTROLPLANE_OIDC_SIGN_ALGO", "RS256", ("RS256", "RS384", "RS512", "ES256", "ES384")
    )
    OIDC_RP_SCOPES = env_str("CONTROLPLANE_OIDC_SCOPES", "openid email profile")
    OIDC_USE_PKCE = True
    OIDC_TIMEOUT = 10
    OIDC_VERIFY_SSL = env_bool("CONTROLPLANE_OIDC_VERIFY_SSL", True)
    LOGIN_REDIRECT_URL_FAILURE = "/login/?sso=failed"
    AUTHENTICATION_BACKENDS.append("accounts.oidc.RoleMappingBackend")
if not CONTROLPLANE_LOCAL_LOGIN:
    AUTHENTICATION_BACKENDS.remove("django.contrib.auth.backends.ModelBackend")
