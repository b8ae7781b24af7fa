#!/usr/bin/env bash
# Make a Docker engine and the serving base image available on this machine.
#
# Run by CI (.ci/run) and by developers before the Docker tests. Idempotent:
# when the engine runs and the base image exists it only checks and returns in
# seconds. Needs root (apt-get, dockerd, debootstrap) the first time.
#
# Docker Hub is out of reach here, so the base image is built from Debian's
# packages with debootstrap and imported, instead of pulled.
#
# Environment (all optional):
#   SERVING_BASE_IMAGE  tag of the base image   (controlplane-serving-base:bookworm)
#   DEBIAN_MIRROR       mirror for debootstrap  (http://deb.debian.org/debian)
#   DOCKERD_LOG         dockerd's log file      (/var/log/dockerd.log)
set -eEuo pipefail

BASE_IMAGE=${SERVING_BASE_IMAGE:-controlplane-serving-base:bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd.log}
SOCKET=/var/run/docker.sock
# Debian's docker.io client; /usr/local/bin may hold another one (also fine).
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH}"

say() { echo "docker-setup: $*"; }
die() { echo "docker-setup: ERROR: $*" >&2; exit 1; }
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

# Two concurrent runs (a developer and CI, or parallel jobs) must not both
# start dockerd or debootstrap into the same place.
lockfile=/var/lock/controlplane-docker-setup.lock
[[ -w $(dirname "$lockfile") ]] || lockfile=/tmp/controlplane-docker-setup.lock
exec 9>"$lockfile"
flock 9

engine_up() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# /run survives a restore of this machine: a pid file left by an engine that no longer
# runs may name an unrelated live process, and dockerd then refuses to start.
clear_stale_pidfile() { # FILE PROCESS-NAME
    local pid
    [[ -f $1 ]] || return 0
    pid=$(cat "$1" 2>/dev/null || true)
    if [[ -z $pid || "$(cat "/proc/$pid/comm" 2>/dev/null || true)" != "$2" ]]; then
        say "removing stale $1"
        rm -f "$1"
    fi
}

# 1. Packages ---------------------------------------------------------------
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "need root to install ${missing[*]} (run with sudo)"
    say "installing ${missing[*]} from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
else
    say "dockerd and debootstrap already installed"
fi
command -v docker >/dev/null 2>&1 || die "docker.io installed but no docker client on PATH"

# 2. Engine -------------------------------------------------------------------
if engine_up; then
    say "engine already running ($(docker version --format '{{.Server.Version}}'))"
else
    [[ $(id -u) -eq 0 ]] || die "engine not reachable on $SOCKET and not root: start dockerd yourself"
    if pgrep -x dockerd >/dev/null 2>&1; then
        say "dockerd process exists but does not answer yet; waiting"
    else
        clear_stale_pidfile /var/run/docker.pid dockerd
        clear_stale_pidfile /var/run/docker/containerd/containerd.pid containerd
        # No bridge and no iptables: containers use the host's network (the
        # control plane's default) or none; nothing touches the firewall.
        mkdir -p "$(dirname "$DOCKERD_LOG")"
        say "starting dockerd (log: $DOCKERD_LOG)"
        setsid nohup dockerd --bridge=none --iptables=false --ip6tables=false \
            >>"$DOCKERD_LOG" 2>&1 </dev/null 9>&- &
    fi
    for _ in $(seq 1 60); do
        engine_up && break
        sleep 1
    done
    engine_up || { tail -n 20 "$DOCKERD_LOG" >&2 || true; die "dockerd did not answer on $SOCKET within 60 s (log: $DOCKERD_LOG)"; }
    say "engine running ($(docker version --format '{{.Server.Version}}'))"
fi

# 3. Base image ---------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE already exists"
else
    [[ $(id -u) -eq 0 ]] || die "need root to debootstrap $BASE_IMAGE"
    rootfs=$(mktemp -d /var/tmp/serving-base.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    say "building $BASE_IMAGE with debootstrap ($SUITE from $MIRROR; about a minute)"
    started=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; die "debootstrap failed (full log: $rootfs.log)"; }
    rm -f "$rootfs.log"
    # Dead weight in an image nobody apt-gets in or reads manuals in.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/var/log/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
        "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE" >/dev/null \
        || die "docker import of $BASE_IMAGE failed"
    say "built $BASE_IMAGE in $((SECONDS - started)) s ($(docker image inspect --format '{{.Size}}' "$BASE_IMAGE" | numfmt --to=iec))"
fi
say "ready"
