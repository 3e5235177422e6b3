#!/usr/bin/env bash
# Install everything the test suite needs on a Debian 12 machine (as root) and run it all.
# Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# promtool (prometheus), ip/ss (iproute2), netstat (net-tools), sysctl (procps),
# node_exporter for the benchmark's comparison, iptables/conntrack, podman/debootstrap/runc
# to build and run the image, systemd for systemd-analyze.
apt-get install -y -qq --no-install-recommends python3 python3-venv iproute2 net-tools \
    procps prometheus prometheus-node-exporter iptables conntrack systemd >/dev/null
# podman as Debian recommends it (conmon, network plugins, storage tools)
apt-get install -y -qq podman debootstrap runc buildah >/dev/null

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$status"
