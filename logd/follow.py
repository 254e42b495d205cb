"""Following a log file through rotation and truncation, with a place that can be saved.

A *position* names a line end in the stream of every file the log has been: the file's
generation (one more at every rotation or truncation) and the byte offset in it, as one
integer `generation << OFFSET_BITS | offset` that only grows. logd stores the position of
the last line whose events it wrote with those events (per subaccount), and a Checkpoint
(which file, where in it) after each batch, so that a restart resumes exactly there.

Rotation: when the path names another file (logrotate's rename + create, or Postfix's
`postfix logrotate`), the old file is read to its end first (it is still open), until it
has been quiet for `rotate_grace` seconds, then the new one from its start. Truncation
(copytruncate, `> file`): the file is shorter than the offset, or its first bytes or the
bytes before the offset changed: read again from the start, as a new generation. At
start, a checkpoint whose file was rotated away meanwhile is looked for under the usual
rotated names (FILE.1, FILE-YYYYMMDD, FILE.YYYYMMDD-HHMMSS) and finished first; a
compressed one cannot be (logrotate: use delaycompress).

Only whole lines are returned: a line still being written is read again, whole, later.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import attrs

from relaylab.logfmt import log_event

__all__ = ["CHUNK", "OFFSET_BITS", "Checkpoint", "LogFollower", "position"]

log = logging.getLogger("relaylab.logd")

OFFSET_BITS = 36  # 64 GiB per file; positions stay below 2**53 (exact in Lua) for 131,072 generations
HEAD_BYTES = 64  # the first bytes of a file, to notice it was truncated and rewritten
TAIL_BYTES = 512  # and the last ones read (a line or more): a file rewritten past our
# offset differs there (its timestamps, queue ids, recipients)
# Bytes read at a time (at most): 2 MiB is faster than 4 or 8 (bench/logd: ~0.07 s less per
# 1,000,000 lines than 4 MiB; a buffer that stays in the CPU's caches while it is searched,
# counted and sliced); 1 MiB is no faster.
CHUNK = 2 << 20
MAX_LINE = 1 << 20  # a longer "line" is skipped (counted as bad): no log line is that long


def position(generation: int, offset: int) -> int:
    return (generation << OFFSET_BITS) | offset


@attrs.frozen
class Checkpoint:
    dev: int
    ino: int
    offset: int
    generation: int
    head: bytes  # up to HEAD_BYTES of the file's start, as read when it was saved
    tail: bytes = b""  # the TAIL_BYTES before `offset`: the end of the last line read

    def to_fields(self) -> dict[str, str]:
        return {"dev": str(self.dev), "ino": str(self.ino), "offset": str(self.offset),
                "gen": str(self.generation), "head": self.head.hex(), "tail": self.tail.hex()}

    @classmethod
    def from_fields(cls, f: dict[bytes, bytes]) -> Checkpoint | None:
        try:
            return cls(int(f[b"dev"]), int(f[b"ino"]), int(f[b"offset"]), int(f[b"gen"]),
                       bytes.fromhex(f[b"head"].decode()), bytes.fromhex(f.get(b"tail", b"").decode()))
        except (KeyError, ValueError):
            return None


class LogFollower:
    def __init__(self, path: Path, *, chunk: int = CHUNK, rotate_grace: float = 1.0) -> None:
        self.path = Path(path)
        self.chunk = chunk
        # Once the path names a new file, the old one is read on until it has been quiet
        # this long: the writer may add lines to it until it reopens (`postfix logrotate`
        # renames, then signals postlogd; logrotate's postrotate runs after the rename).
        self.rotate_grace = rotate_grace
        self._rotation_seen: float | None = None
        self._fd: int | None = None
        self._dev = self._ino = 0
        self._head = b""
        self._tail = b""
        self.offset = 0
        self.generation = 0
        self.skipped_long = 0  # lines over MAX_LINE skipped
        self._pending: list[tuple[int, int]] = []  # (dev, ino) of rotated files to finish first

    # -- opening -------------------------------------------------------------------------
    def start(self, checkpoint: Checkpoint | None, *, at_end: bool) -> None:
        """Open the log: at the checkpoint if there is one (finishing a file rotated away
        meanwhile first), else at its end (`at_end`) or start."""
        fd = self._open_path()
        if fd is None:  # no log yet: wait for it (poll() opens it)
            self.generation = checkpoint.generation + 1 if checkpoint else 0
            return
        st = os.fstat(fd)
        if checkpoint is None:
            self._use(fd, st, 0 if not at_end else st.st_size, 0)
            self.offset = self._line_start(self.offset)
            return
        if (st.st_dev, st.st_ino) == (checkpoint.dev, checkpoint.ino):
            if st.st_size >= checkpoint.offset and _same_head(self._read_head(fd), checkpoint.head) \
                    and self._tail_at(fd, checkpoint.offset) == checkpoint.tail:
                self._use(fd, st, checkpoint.offset, checkpoint.generation)
                return
            log_event(log, "log_truncated", logging.WARNING, file=str(self.path),
                      offset=checkpoint.offset, size=st.st_size, detail="while logd was stopped")
            self._use(fd, st, 0, checkpoint.generation + 1)
            return
        old = self._find_rotated(checkpoint)
        if old is not None:
            # Finish the rotated file, then the current one from its start.
            os.close(fd)
            ost = os.fstat(old)
            self._use(old, ost, min(checkpoint.offset, ost.st_size), checkpoint.generation)
            self._pending.append((st.st_dev, st.st_ino))
            log_event(log, "log_rotated", file=str(self.path), detail="while logd was stopped; "
                      "finishing the rotated file first")
            return
        log_event(log, "log_rotated", logging.WARNING, file=str(self.path),
                  detail="while logd was stopped; the old file was not found (lines after the "
                         "checkpoint in it are lost)")
        self._use(fd, st, 0, checkpoint.generation + 1)

    def _open_path(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None

    def _use(self, fd: int, st: os.stat_result, offset: int, generation: int) -> None:
        if self._fd is not None and self._fd != fd:
            os.close(self._fd)
        self._fd = fd
        self._dev, self._ino = st.st_dev, st.st_ino
        self.offset = offset
        self.generation = generation
        self._head = self._read_head(fd)
        self._tail = self._tail_at(fd, offset)

    @staticmethod
    def _read_head(fd: int) -> bytes:
        return os.pread(fd, HEAD_BYTES, 0)

    @staticmethod
    def _tail_at(fd: int, offset: int) -> bytes:
        n = min(offset, TAIL_BYTES)
        return os.pread(fd, n, offset - n)

    def _line_start(self, offset: int) -> int:
        """`offset`, moved back to the start of its line (start at the end of a file
        mid-line: that line is read whole once written)."""
        assert self._fd is not None
        if offset == 0:
            return 0
        back = os.pread(self._fd, min(offset, MAX_LINE), offset - min(offset, MAX_LINE))
        nl = back.rfind(b"\n")
        return offset - len(back) + nl + 1 if nl >= 0 else offset

    def _find_rotated(self, cp: Checkpoint) -> int | None:
        d = self.path.parent
        candidates = [d / f"{self.path.name}.1", d / f"{self.path.name}.0"]
        try:  # FILE-20261205 (logrotate dateext), FILE.20261205-101500 (postfix logrotate)
            candidates += sorted((p for p in d.iterdir() if p.name.startswith(
                (self.path.name + "-", self.path.name + "."))), reverse=True)
        except OSError:
            pass
        for p in candidates:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (cp.dev, cp.ino):
                return fd
            os.close(fd)
        return None

    # -- reading -------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self._dev, self._ino, self.offset, self.generation, self._head,
                          self._tail)

    @property
    def position(self) -> int:
        return position(self.generation, self.offset)

    def read(self) -> tuple[bytes, int, int, int] | None:
        """The next whole lines: (bytes, end, generation, offset of their first byte), the
        lines being bytes[:end] (not sliced off: a copy of megabytes), or None if there is
        nothing new (after looking for rotation and truncation). The caller calls
        advance(end) once it has handled them."""
        while True:
            fd = self._fd
            if fd is None:
                fd = self._open_path()
                if fd is None:
                    return None
                self._use(fd, os.fstat(fd), 0, self.generation)
            if self.offset and self._tail_at(fd, self.offset) != self._tail:
                # Truncated and written again past our offset since we last looked.
                self._truncated(os.fstat(fd).st_size)
                continue
            data = os.pread(fd, self.chunk, self.offset)
            if data:
                nl = data.rfind(b"\n")
                if nl >= 0:
                    if self._rotation_seen is not None:
                        self._rotation_seen = time.monotonic()  # still written to
                    return data, nl + 1, self.generation, self.offset
                if len(data) >= min(self.chunk, MAX_LINE):  # a monster line: skip it
                    more = self._skip_long_line()
                    if more:
                        continue
                    return None
            if not self._switch():
                return None

    def advance(self, nbytes: int) -> None:
        assert self._fd is not None
        self.offset += nbytes
        if not self._head and self.offset:
            self._head = self._read_head(self._fd)
        self._tail = self._tail_at(self._fd, self.offset)

    def _truncated(self, size: int) -> None:
        assert self._fd is not None
        log_event(log, "log_truncated", logging.WARNING, file=str(self.path),
                  offset=self.offset, size=size, generation=self.generation + 1)
        self._use(self._fd, os.fstat(self._fd), 0, self.generation + 1)

    def _skip_long_line(self) -> bool:
        assert self._fd is not None
        pos = self.offset
        while True:
            block = os.pread(self._fd, 1 << 20, pos)
            if not block:
                return False  # still being written: look again later
            nl = block.find(b"\n")
            if nl >= 0:
                self.offset = pos + nl + 1
                self.skipped_long += 1
                log_event(log, "line_too_long", logging.WARNING, file=str(self.path),
                          bytes=self.offset - pos)
                return True
            pos += len(block)

    def _switch(self) -> bool:
        """At the end of the open file: move on if the log was rotated or truncated.
        True if there may be more to read now."""
        assert self._fd is not None
        if self._pending:  # finishing a file rotated while we were stopped: on to the next
            fd = self._open_path()
            self._pending.clear()
            if fd is None:
                return False
            self._use(fd, os.fstat(fd), 0, self.generation + 1)
            return True
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed, new one not created yet: keep the old one
        if (st.st_dev, st.st_ino) != (self._dev, self._ino):
            now = time.monotonic()
            if self._rotation_seen is None:
                self._rotation_seen = now
            if now - self._rotation_seen < self.rotate_grace:
                return False
            self._rotation_seen = None
            fd = self._open_path()
            if fd is None:
                return False
            log_event(log, "log_rotated", file=str(self.path), generation=self.generation + 1)
            self._use(fd, os.fstat(fd), 0, self.generation + 1)
            return True
        if st.st_size < self.offset or not _same_head(self._read_head(self._fd), self._head):
            self._truncated(st.st_size)
            return st.st_size > 0
        return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _same_head(a: bytes, b: bytes) -> bool:
    """Whether two reads of a file's first bytes can be of the same file (one may have
    been taken while it was shorter)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]
