#!/usr/bin/env bash
# The whole relay on loopback: Postfix with SASL AUTH, Redis, the Relaylab milter with
# demo subaccounts and freshly generated DKIM keys, and a sink that stores what Postfix
# delivers. Sends a demo message, prints it with its verified signature, stays up until
# Ctrl-C. State lives in ./run/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/relaylab demo "$@"
