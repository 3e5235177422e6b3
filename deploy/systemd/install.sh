#!/usr/bin/env bash
# Install netstat-exporter as a systemd service from a checkout (as root, Debian 12):
#   bash deploy/systemd/install.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
apt-get install -y -qq python3-venv >/dev/null
python3 -m venv /opt/netstat-exporter
/opt/netstat-exporter/bin/pip install -q .
install -m 0644 deploy/systemd/netstat-exporter.sysusers /usr/lib/sysusers.d/netstat-exporter.conf
systemd-sysusers
[ -e /etc/default/netstat-exporter ] || install -m 0640 deploy/systemd/netstat-exporter.default /etc/default/netstat-exporter
install -m 0644 deploy/systemd/netstat-exporter.service /etc/systemd/system/netstat-exporter.service
systemctl daemon-reload
systemctl enable --now netstat-exporter
