#!/usr/bin/env bash
# Install what Relaylab's demo, tests and benchmarks need on a fresh Debian 12 (as root):
# Debian packages (Postfix with Cyrus SASL, Redis, OpenDKIM for comparisons) and a
# virtualenv in .venv with the package and its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: Postfix instances need it" >&2; exit 1; }

packages=(postfix sasl2-bin libsasl2-modules redis-server redis-tools opendkim opendkim-tools
          python3 python3-venv iproute2 procps swaks ca-certificates
          passwd systemd  # useradd and systemd-analyze: tests/e2e/test_deploy_e2e.py
          chromium)  # the dashboard's browser tests (Playwright drives /usr/bin/chromium)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}"
    # Postfix asks debconf questions; non-interactive takes the defaults (our instances
    # bring their own config and never touch /etc/postfix).
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    for attempt in 1 2 3 4 5; do  # another apt/dpkg may hold the lock for a while
        apt-get install -y -qq "${missing[@]}" >/dev/null && break
        [ "$attempt" = 5 ] && exit 1
        echo "bootstrap: apt-get failed, retrying in 15 s" >&2; sleep 15
    done
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.relaylab-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: installing the relaylab package into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
