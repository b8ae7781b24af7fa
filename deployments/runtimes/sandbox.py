"""The local runtime's sandbox: a model server runs untrusted model code, so it gets nothing of
the control plane's.

When the control plane runs as root, every local model server is started through this file's
launcher (``python -I -S sandbox.py CONFIG -- ARGV...``), which, still root, before it execs
the server:

- unshares a network namespace (only its own loopback, brought up): no TCP/UDP to the web
  port, MLflow, PostgreSQL, Redis or anything else of the host, and no abstract Unix sockets;
  the server listens on a Unix socket in a per-instance directory the router reaches;
- unshares a mount namespace in which the data directory, ``/run`` (Docker's, PostgreSQL's and
  every other daemon's Unix sockets), ``/tmp``, ``/var/tmp``, ``/dev/shm``, root's home and any
  directory the server's user could not traverse anyway are empty tmpfs mounts, with bound back
  only what the server needs: its interpreter and environment, the serving code and its model
  (read-only) and its socket directory (read-write);
- drops to an unprivileged uid and gid of its own (``uid_for(port)``: one per instance, so
  servers cannot signal, trace or read one another either; no passwd entry is needed), with no
  supplementary groups, and sets ``PR_SET_NO_NEW_PRIVS`` (no setuid binary gives them back)
  and ``RLIMIT_NPROC`` (NPROC processes and threads for the instance's uid).

A non-root control plane cannot do any of this: ``available()`` is False, servers run as its
own user, and the start-up warning and the deployment page say so (``status()``).

The launcher is run as a script (not ``-m``): it imports nothing of the control plane, Django
or the serving code, only the standard library, and its only output is a line on stderr (the
instance's log) when a step fails (exit code 126).
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import sys
from pathlib import Path

LAUNCHER = Path(__file__).resolve()
EXIT_SANDBOX_FAILED = 126
# One uid (and gid) per instance: UID_BASE + the instance's port. Far above the ranges of
# people (1000-60000), system users and the usual /etc/subuid allocations (100000 + 65536*n).
UID_BASE = 1_500_000_000
SOCKET_NAME = "serving.sock"
TMPFS_MB = 256
# Processes and threads of one instance (its uid is its own, so RLIMIT_NPROC counts exactly
# them): a fork bomb stops there, as the docker runtime's pids limit stops it in a container.
NPROC = 512


def available() -> bool:
    """Can this process start sandboxed servers? (root on Linux)"""
    return sys.platform.startswith("linux") and os.geteuid() == 0


def status() -> str:
    """One sentence for the start-up log and the deployment page."""
    if available():
        return (
            "local model servers run sandboxed: their own network namespace and uid, "
            "the data directory hidden"
        )
    return (
        f"the control plane runs as uid {os.geteuid()}, not root: local model servers run as "
        "this same user, can read the data directory (secret key, database) and reach every "
        "port on this host. Run the control plane as root (servers then drop to their own "
        "uid), use the docker runtime for untrusted models, or set "
        "CONTROLPLANE_LOCAL_REFUSE_PICKLE=true"
    )


def uid_for(port: int) -> int:
    return UID_BASE + port


def socket_dir(sockets_root: Path, port: int) -> Path:
    return Path(sockets_root) / str(port)


def socket_path(sockets_root: Path, port: int) -> Path:
    return socket_dir(sockets_root, port) / SOCKET_NAME


def prepare_socket_dir(sockets_root: Path, port: int, *, uid: int | None, gid: int | None) -> Path:
    """An empty directory for one instance's socket, owned by its uid (mode 0700): only that
    server and root (the router) may enter it. ``sockets_root`` itself is 0711."""
    root = Path(sockets_root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)
    directory = socket_dir(root, port)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        directory.unlink()
    directory.mkdir(mode=0o700, exist_ok=True)
    for entry in directory.iterdir():  # a stale socket of an earlier server on this port
        if entry.is_dir() and not entry.is_symlink():
            continue
        entry.unlink()
    if uid is not None:
        os.chown(directory, uid, gid if gid is not None else uid)
    os.chmod(directory, 0o700)
    return directory


def remove_socket_dir(sockets_root: Path, port: int) -> None:
    directory = socket_dir(sockets_root, port)
    try:
        for entry in directory.iterdir():
            entry.unlink()
        directory.rmdir()
    except OSError:
        pass


_PICKLE_SUFFIXES = (".pkl", ".pickle", ".cloudpickle", ".joblib", ".pt", ".pth")


def pickle_formats(model_dir: Path) -> list[str]:
    """What in an MLflow model is loaded by unpickling (runs code), or []: sklearn's pickle
    and cloudpickle formats, a cloudpickled custom pyfunc, pytorch, and pickle-named files."""
    import yaml

    found = []
    try:
        mlmodel = yaml.safe_load((Path(model_dir) / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        return [f"MLmodel unreadable: {exc}"]
    flavors = mlmodel.get("flavors") or {}
    sklearn = flavors.get("sklearn") or {}
    if sklearn.get("serialization_format", "pickle") in ("pickle", "cloudpickle") and sklearn:
        found.append(
            f"sklearn serialization_format {sklearn.get('serialization_format', 'pickle')}"
        )
    pyfunc = flavors.get("python_function") or {}
    if pyfunc.get("python_model") or pyfunc.get("cloudpickle_version"):
        found.append("a cloudpickled custom pyfunc (python_model)")
    if "pytorch" in flavors:
        found.append("pytorch (torch.save pickles)")
    for path in sorted(Path(model_dir).rglob("*")):
        if path.suffix.lower() in _PICKLE_SUFFIXES and path.is_file():
            found.append(f"file {path.relative_to(model_dir)}")
            break
    return found


def _prefix(python: str) -> list[Path]:
    """The directories an interpreter runs from: its venv (``bin/..``) and, through the
    symlink a venv's python is, the base installation it belongs to."""
    paths = [Path(os.path.abspath(python)).parent.parent]
    real = Path(os.path.realpath(python)).parent.parent
    if real not in paths:
        paths.append(real)
    return paths


