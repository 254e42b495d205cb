"""The published OpenAPI document matches what the running server does: schemathesis
(its CLI, as a user would run it) generates requests from /openapi.json with a fixed seed
and a bounded number of examples per operation, and checks every answer's status code,
content type, headers and body against the document, and that nothing is a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from apiharness import CLIENTS, RunningApi

EXAMPLES = 10
SEED = 20261205
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,negative_data_rejection,"
          "ignored_auth")


def schemathesis(api: RunningApi, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    key, secret, _ = CLIENTS["alpha"]
    return subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run",
         f"http://127.0.0.1:{api.port}/openapi.json", "--checks", CHECKS,
         "--max-examples", str(EXAMPLES), "--seed", str(SEED),
         "--generation-database", "none", "--phases", "examples,coverage,fuzzing",
         "--auth", f"{key}:{secret}", "--workers", "1", "--no-color",
         "--report-dir", str(tmp_path), *extra],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_every_operation_answers_as_its_openapi_document_says(
        api: RunningApi, tmp_path: Path) -> None:
    res = schemathesis(api, tmp_path)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "No issues found" in res.stdout or "passed" in res.stdout, res.stdout[-3000:]
