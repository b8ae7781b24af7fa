"""Per-model Python environments: one resolver, one local builder.

The resolver reads a model directory's MLflow environment files (``requirements.txt``,
``python_env.yaml``; the ``pip`` section of ``conda.yaml`` when there is no requirements.txt)
and ``serving/requirements.txt`` (what the model server itself needs) into a normalized,
sorted requirement set, the Python version the model asks for, and a key: the sha256 of
those and RECIPE_VERSION. Every runtime uses it: the local runtime builds a virtual
environment per key (EnvironmentBuilder, below), the docker runtime an image per key (with
its base image and serving code). Only plain requirement specifiers are accepted
(``packaging.requirements.Requirement``): ``-r``, options, paths and URLs are refused.

The builder makes ``<root>/<key>/`` with ``uv`` (the ``uv`` wheel's binary; ``python -m venv``
and pip when it is missing): built in a temporary directory beside it, renamed into place
with a completion marker written last, under a file lock per key, so a crash mid-build leaves
nothing that looks complete and two revisions preparing the same key build it once. Nothing
here imports Django: settings come in through IndexOptions and the builder's arguments.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from deployments.runtimes.base import Progress, RuntimeError_

logger = logging.getLogger(__name__)

# Bump when the way an environment is made changes: every key changes with it.
RECIPE_VERSION = "2"
SERVING_REQUIREMENTS = Path(__file__).resolve().parents[1] / "serving" / "requirements.txt"
ENVIRONMENT_CHOICES = ("auto", "isolated", "shared")
DEFAULT_ENVIRONMENT = "auto"

COMPLETE_MARKER = ".complete"  # written last: an env without it is a killed build
BYTECODE_MARKER = ".bytecode"  # written when every module's bytecode is on disk
BYTECODE_MODES = ("background", "build", "off")
# compileall -x: what no server imports (test suites are a third of a scientific stack's files)
_BYTECODE_SKIP = r"/(tests?|testing)/"
# The env's interpreter runs as this process's user to compile: isolated and without the site
# module, so no .pth file or module of the model's packages runs (compiling executes nothing).
_NO_SITE = ("-I", "-S")
LAST_USED = ".last-used"  # its mtime is the last time a revision prepared or started on it
METADATA = "environment.json"
_TMP_PREFIX = ".build-"
_LOCKS = ".locks"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PYTHON_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.\d+)?")


class EnvironmentFailure(RuntimeError_):
    """The model's environment cannot be resolved or built; the message says why (for a
    failed install: the installer's own lines naming the package and the reason)."""


# --- resolution ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedEnvironment:
    """What a model needs to be served: its own requirements, the server's, the Python."""

    python: str | None  # "3.11" (major.minor) the model asks for, None if it says nothing
    model_requirements: tuple[str, ...]
    serving_requirements: tuple[str, ...]
    build_requirements: tuple[str, ...] = ()  # python_env.yaml's build_dependencies
    sources: tuple[str, ...] = ()  # the files read, for messages

    @property
    def requirements(self) -> tuple[str, ...]:
        """Model and serving requirements, sorted and deduplicated: what an env installs."""
        return tuple(sorted(set(self.model_requirements) | set(self.serving_requirements)))

    @property
    def install_requirements(self) -> tuple[str, ...]:
        """requirements plus the build dependencies the requirements do not name already."""
        named = {_name(line) for line in self.requirements}
        extra = [line for line in self.build_requirements if _name(line) not in named]
        return tuple(sorted(set(self.requirements) | set(extra)))

    @property
    def key(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"recipe {RECIPE_VERSION}\npython {self.python or 'any'}\n".encode())
        for line in self.requirements:
            digest.update(f"req {line}\n".encode())
        for line in self.build_requirements:
            digest.update(f"build {line}\n".encode())
        return digest.hexdigest()

    @property
    def top_level(self) -> list[str]:
        """The model's own requirement names (what a user recognises), in file order-free form."""
        return sorted({_name(line) for line in self.model_requirements})


def _name(line: str) -> str:
    return canonicalize_name(Requirement(line).name)