def _untraversable_ancestors(path: Path) -> list[Path]:
    """Ancestors of ``path`` that others cannot enter (``/root`` is 0700): hidden and the
    path bound back, or the server could not reach it at all."""
    found = []
    for ancestor in reversed(path.parents):
        try:
            mode = ancestor.stat().st_mode
        except OSError:
            break
        if not mode & stat.S_IXOTH:
            found.append(ancestor)
    return found


def plan(
    *,
    python: str,
    code_root: Path,
    model_dir: Path,
    data_dir: Path,
    socket_dir: Path,
    uid: int,
    gid: int,
    cwd: Path,
) -> dict:
    """What the launcher does, computed here (in the control plane) where paths are visible."""
    readable = [*_prefix(python), Path(code_root), Path(model_dir)]
    readable = [Path(os.path.realpath(p)) for p in readable] + [Path(p) for p in readable]
    hide = {Path(p) for p in ("/run", "/tmp", "/var/tmp", "/dev/shm")}
    hide.add(Path(os.path.realpath(data_dir)))
    try:
        hide.add(Path(pwd.getpwuid(os.geteuid()).pw_dir))
    except KeyError:
        pass
    for path in [*readable, Path(socket_dir)]:
        hide.update(_untraversable_ancestors(Path(os.path.realpath(path))))
    hide_real = sorted(
        {Path(os.path.realpath(p)) for p in hide if p.exists() and not p.is_symlink()}
    )
    binds = {}
    for path in readable:
        if path.exists():
            binds[str(path)] = False
    binds[str(os.path.realpath(socket_dir))] = True
    return {
        "uid": uid,
        "gid": gid,
        "cwd": str(cwd),
        "hide": [str(p) for p in hide_real],
        "bind": binds,  # path -> writable
        "tmpfs_mb": TMPFS_MB,
        "nproc": NPROC,
    }


def wrap(argv: list[str], config: dict) -> list[str]:
    """The command line that runs ``argv`` inside the sandbox ``config`` (from ``plan``)."""
    return [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(config), "--", *argv]


# --- the launcher (runs as root, in the new process, before exec) ------------------------------

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_PR_SET_NO_NEW_PRIVS = 38
_SIOCSIFFLAGS = 0x8914
_IFF_UP, _IFF_LOOPBACK, _IFF_RUNNING = 0x1, 0x8, 0x40


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None):
        check(
            libc.mount(
                source.encode() if source else None,
                target.encode(),
                fstype.encode() if fstype else None,
                ctypes.c_ulong(flags),
                data.encode() if data else None,
            ),
            f"mount {target}",
        )

    return libc, check, mount


def _loopback_up() -> None:
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", _IFF_UP | _IFF_LOOPBACK | _IFF_RUNNING)
        fcntl.ioctl(sock, _SIOCSIFFLAGS, request)


def launch(config: dict, argv: list[str]) -> None:
    libc, check, mount = _libc()
    check(libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET), "unshare")
    _loopback_up()
    mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing propagates back to the host
    # Sources by file descriptor, before the tmpfs mounts cover their paths (and after the
    # unshare: a bind's source must be a mount of this namespace).
    sources = {
        path: os.open(path, os.O_PATH | os.O_CLOEXEC)
        for path in config["bind"]
        if os.path.exists(path)
    }
    operations = [(path, "hide") for path in config["hide"]]
    operations += [(path, "bind") for path in sources]
    # Shallow first: a path bound back inside a hidden one, a hidden one inside that...
    operations.sort(key=lambda op: (op[0].rstrip("/").count("/"), op[1] == "bind"))
    tmp_options = f"mode=1777,size={config['tmpfs_mb']}m"
    for path, kind in operations:
        if kind == "hide":
            if not os.path.isdir(path):
                continue
            options = (
                tmp_options if path in ("/tmp", "/var/tmp", "/dev/shm") else "mode=755,size=1m"
            )
            mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
            continue
        writable = config["bind"][path]
        if os.path.isdir(f"/proc/self/fd/{sources[path]}"):
            os.makedirs(path, exist_ok=True)
        elif not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        mount(f"/proc/self/fd/{sources[path]}", path, None, _MS_BIND | _MS_REC, None)
        flags = _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV | (0 if writable else _MS_RDONLY)
        mount(None, path, None, flags, None)
    for fd in sources.values():
        os.close(fd)
    os.chdir(config["cwd"])
    import resource

    resource.setrlimit(resource.RLIMIT_NPROC, (config["nproc"], config["nproc"]))
    os.setgroups([])
    os.setresgid(config["gid"], config["gid"], config["gid"])
    os.setresuid(config["uid"], config["uid"], config["uid"])
    check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.execve(argv[0], argv, os.environ)


def main(args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        print("usage: sandbox.py CONFIG_JSON -- ARGV...", file=sys.stderr)
        return 2
    try:
        launch(json.loads(args[0]), args[2:])
    except (OSError, ValueError, KeyError) as exc:
        print(
            f"[controlplane] cannot start the model server in its sandbox: {exc}", file=sys.stderr
        )
        return EXIT_SANDBOX_FAILED
    return EXIT_SANDBOX_FAILED  # not reached: execve replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
