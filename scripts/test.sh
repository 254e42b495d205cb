#!/usr/bin/env bash
# The test suite: unit tests plus end-to-end tests through throwaway Postfix, Redis,
# milter and sink processes on 127.0.0.1 (started and stopped by the tests themselves).
# Extra arguments go to pytest, e.g. `scripts/test.sh -k dkim`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
