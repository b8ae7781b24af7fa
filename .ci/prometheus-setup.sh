#!/usr/bin/env bash
# Make Debian's Prometheus server available for the real-Prometheus tests
# (tests/monitoring/test_prometheus_real*.py, which then need REQUIRE_PROMETHEUS=1).
#
# Run by CI (.ci/run) and by developers. Idempotent: when /usr/bin/prometheus exists it
# only prints the version. Needs root (apt-get) the first time. Only the binary is used:
# the tests start their own Prometheus on 127.0.0.1 with a temporary storage directory,
# so the packaged service is stopped and disabled if the package started it.
set -eEuo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH}"

say() { echo "prometheus-setup: $*"; }
die() { echo "prometheus-setup: ERROR: $*" >&2; exit 1; }
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

if [ ! -x /usr/bin/prometheus ]; then
    [ "$(id -u)" = 0 ] || die "not root: run 'apt-get install prometheus' as root"
    say "installing Debian's prometheus package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: no node exporter, no web console extras.
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# The package's own service (listening on :9090 on every interface) is not wanted.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/prometheus ] && pgrep -x prometheus >/dev/null 2>&1; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi
say "$(/usr/bin/prometheus --version 2>&1 | head -n1)"
