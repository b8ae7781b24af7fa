#!/usr/bin/env bash
# Make Debian's Chromium available for the browser tests (tests/e2e).
#
# Run by CI (.ci/run) before the tests. Idempotent: when Chromium is installed it
# only checks that it starts headless and returns in seconds. Installing needs root.
# Playwright cannot download its own browser here, so the tests launch this one
# by path (CHROMIUM_PATH, default /usr/bin/chromium).
set -eEuo pipefail

CHROMIUM=${CHROMIUM_PATH:-/usr/bin/chromium}
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH}"

say() { echo "browser-setup: $*"; }
die() { echo "browser-setup: ERROR: $*" >&2; exit 1; }
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

# Two concurrent runs must not both run apt-get.
lockfile=/var/lock/controlplane-browser-setup.lock
[[ -w $(dirname "$lockfile") ]] || lockfile=/tmp/controlplane-browser-setup.lock
exec 9>"$lockfile"
flock 9

if [[ -x $CHROMIUM ]]; then
    say "chromium already installed at $CHROMIUM"
else
    [[ $(id -u) -eq 0 ]] || die "$CHROMIUM is missing and this is not root: run 'sudo apt-get install -y chromium'"
    say "installing chromium from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq chromium >/dev/null || die "apt-get install chromium failed"
    [[ -x $CHROMIUM ]] || die "chromium installed but $CHROMIUM does not exist (set CHROMIUM_PATH)"
fi

# It must start headless the way the tests launch it (no sandbox: CI runs as root).
dom=$(timeout 60 "$CHROMIUM" --headless --no-sandbox --disable-gpu --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --dump-dom 'data:text/html,<p>browser-setup-ok</p>' 2>/dev/null) \
    || die "$CHROMIUM does not start headless"
[[ $dom == *browser-setup-ok* ]] || die "$CHROMIUM started but rendered nothing"
say "ready ($("$CHROMIUM" --version 2>/dev/null | head -n 1))"
