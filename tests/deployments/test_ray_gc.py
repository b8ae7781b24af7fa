"""What the ray actors leave on a node, and its sweep (`ray_actor.Lease`, `ray_actor.sweep`),
on real processes and files: a live lease keeps its paths, a dead process's lease does not,
recent files and builds in progress stay, and a sweep never runs beside another. The same on
a real cluster: tests/deployments/test_ray_runtime.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.runtimes import ray_actor
from deployments.runtimes.ray_actor import Lease, sweep

HOUR = 3600.0


def _make(root: Path, *relative: str) -> dict[str, Path]:
    made = {}
    for rel in relative:
        path = root / rel
        if rel.endswith(".log") or rel.endswith(".txt"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        else:
            path.mkdir(parents=True)
            (path / "file").write_text("x")
        made[rel] = path
    return made


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _lease_of_a_finished_process(root: Path, paths: list[Path]) -> Path:
    """A lease written by a process that then ended without releasing it (a killed actor)."""
    code = (
        "import sys; from pathlib import Path; from deployments.runtimes.ray_actor import Lease;"
        "l = Lease(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]); print(l.path)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(root), *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return Path(out.stdout.strip())


def test_the_sweep_keeps_what_live_leases_name_and_what_is_recent(tmp_path):
    root = tmp_path / "owner"
    p = _make(
        root,
        "bundles/live",
        "bundles/dead",
        "bundles/recent",
        "bundles/elsewhere",
        "environments/live-env",
        "environments/old-env",
        "environments/.build-now",
        "environments/.build-crashed",
        "environments/.old-env.txt",
        "logs/live.log",
        "logs/old.log",
        "routers/gone",
    )
    live = Lease(root, [p["bundles/live"], p["environments/live-env"], p["logs/live.log"]])
    stale = _lease_of_a_finished_process(root, [p["bundles/dead"]])
    assert stale.exists() and live.path.exists()
    # A lease of another host (a shared TMPDIR): its process cannot be checked from here.
    other = root / "leases" / "another-host-4242-1.json"
    other.write_text(json.dumps({"paths": [str(p["bundles/elsewhere"])]}))
    for rel, path in p.items():
        if rel not in ("bundles/recent", "environments/.build-now"):
            _age(path, 2 * HOUR)  # everything else last used two hours ago
    _age(p["environments/.build-crashed"], 3 * HOUR)
    _age(p["environments/.old-env.txt"], 1.5 * HOUR)

    removed = sweep(root, gc_after_s=HOUR)

    assert sorted(Path(r).relative_to(root).as_posix() for r in removed) == [
        "bundles/dead",
        "environments/.build-crashed",
        "environments/old-env",
        "logs/old.log",
        "routers/gone",
    ]
    for rel in ("bundles/live", "environments/live-env", "logs/live.log", "bundles/recent",
                "environments/.build-now", "bundles/elsewhere"):  # fmt: skip
        assert p[rel].exists(), rel
    # Older than gc_after_s, but what a build stages is kept for two hours at least.
    assert p["environments/.old-env.txt"].exists()
    assert not stale.exists() and live.path.exists() and other.exists()
    # Nothing half-deleted is left in sight: removed directories went through a rename.
    assert not [e for e in (root / "environments").iterdir() if e.name.startswith(".trash-")]

    # Released (the actor stopped): the paths count as used now, then age like the rest.
    live.release()
    assert not live.path.exists()
    assert sweep(root, gc_after_s=HOUR) == []
    removed = sweep(root, gc_after_s=HOUR, now=time.time() + 2 * HOUR)
    assert {"bundles/live", "environments/live-env", "logs/live.log", "bundles/recent"} <= {
        Path(r).relative_to(root).as_posix() for r in removed
    }
    assert p["bundles/elsewhere"].exists()


def test_a_sweep_does_not_run_beside_another(tmp_path):
    root = tmp_path / "owner"
    old = _make(root, "bundles/old")["bundles/old"]
    _age(old, 2 * HOUR)
    (root / "leases").mkdir()  # where the lock file goes, before the holder opens it
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
        ), str(root / "leases" / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert sweep(root, gc_after_s=HOUR) is None
        assert old.exists()
    finally:
        holder.kill()
        holder.wait()
    assert sweep(root, gc_after_s=HOUR) == [str(old)]


def test_a_lease_is_written_before_the_paths_exist_and_touches_them_later(tmp_path):
    root = tmp_path / "owner"
    env = root / "environments" / "key"
    lease = Lease(root, [env])  # the environment is built after the lease
    assert json.loads(lease.path.read_text()) == {"paths": [str(env)]}
    env.mkdir(parents=True)
    _age(env, 2 * HOUR)
    assert sweep(root, gc_after_s=HOUR) == []  # leased: kept however old
    lease.touch()
    assert time.time() - env.stat().st_mtime < 60
    pid, start = lease.path.stem.split("-")[-2:]
    assert int(pid) == os.getpid() and start == ray_actor._process_start(os.getpid())


@pytest.mark.parametrize("case", ["dead process", "unreadable"])
def test_a_broken_lease_of_this_host_is_stale(tmp_path, case):
    root = tmp_path / "owner"
    old = _make(root, "bundles/old")["bundles/old"]
    if case == "dead process":
        bad = _lease_of_a_finished_process(root, [old])
    else:  # this process's name, but not a lease inside
        pid = os.getpid()
        bad = root / "leases" / f"{os.uname().nodename}-{pid}-{ray_actor._process_start(pid)}.json"
        bad.parent.mkdir(parents=True)
        bad.write_text("{not json")
    _age(old, 2 * HOUR)
    assert sweep(root, gc_after_s=HOUR) == [str(old)]
    assert not bad.exists()
