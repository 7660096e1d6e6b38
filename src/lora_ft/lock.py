"""One writer per run folder: the run lock.

The lock is ``fcntl.flock`` on a lock file in the folder. The kernel drops it when its holder exits in any way,
``kill -9`` included, so a lock left by a killed process is free again at once, and nothing here trusts a pid: a
pid the system has since given to another process cannot make a dead run look alive.

The file also holds a record of its holder (pid, host, command, start time), read to name it when the lock is
refused, and a heartbeat: its modification time, renewed every ``HEARTBEAT_S`` seconds. The heartbeat covers
shared file systems whose locks do not reach other machines (NFS mounted with ``local_lock``, some cluster file
systems): there a record of another host with a fresh heartbeat is honoured although ``flock`` succeeded, and one
whose heartbeat stopped more than ``STALE_S`` seconds ago (measured against the file server's clock, through a
probe file) belongs to a holder that is gone and is taken over with a warning. File systems without ``flock`` at
all fall back to the record and heartbeat alone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import RunError

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 60.0
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _server_now(folder: Path) -> float:
    """The current time as the file system holding ``folder`` stamps files (another host's clock on NFS)."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".lora_ft.probe") as probe:
        return os.fstat(probe.fileno()).st_mtime


def describe(record: dict[str, Any]) -> str:
    """``pid 123 on host h, started 2026-01-01T10:00:00+00:00 (lora-ft train r.yaml)``."""
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {record.get('started', '?')}"
            + (f" ({record['command']})" if record.get("command") else ""))


class RunLock:
    """An exclusive lock on ``path`` (a lock file; its folder is created when missing and removed again on release
    when it is still empty). Use as a context manager, or ``acquire``/``release``.

    Args:
        path: the lock file.
        what: what the lock protects, for messages ("output_dir runs/x").
    """

    def __init__(self, path: str | Path, what: str | None = None):
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self._fd: int | None = None
        self._made: Path | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -------------------------------------------------------------------------------------------- acquire
    def acquire(self) -> RunLock:
        """Take the lock, or raise RunError naming the process that holds it."""
        self._make_folder()
        try:
            while True:  # a holder may delete the file between our open and our flock: then open it again
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    locked = self._flock(fd)
                    if self._same_file(fd):
                        break
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)
            self._fd = fd
            if not locked:
                raise self._refusal(self._record())
            self._check_other_host()
            self._write_record()
        except BaseException:
            self._close()
            raise
        self._beat = threading.Thread(target=self._heartbeat, name="lora_ft-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _make_folder(self) -> None:
        folder = self.path.parent
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        self._made = missing[-1] if missing else None
        folder.mkdir(parents=True, exist_ok=True)

    def _flock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            log.warning("%s: this file system does not support locks; the run lock relies on its heartbeat",
                        self.path.parent)
            return self._record_is_stale(self._read(fd), same_host_dead=self._holder_dead)

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _read(self, fd: int) -> dict[str, Any]:
        try:
            text = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}

    def _record(self) -> dict[str, Any]:
        return self._read(self._fd) if self._fd is not None else {}

    def _age(self) -> float:
        return _server_now(self.path.parent) - os.stat(self.path).st_mtime

    def _record_is_stale(self, record: dict[str, Any], same_host_dead) -> bool:
        """Without a working flock: free when there is no record, when its holder (this host) is dead, or when its
        heartbeat (another host) stopped."""
        if not record:
            return True
        if record.get("host") == socket.gethostname():
            return same_host_dead(record)
        return self._age() > STALE_S

    @staticmethod
    def _holder_dead(record: dict[str, Any]) -> bool:
        """A pid of this host is alive only when it still runs the process that wrote the record: its start time
        (from /proc) must match, so a reused pid does not count."""
        pid = record.get("pid")
        if not isinstance(pid, int):
            return True
        try:
            os.kill(pid, 0)
            return _process_start(pid) != record.get("process_start")
        except ProcessLookupError:
            return True
        except OSError:  # PermissionError: alive, under another user; /proc unreadable: trust the pid
            return False

    def _check_other_host(self) -> None:
        """flock succeeded; a record another host left with a fresh heartbeat still holds the folder (see above)."""
        record = self._record()
        if not record:
            return
        if record.get("host") != socket.gethostname():
            age = self._age()
            if age <= STALE_S:
                raise self._refusal(record, f"; its heartbeat is {age:.0f} s old (it counts as gone after "
                                            f"{STALE_S:.0f} s without one)")
            log.warning("%s: taking over the lock left by %s: no heartbeat for %.0f s, that process is gone",
                        self.what, describe(record), age)
        else:
            log.warning("%s: taking over the lock left by %s, which ended without releasing it", self.what,
                        describe(record))

    def _refusal(self, record: dict[str, Any], extra: str = "") -> RunError:
        holder = describe(record) if record else "another process (no record yet)"
        return RunError(f"{self.what} is in use by another lora_ft process: {holder}{extra}; wait for it to finish "
                        "or stop it, or choose another output_dir")

    def _write_record(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(["lora-ft", *sys.argv[1:]])[:300]}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    # -------------------------------------------------------------------------------------------- release
    def release(self) -> None:
        """Delete the lock file (only while it is still ours) and drop the lock; remove a folder it created."""
        if self._fd is None:
            return
        self._stop.set()
        if self._same_file(self._fd):
            self.path.unlink(missing_ok=True)
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        folder = self.path.parent
        while self._made is not None:  # created for this lock and still empty (a run that failed early)
            try:
                folder.rmdir()
            except OSError:
                break
            if folder == self._made:
                break
            folder = folder.parent
        self._made = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _process_start(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot); None where /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if sys.platform != "linux":
            return None
        raise ProcessLookupError(pid) from None
    return int(stat.rsplit(")", 1)[1].split()[19])


def read_holder(path: str | Path) -> dict[str, Any]:
    """The record in a lock file (empty when there is none), e.g. for tests and messages."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def live_holder(path: str | Path) -> str | None:
    """Who holds the lock file ``path`` now (``describe``'s words), or None when no live process does.

    Read without taking the lock, not even for a moment: a reader (``lora-ft compare``) must never make a writer
    that starts at the same time refuse. A record of this host counts while its process runs; one of another host
    while its heartbeat is fresh by this host's clock (``acquire`` measures against the file server's clock through a
    probe file, which would be a write). A lock file without a record is being taken right now.
    """
    path = Path(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    record = read_holder(path)
    if not record:
        return "another process (no record yet)" if age <= STALE_S else None
    if record.get("host") == socket.gethostname():
        return None if RunLock._holder_dead(record) else describe(record)
    return describe(record) if age <= STALE_S else None
