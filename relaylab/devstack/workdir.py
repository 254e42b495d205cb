"""Directory helpers: the daemons drop privileges, so their files must be reachable."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import tempfile
from pathlib import Path

__all__ = ["check_traversable", "is_process_alive", "make_workdir"]


def make_workdir(prefix: str = "relaylab-devstack-", parent: Path | None = None) -> Path:
    """Create a fresh 0755 directory (default under /tmp) for one or more instances.

    Why not pytest's tmp_path: /tmp/pytest-of-root is 0700, so smtpd (user postfix) and
    opendkim (user opendkim) could not open the sasldb or the key files by absolute path.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


def check_traversable(path: Path, user: str) -> None:
    """Raise PermissionError unless `user` can search every ancestor directory of `path`."""
    pw = pwd.getpwnam(user)
    groups = {g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {pw.pw_gid}
    for d in [path.resolve(), *path.resolve().parents]:
        if not d.exists():
            continue
        st = d.stat()
        if st.st_uid == pw.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise PermissionError(
                f"{d} (mode {stat.filemode(st.st_mode)}) is not searchable by user {user!r}; "
                f"use a directory such as relaylab.devstack.make_workdir() instead of {path}"
            )


def is_process_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (a daemon reparented to a non-reaping init
    lingers as a zombie, and kill(pid, 0) would still succeed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat_line.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")
