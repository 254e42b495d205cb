"""Soak with faults, the short CI variant of bench/soak (issue 13.3): 400 messages from 50
concurrent SMTP sessions (several messages per session, RSET between) through two relay
hosts on a 3-master Redis Cluster with a replica per master, while the master of the
queue-id notes is restarted, a subaccount's master is failed over to its replica, a
milter worker is SIGKILLed, policyd and the tracker are restarted. Afterwards every
message was delivered exactly once, DKIM-signed and verified by dkimpy (none lost,
duplicated, unsigned or mis-signed), the hourly window and month usage equal the
messages accepted, no session slot or pending count is left, and the activity log has
exactly one `injected` and one `ok` event per message (relaylab/devstack/soak.py)."""

from __future__ import annotations

import shutil

from relaylab.devstack.soak import FAULTS, SoakParams, run_soak
from relaylab.devstack.workdir import make_workdir


def test_soak_with_faults_delivers_every_message_once_signed_counted_and_logged() -> None:
    lines: list[str] = []
    workdir = make_workdir("relaylab-soak-e2e-")
    report = run_soak(SoakParams(messages=400, sessions=50, per_session=5, rate=25.0,
                                 log=lines.append, workdir=workdir, keep=True))
    table = report.table() + f"\n(services' logs kept in {workdir})"
    if not report.problems():
        shutil.rmtree(workdir, ignore_errors=True)
    print(table)
    assert [f.name for f in report.faults] == list(FAULTS), table
    assert report.accepted == report.ids == 400, table
    assert report.delivered == 400 and report.queued == 0, table
    assert (report.lost, report.duplicated, report.phantom) == (0, 0, 0), table
    assert (report.unsigned, report.mis_signed) == (0, 0), table
    assert all(acc == window == month for acc, window, month in report.limits.values()), table
    assert sum(acc for acc, _, _ in report.limits.values()) == 400, table
    assert (report.sessions_left, report.pending_left) == (0, 0), table
    assert (report.injected_missing, report.injected_extra) == (0, 0), table
    assert (report.ok_missing, report.ok_extra) == (0, 0), table
    # events a SIGKILLed worker stored for a message it never answered (refused, retried)
    assert report.injected_unanswered <= 50, table
    assert report.open_recorded, table
    assert report.problems() == [], table