def normalize_requirements(
    lines: Iterable[str], *, source: str, skinny_mlflow: bool = True
) -> list[str]:
    """Plain requirement lines, sorted and deduplicated; ``mlflow`` becomes ``mlflow-skinny``
    (enough to load pyfunc models, a fraction of the size). Raises EnvironmentFailure on a
    line that is not a plain requirement specifier (``-r``, options, paths, URLs)."""
    out = set()
    for raw in lines:
        line = str(raw).split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise EnvironmentFailure(
                f"{source}: {line!r}: options and includes (-r, -c, -e, --index-url...) are not "
                "supported; list plain requirement specifiers (name[extras] specifier; markers)"
            )
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            raise EnvironmentFailure(
                f"{source}: {line!r} is not a plain requirement specifier (paths and archive "
                "files are not supported)"
            ) from None
        if requirement.url:
            raise EnvironmentFailure(f"{source}: {line!r}: URL requirements are not supported")
        if skinny_mlflow and canonicalize_name(requirement.name) == "mlflow":
            requirement.name = "mlflow-skinny"
            requirement.extras = set()  # mlflow's extras are for the tracking server
        out.add(str(requirement))
    return sorted(out)


def _python_version(value: object, *, source: str) -> str:
    match = _PYTHON_VERSION.match(str(value).strip())
    if not match:
        raise EnvironmentFailure(f"{source}: python version {value!r} is not like 3.11 or 3.11.7")
    return f"{match.group(1)}.{match.group(2)}"


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EnvironmentFailure(f"{path.name} cannot be read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EnvironmentFailure(f"{path.name} is not a mapping")
    return data


def _conda_pip_and_python(path: Path) -> tuple[list[str] | None, str | None]:
    deps = _read_yaml(path).get("dependencies") or []
    pip, python = None, None
    for dep in deps if isinstance(deps, list) else []:
        if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
            pip = [str(item) for item in dep["pip"]]
        elif isinstance(dep, str) and re.match(r"^python\s*[=<>]", dep):
            python = _python_version(re.sub(r"^python\s*[=<>]+\s*", "", dep), source=path.name)
    return pip, python


def resolve(
    model_dir: str | os.PathLike[str],
    *,
    serving_requirements: str | os.PathLike[str] = SERVING_REQUIREMENTS,
    skinny_mlflow: bool = True,
) -> ResolvedEnvironment:
    """The environment a model directory asks for, plus what the model server needs."""
    model_dir = Path(model_dir)
    sources = []
    python: str | None = None
    build: list[str] = []
    model_lines: list[str] | None = None
    python_env = model_dir / "python_env.yaml"
    if python_env.is_file():
        sources.append(python_env.name)
        data = _read_yaml(python_env)
        if data.get("python") is not None:
            python = _python_version(data["python"], source=python_env.name)
        build = normalize_requirements(
            data.get("build_dependencies") or [],
            source=f"{python_env.name} build_dependencies",
            skinny_mlflow=skinny_mlflow,
        )
    requirements = model_dir / "requirements.txt"
    conda = model_dir / "conda.yaml"
    if requirements.is_file():
        sources.append(requirements.name)
        model_lines = requirements.read_text().splitlines()
        source = requirements.name
    if conda.is_file():
        pip, conda_python = _conda_pip_and_python(conda)
        if model_lines is None and pip is not None:
            sources.append(f"{conda.name} (pip section)")
            model_lines, source = pip, f"{conda.name} pip section"
        python = python or conda_python
    if model_lines is None:
        raise EnvironmentFailure(
            f"the model at {model_dir} declares no requirements (no requirements.txt, and no "
            "pip section in conda.yaml): save it with MLflow's log_model/save_model"
        )
    serving_path = Path(serving_requirements)
    if not serving_path.is_file():
        raise EnvironmentFailure(f"{serving_path} is missing: the model server's requirements")
    return ResolvedEnvironment(
        python=python,
        model_requirements=tuple(
            normalize_requirements(model_lines, source=source, skinny_mlflow=skinny_mlflow)
        ),
        serving_requirements=tuple(
            normalize_requirements(
                serving_path.read_text().splitlines(),
                source=str(serving_path.name),
                skinny_mlflow=skinny_mlflow,
            )
        ),
        build_requirements=tuple(build),
        sources=tuple(sources),
    )


# --- can the control plane's own interpreter serve it? ---------------------------------------


def current_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def unsatisfied(requirements: Iterable[str]) -> list[str]:
    """The requirements this interpreter's installed distributions do not satisfy (markers
    evaluated here; extras' own requirements checked too). Empty: it can serve the model."""
    return [line for line in requirements if not _satisfied(Requirement(line), set())]


def _satisfied(requirement: Requirement, seen: set[str]) -> bool:
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        return True  # not for this platform: nothing to install
    name = canonicalize_name(requirement.name)
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    if requirement.specifier and not requirement.specifier.contains(dist.version, prereleases=True):
        return False
    for extra in sorted(requirement.extras):
        if f"{name}[{extra}]" in seen:
            continue
        seen.add(f"{name}[{extra}]")
        for raw in dist.requires or []:
            dep = Requirement(raw)
            if dep.marker is None:
                continue  # a base dependency: installed with the distribution
            if dep.marker.evaluate({"extra": extra}) and not dep.marker.evaluate({"extra": ""}):
                dep.marker = None
                if not _satisfied(dep, seen):
                    return False
    return True


def shared_interpreter_serves(resolved: ResolvedEnvironment) -> tuple[bool, list[str]]:
    """(True, []) when the control plane's interpreter has the Python version and every
    requirement; else (False, what is missing) for the environment event."""
    missing = unsatisfied(resolved.requirements)
    if resolved.python and resolved.python != current_python():
        missing.insert(0, f"python {resolved.python} (this is {current_python()})")
    return not missing, missing


# --- package indexes -----------------------------------------------------------------------


@dataclass(frozen=True)
class IndexOptions:
    """Where builds find packages: passed to every build (uv, pip, pip download).

    ``index_url`` "none" means no index at all (only ``find_links``)."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    cert: str | None = None
    find_links: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()

    def pip_args(self) -> list[str]:
        args: list[str] = []
        if self.index_url == "none":
            args.append("--no-index")
        elif self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        if self.cert:
            args += ["--cert", self.cert]
        for path in self.constraints:
            args += ["--constraint", path]
        return args

    def uv_args(self) -> list[str]:
        args: list[str] = []
        if self.index_url == "none":
            args.append("--no-index")
        elif self.index_url:
            args += ["--default-index", self.index_url]
        for url in self.extra_index_urls:
            args += ["--index", url]
        for link in self.find_links:
            args += ["--find-links", link]
        for path in self.constraints:
            args += ["--constraints", path]
        # pip's behaviour: the best version over every index and wheelhouse, not uv's default
        # "first index that has the name" (a partial mirror listed first would hide newer
        # releases). A wheelhouse's local-version wheel (torch 2.13.0+cpu) sorts above the
        # index's 2.13.0 for "torch==2.13.0", so the CPU wheel on disk wins over PyPI's CUDA one.
        args += ["--index-strategy", "unsafe-best-match"]
        return args

    def uv_env(self) -> dict[str, str]:
        return {"SSL_CERT_FILE": self.cert} if self.cert else {}


def _split_urls(value: str | None) -> tuple[str, ...]:
    return tuple(item for item in re.split(r"[\s,]+", value or "") if item)


def host_pip_config(python: str = sys.executable) -> dict[str, str]:
    """What pip is configured with on this host (``pip config list``: files and PIP_* env),
    as {option: value}, env over install over global sections."""
    try:
        result = subprocess.run(
            [python, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    ranked: dict[str, tuple[int, str]] = {}
    rank = {"global": 0, "install": 1, "download": 1, ":env:": 2}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or section not in rank:
            continue
        value = value.strip().strip("'\"")
        if option not in ranked or rank[section] >= ranked[option][0]:
            ranked[option] = (rank[section], value)
    return {option: value for option, (_, value) in ranked.items()}


def index_options(
    *,
    index_url: str | None = None,
    extra_index_url: str | None = None,
    cert: str | None = None,
    find_links: str | None = None,
    constraint: str | None = None,
    host_config: dict[str, str] | None = None,
) -> IndexOptions:
    """Settings first (None: unset; "" set to nothing), else what the host's pip uses."""
    host = host_pip_config() if host_config is None else host_config

    def pick(value: str | None, option: str) -> str | None:
        return value if value is not None else host.get(option)

    return IndexOptions(
        index_url=pick(index_url, "index-url") or None,
        extra_index_urls=_split_urls(pick(extra_index_url, "extra-index-url")),
        cert=pick(cert, "cert") or None,
        find_links=_split_urls(pick(find_links, "find-links")),
        constraints=_split_urls(pick(constraint, "constraint")),
    )


# --- the local builder ----------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltEnvironment:
    key: str
    path: Path
    python: Path  # <path>/bin/python
    built: bool  # False: an existing complete environment was reused
    seconds: float = 0.0
    packages: tuple[str, ...] = field(default=())  # name==version of what is installed


def _find_uv() -> str | None:
    try:
        import uv
    except ImportError:
        return None
    try:
        return uv.find_uv_bin()
    except FileNotFoundError:
        return None


class EnvironmentBuilder:
    """Virtual environments under ``root``, one per ResolvedEnvironment.key."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        index: IndexOptions | Callable[[], IndexOptions] = IndexOptions(),
        base_python: str | None = None,
        timeout: float = 900.0,
        uv: str | None | bool = None,
        bytecode: str = "background",
    ) -> None:
        """``index`` may be a callable (read once, at the first build: the host's pip config
        costs a subprocess). ``uv`` None finds the uv wheel's binary, False forces pip.

        ``bytecode``: sandboxed servers run as a uid that cannot write ``__pycache__`` in the
        environment, so without bytecode on disk every start compiles all it imports again
        (scikit-learn's server: about 10 s more per start on a loaded 2-core machine).
        "background" (default) compiles the environment's modules (``compileall``, test
        directories left out, at low CPU priority) after the environment is complete, so the
        build is not delayed and later starts find the bytecode (``BYTECODE_MARKER`` written
        when done; a missing marker restarts the compile at the next ``ensure``); "build"
        compiles before the environment is marked complete; "off" never."""
        if bytecode not in BYTECODE_MODES:
            raise ValueError(f"bytecode must be one of {BYTECODE_MODES}, not {bytecode!r}")
        self.root = Path(root)
        self._index = index
        self.base_python = base_python or os.path.realpath(
            getattr(sys, "_base_executable", None) or sys.executable
        )
        self.timeout = timeout
        self.uv = None if uv is False else (uv or _find_uv())
        self.bytecode = bytecode
        self._compiling: dict[str, subprocess.Popen] = {}
        self._compiling_lock = threading.Lock()
        self.builds = 0  # environments this object built (reuse leaves it unchanged)

    @property
    def index(self) -> IndexOptions:
        if callable(self._index):
            self._index = self._index()
        return self._index

    def path(self, key: str) -> Path:
        return self.root / key

    def complete(self, key: str) -> Path | None:
        """The env's python if the env is complete (marker present), else None."""
        path = self.path(key)
        if (path / COMPLETE_MARKER).is_file() and (path / "bin" / "python").exists():
            return path / "bin" / "python"
        return None

    def touch(self, key: str) -> None:
        with contextlib.suppress(OSError):
            marker = self.path(key) / LAST_USED
            marker.touch(mode=0o644)
            os.utime(marker)

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        locks = self.root / _LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        with open(locks / f"{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ensure(
        self, resolved: ResolvedEnvironment, *, progress: Progress | None = None
    ) -> BuiltEnvironment:
        """The complete environment for ``resolved``: reused if built, else built now."""
        key = resolved.key
        python = self.complete(key)
        if python is None:
            try:
                with self._lock(key):
                    python = self.complete(key)  # built by another thread or process meanwhile
                    if python is None:
                        return self._build(resolved, progress)
            except OSError as exc:  # a full disk, a read-only data dir: say so, do not crash
                raise EnvironmentFailure(
                    f"building environment {key[:12]} under {self.root}: {exc}"
                ) from exc
        self.touch(key)
        self._start_bytecode(key)
        return BuiltEnvironment(key=key, path=self.path(key), python=python, built=False)

    def _build(self, resolved: ResolvedEnvironment, progress: Progress | None) -> BuiltEnvironment:
        key = resolved.key
        final = self.path(key)
        if final.exists():  # no marker: a build killed after its rename (older recipe), or junk
            shutil.rmtree(final, ignore_errors=True)
        requirements = resolved.install_requirements
        tool = "uv" if self.uv else "pip"
        python_request = self._python_request(resolved)
        if progress:
            names = ", ".join(resolved.top_level[:12])
            more = len(resolved.top_level) - 12
            progress(
                f"building environment {key[:12]} with {tool}: {len(requirements)} requirements "
                f"for Python {resolved.python or current_python()} ({names}"
                f"{f' and {more} more' if more > 0 else ''})"
            )
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key[:12]}-", dir=self.root))
        try:
            (tmp / "requirements.txt").write_text("\n".join(requirements) + "\n")
            venv = tmp / "env"
            if self.uv:
                self._uv_build(venv, tmp / "requirements.txt", python_request)
            else:
                self._pip_build(venv, tmp / "requirements.txt", python_request)
            packages = _installed(venv)
            if self.bytecode == "build":
                self._compile_bytecode(venv, shown_as=final)
            seconds = time.monotonic() - started
            (venv / METADATA).write_text(
                json.dumps(
                    {
                        "key": key,
                        "recipe": RECIPE_VERSION,
                        "python": resolved.python,
                        "requirements": list(requirements),
                        "sources": list(resolved.sources),
                        "tool": tool,
                        "built_at": time.time(),
                        "seconds": round(seconds, 2),
                        "packages": packages,
                    },
                    indent=1,
                )
            )
            _check_readable(venv)
            # Marker last, then one rename: a crash at any point before leaves only a
            # temporary directory (removed by cleanup) and never a complete-looking env.
            (venv / COMPLETE_MARKER).write_text(f"{key}\n")
            os.chmod(venv / COMPLETE_MARKER, 0o644)
            os.rename(venv, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.touch(key)
        self.builds += 1
        self._start_bytecode(key)
        seconds = time.monotonic() - started
        if progress:
            progress(
                f"environment {key[:12]} built in {seconds:.1f} s: {len(packages)} packages installed"
            )
        logger.info("built environment %s in %.1fs (%d packages)", key[:12], seconds, len(packages))
        return BuiltEnvironment(
            key=key,
            path=final,
            python=final / "bin" / "python",
            built=True,
            seconds=seconds,
            packages=tuple(packages),
        )

    def _python_request(self, resolved: ResolvedEnvironment) -> str:
        if resolved.python is None or resolved.python == current_python():
            return self.base_python
        return resolved.python

    def _run(self, argv: list[str], *, what: str, env: dict[str, str] | None = None) -> str:
        """Run an installer step; it dies with the thread that runs it (PR_SET_PDEATHSIG), so a
        builder killed mid-way leaves no installer writing into its temporary directory."""
        full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
        # uv must not read a project's or the user's configuration instead of ours.
        full_env.pop("VIRTUAL_ENV", None)
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
                env=full_env,
                cwd=self.root,
                # Model servers may run as another user (the sandbox's): what the installer
                # creates is world-readable from the start, so nothing walks the tree after.
                umask=0o022,
                preexec_fn=_die_with_parent(),
            )
        except subprocess.TimeoutExpired:
            raise EnvironmentFailure(f"{what} took longer than {self.timeout:.0f} s") from None
        except OSError as exc:
            raise EnvironmentFailure(f"{what}: {exc}") from None
        if result.returncode != 0:
            raise EnvironmentFailure(
                f"{what} failed (exit code {result.returncode}):\n"
                + installer_errors(result.stderr or result.stdout)
            )
        return result.stdout

    def _uv_build(self, venv: Path, requirements: Path, python: str) -> None:
        uv = self.uv
        assert uv is not None
        common = ["--no-config", "--color", "never", "--no-progress", "--quiet"]
        self._run(
            [
                uv,
                "venv",
                str(venv),
                "--python",
                python,
                "--relocatable",
                "--no-project",
                "--no-managed-python",
                "--no-python-downloads",
                *common,
            ],
            what=f"creating the virtual environment (Python {_python_label(python)})",
        )
        self._run(
            [
                uv,
                "pip",
                "install",
                "--python",
                str(venv / "bin" / "python"),
                "--requirements",
                str(requirements),
                # Files are hard links into uv's cache (same filesystem; uv copies where it
                # cannot link): torch's 15,000 files are not copied. Nothing writes to an
                # environment's files after the build, so sharing the cache's inodes is safe.
                "--link-mode",
                "hardlink",
                *self.index.uv_args(),
                *common,
            ],
            what="installing the model's requirements (uv pip install)",
            env=self.index.uv_env(),
        )

    def _pip_build(self, venv: Path, requirements: Path, python: str) -> None:
        if not os.path.isabs(python):
            raise EnvironmentFailure(
                f"the model asks for Python {python}; without uv only this control plane's "
                f"Python {current_python()} can be used"
            )
        self._run([python, "-m", "venv", str(venv)], what="creating the virtual environment")
        self._run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                "--requirement",
                str(requirements),
                *self.index.pip_args(),
            ],
            what="installing the model's requirements (pip install)",
        )

    def compile(self, requirements: Iterable[str], *, python: str | None = None) -> list[str]:
        """What a build of ``requirements`` would install (``name==version``), resolved with
        the same indexes and strategy, without installing anything (uv only)."""
        if not self.uv:
            raise EnvironmentFailure("resolving without installing needs uv")
        with tempfile.TemporaryDirectory(prefix=".compile-", dir=self._scratch()) as tmp:
            path = Path(tmp, "requirements.in")
            path.write_text("\n".join(requirements) + "\n")
            out = self._run(
                [
                    self.uv,
                    "pip",
                    "compile",
                    str(path),
                    "--python-version",
                    python or current_python(),
                    "--no-header",
                    "--no-annotate",
                    "--no-config",
                    "--color",
                    "never",
                    "--quiet",
                    *self.index.uv_args(),
                ],
                what="resolving the requirements (uv pip compile)",
                env=self.index.uv_env(),
            )
        return [line.strip() for line in out.splitlines() if "==" in line]

    def _scratch(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    # --- bytecode -------------------------------------------------------------------------

    def _compile_script(
        self, site_packages: Path, shown_as: Path | None, marker: Path | None, lock: Path | None
    ) -> str:
        return (
            "import compileall, fcntl, os, re, sys\n"
            f"lock = {str(lock)!r} if {lock is not None} else None\n"
            "if lock:\n"
            "    handle = open(lock, 'w')\n"
            "    try:\n"
            "        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "    except BlockingIOError:\n"
            "        sys.exit(0)  # another process compiles this environment\n"
            f"compileall.compile_dir({str(site_packages)!r}, quiet=2, workers=0,\n"
            f"    rx=re.compile({_BYTECODE_SKIP!r}),\n"
            f"    ddir={str(shown_as) if shown_as else None!r})\n"
            f"marker = {str(marker) if marker else None!r}\n"
            "if marker:\n"
            "    open(marker, 'w').write('done\\n')\n"
        )

    def _compile_bytecode(self, venv: Path, *, shown_as: Path) -> None:
        """Compile now (bytecode "build"): before the environment is marked complete."""
        site = _site_packages(venv)
        if site is None:
            return
        script = self._compile_script(site, _site_packages(shown_as, must_exist=False), None, None)
        self._run(
            [str(venv / "bin" / "python"), *_NO_SITE, "-c", script], what="compiling bytecode"
        )
        (venv / BYTECODE_MARKER).write_text("done\n")

    def _start_bytecode(self, key: str) -> None:
        """Bytecode "background": start compiling the env's modules unless done or running."""
        if self.bytecode != "background":
            return
        env = self.path(key)
        if (env / BYTECODE_MARKER).exists():
            return
        with self._compiling_lock:
            running = self._compiling.get(key)
            if running is not None and running.poll() is None:
                return
            site = _site_packages(env)
            if site is None:
                return
            script = self._compile_script(
                site, None, env / BYTECODE_MARKER, self.root / _LOCKS / f"{key}.bytecode.lock"
            )
            nice = shutil.which("nice")
            argv = [
                *([nice, "-n", "19"] if nice else []),
                str(env / "bin" / "python"),
                *_NO_SITE,
                "-c",
                script,
            ]
            try:
                self._compiling[key] = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # outlives a worker that stops meanwhile
                    umask=0o022,
                    close_fds=True,
                )
            except OSError as exc:
                logger.warning("cannot compile the bytecode of environment %s: %s", key[:12], exc)

    def bytecode_ready(self, key: str) -> bool:
        return (self.path(key) / BYTECODE_MARKER).exists()

    def wait_bytecode(self, key: str, timeout: float = 600.0) -> bool:
        """Wait until the environment's bytecode is on disk (benchmarks; tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.bytecode_ready(key):
                return True
            time.sleep(0.1)
        return self.bytecode_ready(key)

    def _stop_bytecode(self, key: str) -> None:
        with self._compiling_lock:
            proc = self._compiling.pop(key, None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, 9)
            proc.wait()

    def cleanup(self, *, keep: set[str], retention_seconds: float) -> list[str]:
        """Remove environments no key in ``keep`` names and unused for ``retention_seconds``,
        and temporary directories of builds that died (not locked by a live build)."""
        removed = []
        if not self.root.is_dir():
            return removed
        now = time.time()
        for entry in sorted(self.root.iterdir()):
            if entry.name == _LOCKS:
                continue
            if entry.name.startswith(_TMP_PREFIX):
                key_prefix = entry.name[len(_TMP_PREFIX) :].split("-", 1)[0]
                if not self._locked_by_prefix(key_prefix):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry.name)
                continue
            key = entry.name
            if key in keep or not entry.is_dir():
                continue
            try:
                last = (entry / LAST_USED).stat().st_mtime
            except OSError:
                last = entry.stat().st_mtime
            if now - last < retention_seconds:
                continue
            with self._lock(key):
                try:  # re-read under the lock: a prepare may just have used it
                    last = (entry / LAST_USED).stat().st_mtime
                except OSError:
                    pass
                if now - last < retention_seconds:
                    continue
                self._stop_bytecode(key)
                # Unmark first: a half-removed env is never taken for a complete one.
                with contextlib.suppress(OSError):
                    (entry / COMPLETE_MARKER).unlink()
                shutil.rmtree(entry, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.root / _LOCKS / f"{key}.lock").unlink()
            removed.append(key)
        return removed

    def _locked_by_prefix(self, key_prefix: str) -> bool:
        """Is a build of a key starting with ``key_prefix`` running (its lock held)?"""
        for lock in (self.root / _LOCKS).glob(f"{key_prefix}*.lock"):
            with open(lock, "w") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the child killed when the thread that started it ends (Linux),
    or exit at once if the parent already died before the request took effect."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm() -> None:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return arm


def _python_label(python: str) -> str:
    return current_python() if os.path.isabs(python) else python


def installer_errors(output: str, *, limit: int = 15) -> str:
    """The lines of an installer's output that say what failed (uv's "No solution found ...
    <package> was not found", pip's "ERROR: ..."), without colours, progress or hints noise."""
    lines = [_ANSI.sub("", line).rstrip() for line in output.splitlines()]
    lines = [line for line in lines if line.strip() and "is ignored" not in line]
    wanted = [
        line
        for line in lines
        if re.search(
            r"(error|×|╰─▶|because|not found|no solution|no matching|no interpreter)", line, re.I
        )
    ]
    chosen = wanted or lines
    return "\n".join(line.strip() for line in chosen[-limit:])


