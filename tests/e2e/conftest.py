"""End-to-end fixtures: a real Postfix (SASL AUTH, relaying to a sink), real Redis and the
real milter process, all on 127.0.0.1, started once per test session."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator

import pytest

from relaylab.devstack.stack import RelayStack
from relaylab.devstack.workdir import make_workdir
from relaylab.policy.reloader import request_reload


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def stack() -> Iterator[RelayStack]:
    workdir = make_workdir("relaylab-e2e-")
    st = RelayStack(workdir)
    st.start()
    try:
        yield st
    finally:
        st.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def clean_sink(stack: RelayStack) -> RelayStack:
    stack.sink.clear()
    return stack


@pytest.fixture
def restore_policy(clean_sink: RelayStack) -> Iterator[RelayStack]:
    """The stack, with its policy file written back after the test and reloaded
    explicitly, as `relaylab reload` does: undoing a test's additions is a removal, which
    the file watcher alone would hold."""
    yield clean_sink
    mark = len(clean_sink.milter.log_text())
    clean_sink.write_policy()
    request_reload(clean_sink.config)
    clean_sink.milter.wait_for_log("event=reloaded", after=mark)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say where the dashboard's browser tests left their page screenshots."""
    shots = getattr(sys.modules.get("test_dashboard_browser_e2e"), "SHOTS", None) or \
        next((getattr(m, "SHOTS", None) for name, m in list(sys.modules.items())
              if name.endswith("test_dashboard_browser_e2e")), None)
    if shots:
        terminalreporter.write_line(f"dashboard screenshots ({len(shots)}): {shots[0].parent}")
