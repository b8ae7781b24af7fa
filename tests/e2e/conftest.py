"""Fixtures for the browser tests: the whole control plane as a user starts it
(``python -m controlplane.run`` on its embedded defaults: SQLite, the directory
broker, its own MLflow server, gunicorn, a Celery worker and beat) and Debian's
Chromium driven by Playwright. Browser downloads are impossible here, so the
system Chromium is launched by path; without it the tests skip, unless
REQUIRE_BROWSER=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from controlplane.lib.env import env_bool
from tests.support import free_port, wait_http

if TYPE_CHECKING:
    from playwright.sync_api import Browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts" / "e2e"
VIEWPORT = {"width": 1366, "height": 900}
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Settings the test process has (test database, shared broker, its own MLflow) that
# must not leak into the control plane under test: it runs on its embedded defaults.
NOT_INHERITED = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "MLFLOW_TRACKING_URI",
    "DJANGO_SETTINGS_MODULE",
    "CONTROLPLANE_TASK_QUEUE",
    "CONTROLPLANE_DATA_DIR",
    "CONTROLPLANE_INSTALL_ID",
)


@dataclass(frozen=True)
class ControlPlane:
    url: str
    mlflow_url: str
    admin_password: str
    data_dir: Path
    install_id: str
    log: Path


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """A headless Chromium (Debian's package), shared by a module's tests. Not by the whole
    session: Playwright's sync API keeps an event loop running in this thread while it is
    open, and every later test's ORM call in this process would be refused."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is not installed (run .ci/browser-setup.sh)"
        if env_bool("REQUIRE_BROWSER", False):
            pytest.fail(f"REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go (gitignored): test-artifacts/e2e/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the item, so fixtures can tell a failed test."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def control_plane(
    request: pytest.FixtureRequest, tmp_path: Path, artifacts: Path
) -> Iterator[ControlPlane]:
    """``python -m controlplane.run`` in its own data directory, on free ports.

    Short reconcile and collection intervals keep the journey quick; everything
    else is what ``make run`` gives a user. The model servers it starts are not
    its children (they outlive a restart by design): they are found by their
    owner label and killed afterwards.
    """
    port, mlflow_port = free_port(), free_port()
    password = f"admin-{uuid.uuid4().hex[:12]}"
    install_id = f"cp-e2e-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(
        CONTROLPLANE_DATA_DIR=str(data_dir),
        CONTROLPLANE_ADMIN_PASSWORD=password,
        CONTROLPLANE_INSTALL_ID=install_id,
        CONTROLPLANE_RECONCILE_INTERVAL="1",
        CONTROLPLANE_METRICS_INTERVAL="2",
        PORT=str(port),
        MLFLOW_PORT=str(mlflow_port),
        MLFLOW_DISABLE_TELEMETRY="true",
        WEB_CONCURRENCY="2",
        # gunicorn's control socket goes here, not to a developer's ~/.gunicorn.
        XDG_RUNTIME_DIR=str(tmp_path),
    )
    log_path = tmp_path / "controlplane.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.run"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", timeout=150, proc=proc)
            yield ControlPlane(
                url=f"http://127.0.0.1:{port}",
                mlflow_url=f"http://127.0.0.1:{mlflow_port}",
                admin_password=password,
                data_dir=data_dir,
                install_id=install_id,
                log=log_path,
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            _kill_labelled(install_id)
            shutil.copy(log_path, artifacts / "controlplane.log")
            report = getattr(request.node, "rep_call", None)
            if report is None or report.failed:
                _print_tail(log_path)


def _kill_labelled(owner: str) -> None:
    """The model servers and routers the journey's deployments started."""
    from deployments.runtimes import process

    for info in process.find_labelled(owner):
        try:
            os.kill(info.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _print_tail(log_path: Path) -> None:
    """Server-side tracebacks explain a failed browser step better than a screenshot."""
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-80:])
    print(
        f"\n--- control plane log, last lines (all of it: {ARTIFACTS}/controlplane.log) ---\n{tail}\n",
        file=sys.stderr,
    )


@pytest.fixture(scope="module")
def chromium_with_db(request: pytest.FixtureRequest, django_db_setup) -> Iterator[Browser]:
    """The shared Chromium for tests that also use the test database in this process
    (a live server). The test database is set up first: Playwright's sync API runs an
    event loop in this thread, and Django refuses ORM calls from a thread with one
    unless DJANGO_ALLOW_ASYNC_UNSAFE says they are plain synchronous code, as here."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    try:
        yield request.getfixturevalue("chromium")
    finally:
        patch.undo()
