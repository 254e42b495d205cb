"""The tracker's HTTP side on a real tracker process and a real Redis (no Postfix):
what a redirect says, byte for byte, and what each request leaves in Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from trackerutil import ODD_URLS, SUB, StandaloneTracker, request, standalone_tracker

from relaylab.devstack.process import wait_until


@pytest.fixture
def tk(tmp_path: Path) -> Iterator[StandaloneTracker]:
    with standalone_tracker(tmp_path) as st:
        yield st


def test_redirects_lead_to_the_destination_byte_for_byte(tk: StandaloneTracker) -> None:
    for n, dest in enumerate(ODD_URLS):
        url = tk.signer.click_url(SUB, f"m{n}", "bob@example.com", dest)
        assert url is not None
        answer = request(tk.port, tk.path(url))
        assert (answer.status, answer.header("Location")) == (302, dest)
    # Each click recorded, with the destination as it was written too.
    wait_until(lambda: len(tk.events()) == len(ODD_URLS), timeout=10)
    assert [e["url"] for e in tk.events()] == ODD_URLS
