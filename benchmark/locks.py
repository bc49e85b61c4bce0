"""Lock files: two runs over one results folder never run the same job at once, and two
reports never write one report folder at once.

A job's lock is `<record stem>.lock` beside its record. It is created with O_CREAT|O_EXCL
(atomic on local and NFS file systems) and holds its owner's host, pid, process start and
start time. A run that finds a lock skips the job ("running elsewhere"), unless the lock is
stale: its owner was on this host and that process is gone (killed, or the machine rebooted
between), or the lock is unreadable and old. A stale lock is taken over; one left beside a
job whose record is finished is removed (`remove_stale_lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from datasets_builders.atomic import write_error
from datasets_builders.errors import NdbenchError

# An unreadable lock younger than this may be one being written this instant; older, it is
# the leftover of a process killed between creating and filling it.
UNREADABLE_GRACE_S = 60.0
WARNING = "ndbench: warning: "  # the prefix of the warning lines `try_lock` returns


def lock_path(record: Path) -> Path:
    """Where the lock of the job whose record goes to `record` lives."""
    return Path(record).with_suffix(".lock")


def _proc_stat(pid: int) -> list[str]:
    """Fields 3.. of Linux's /proc/<pid>/stat (state, ppid, ...); [] where there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    # The command name (field 2) may hold spaces and parentheses, so split after the last ")".
    return stat.rpartition(")")[2].split()


def _process_start(pid: int) -> str:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat), "" where it cannot be
    read. Two processes with the same pid (a pid reused after a kill) have different ones."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock."""

    host: str
    pid: int
    started: str  # ISO 8601 UTC
    process_start: str  # see _process_start
    token: str  # unique per lock, so a takeover can tell one lock from another

    @classmethod
    def me(cls) -> LockOwner:
        """This process, now."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, datetime.now(UTC).isoformat(timespec="seconds"),
                   _process_start(pid), uuid.uuid4().hex)

    def describe(self) -> str:
        """`host pid 123 since <time>`."""
        return f"{self.host} pid {self.pid} since {self.started}"

    def is_gone(self) -> bool:
        """True when the owner surely no longer runs: same host and its process is gone."""
        if self.host != socket.gethostname():
            return False  # another machine: nothing to check it against
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, owned by another user
        fields = _proc_stat(self.pid)
        if fields and fields[0] == "Z":
            return True  # killed, not yet reaped by its parent
        current = fields[19] if len(fields) > 19 else ""
        return bool(self.process_start and current and current != self.process_start)


@dataclass
class JobLock:
    """A lock this process holds; `release` removes it."""

    path: Path
    owner: LockOwner

    def release(self) -> None:
        """Remove the lock file, if it is still ours."""
        if _read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


@dataclass
class LockAttempt:
    """What `try_lock` found: the lock (when acquired) or who holds it, plus warning lines."""

    lock: JobLock | None
    holder: str = ""  # who holds it, when not acquired
    notes: tuple[str, ...] = ()


def _read_owner(path: Path) -> LockOwner | None:
    try:
        return _parse_owner(path.read_text(encoding="utf-8"))
    except OSError:
        return None


def _parse_owner(text: str) -> LockOwner | None:
    try:
        return LockOwner(**json.loads(text))
    except (ValueError, TypeError, RecursionError):
        return None


def _read_lock(path: Path) -> tuple[str, float] | None:
    """The lock file's text and age in seconds; None when there is none."""
    try:
        return path.read_text(encoding="utf-8"), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _stale_reason(text: str, age: float) -> str | None:
    """Why a lock file holding `text`, `age` seconds old, is stale (its owner is gone, or it is
    unreadable past UNREADABLE_GRACE_S); None while its owner runs or it may be being written."""
    owner = _parse_owner(text)
    if owner is None:
        return "unreadable" if age >= UNREADABLE_GRACE_S else None
    return f"its owner {owner.describe()} is gone" if owner.is_gone() else None


def _create(path: Path, owner: LockOwner) -> bool:
    """Create the lock file holding `owner`; False when it exists already."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where the folder belongs is not a lock that exists
        raise write_error(path.parent, exc) from exc
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(owner)) + "\n")
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    return True


def _take_over(path: Path, stale_text: str, token: str) -> bool:
    """Remove the stale lock whose text is `stale_text`, but never a lock someone created
    after we read it: move it aside (atomic), check it is the one we read, else put it back.
    Whether the stale lock was removed here."""
    aside = path.with_name(f"{path.name}.stale-{token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # another run removed it first
    try:
        if aside.read_text(encoding="utf-8") != stale_text:
            try:
                os.link(aside, path)  # a fresh lock: restore it (unless yet another exists)
            except FileExistsError:
                pass
            return False
        return True
    finally:
        aside.unlink(missing_ok=True)


def remove_stale_lock(record: Path) -> tuple[str, ...]:
    """Remove the lock beside the finished record `record` when it is stale (its owner gone, or
    unreadable and old); a lock a live process holds, or one being written, stays. Returns the
    warning line of a lock removed (none when nothing was, or it could not be)."""
    path = lock_path(record)
    try:
        found = _read_lock(path)
        why = None if found is None else _stale_reason(*found)
        if why is None or not _take_over(path, found[0], uuid.uuid4().hex):
            return ()
    except (OSError, ValueError):  # ValueError: not UTF-8
        return ()  # left for a later run: the job is finished either way
    return (f"{WARNING}removed stale lock {path} beside its finished record ({why})",)


def try_lock(record: Path, attempts: int = 3) -> LockAttempt:
    """Take the lock of the job whose record goes to `record`, taking over a stale one."""
    return try_lock_file(lock_path(record), attempts)


def try_lock_file(path: Path, attempts: int = 3) -> LockAttempt:
    """Take the lock file `path`, taking over a stale one."""
    me = LockOwner.me()
    notes: list[str] = []
    for _ in range(attempts):
        if _create(path, me):
            return LockAttempt(JobLock(path, me), notes=tuple(notes))
        found = _read_lock(path)
        if found is None:
            continue  # released meanwhile: try again
        why = _stale_reason(*found)
        if why is None:
            owner = _parse_owner(found[0])
            holder = f"another run (lock {path} is being written)" if owner is None else owner.describe()
            return LockAttempt(None, holder, tuple(notes))
        notes.append(f"{WARNING}taking over stale lock {path} ({why})")
        _take_over(path, found[0], me.token)
    return LockAttempt(None, f"another run (lock {path} keeps changing)", tuple(notes))


@contextlib.contextmanager
def folder_lock(lock_file: Path, *, what: str, wait_s: float, note: Callable[[str], None],
                poll_s: float = 0.5) -> Iterator[None]:
    """Hold the lock file `lock_file` (a stale one is taken over, as a job's) for the body;
    while another live process holds it, wait for it up to `wait_s` seconds, saying so once
    through `note` (which, as for every warning, gets the message without a prefix), then
    refuse with one NdbenchError naming the holder. `what` names the work in messages, e.g.
    "a report into results/report"."""
    deadline, waited = time.monotonic() + wait_s, False
    while True:
        attempt = try_lock_file(Path(lock_file))
        for line in attempt.notes:
            note(line.removeprefix(WARNING))
        if attempt.lock is not None:
            break
        if time.monotonic() >= deadline:
            raise NdbenchError(f"{attempt.holder} is still writing {what} after {wait_s:.0f} s of waiting",
                               f"let it finish and try again; if no such process runs, delete {lock_file}")
        if not waited:
            note(f"waiting for {attempt.holder}, which is writing {what}")
            waited = True
        time.sleep(poll_s)
    try:
        yield
    finally:
        attempt.lock.release()