def _site_packages(venv: Path, *, must_exist: bool = True) -> Path | None:
    found = sorted((venv / "lib").glob("python3*/site-packages"))
    if found:
        return found[0]
    if must_exist:
        return None
    return venv / "lib" / f"python{current_python()}" / "site-packages"


def _installed(venv: Path) -> list[str]:
    """name==version of every distribution in the env, read from its metadata files (no
    interpreter started, nothing of the packages run)."""
    site = _site_packages(venv)
    if site is None:
        return []
    return sorted(
        {
            f"{dist.metadata['Name']}=={dist.version}"
            for dist in importlib.metadata.distributions(path=[str(site)])
            if dist.metadata["Name"]
        }
    )


def _check_readable(venv: Path) -> None:
    """Model servers may run as another user: the installers ran with umask 022, and files
    linked from uv's cache keep the cache's modes. Checked on the top of site-packages (one
    directory read); only when something there is not world-readable (a cache written with a
    stricter umask) is the whole tree walked and fixed."""
    os.chmod(venv, 0o755)
    site = _site_packages(venv)
    if site is None:
        return
    for entry in os.scandir(site):
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            continue
        if mode & 0o004 == 0 or (stat.S_ISDIR(mode) and mode & 0o001 == 0):
            logger.warning(
                "environment %s: %s is not world-readable; fixing modes", venv, entry.path
            )
            _make_world_readable(venv)
            return


def _make_world_readable(root: Path) -> None:
    """Dirs 0755, files 0644 (executables 0755): model servers may run as another user."""
    for dirpath, _dirnames, filenames in os.walk(root):
        if stat.S_IMODE(os.stat(dirpath).st_mode) != 0o755:
            os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                continue
            wanted = 0o755 if info.st_mode & 0o111 else 0o644
            if stat.S_IMODE(info.st_mode) != wanted:
                os.chmod(path, wanted)
