"""A content-addressed on-disk store of fixed-shape rows: decoded images and frozen-network
outputs, shared by every job and process on one machine.

An *entry* holds one row per position of a dataset index (row p = the index's image p) for one
content key: `<root>/<kind>/<key[:2]>/<key>/`, with `schema.json` (the row's fields and the
shard size) and `shard-<k>.bin` files, each a memory-mapped block of `rows_per_shard` rows:

    header (4 KiB: magic + JSON)  |  filled[rows] uint8  |  crc32[rows] uint32  |  records[rows]

A row is valid once its `filled` byte is set; its crc32 (over the record's bytes) is checked
when it is read, and a row or shard that fails its check is recomputed after one warning.

Safety: writers lock a shard (`fcntl.flock`, exclusive) while they copy rows in, and set
`filled` last; readers take the shared lock. Shards and schemas are created under the entry's
lock file, as a temporary file renamed into place, so no process ever maps a half-made file.
Before a shard is made the store checks its size budget (the logical size of every shard
under the root) and the free disk space; when either refuses, `write` stores nothing and the
caller keeps the rows in memory (or recomputes them).

Numpy only (no torch), so light processes can share the store.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_text

LOG = logging.getLogger("ndbench.cache")
MAGIC = b"NDBSHARD"
FORMAT_VERSION = 1
HEADER_BYTES = 4096
ALIGN = 64
# Shards of about this many bytes: large enough that a run opens few files, small enough that
# a job touching a few images of an index allocates little of it.
SHARD_TARGET_BYTES = 128 * 2**20
MAX_ROWS_PER_SHARD = 4096
# Disk space always left free besides the budget: a shard is never made when it would leave
# less than this on the file system.
FREE_SPACE_RESERVE = 2 * 2**30
# Default budget: half the free space at the cache root, at most this many bytes. 50 GB holds
# COCO 2014's 123,287 images decoded at 224 px (18.6 GB) with room for frozen features.
DEFAULT_BUDGET_CAP = 50 * 10**9
DEFAULT_BUDGET_FRACTION = 0.5


@dataclass(frozen=True)
class Field:
    """One named array of a row: numpy dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape)]


@dataclass(frozen=True)
class Schema:
    """What one row holds and how rows are grouped into shards."""

    fields: tuple[Field, ...]
    rows_per_shard: int

    @classmethod
    def for_fields(cls, fields: tuple[Field, ...]) -> Schema:
        """The schema of `fields`, with shards of about `SHARD_TARGET_BYTES`."""
        row_bytes = np.dtype([(f.name, f.dtype, f.shape) for f in fields]).itemsize
        rows = int(np.clip(SHARD_TARGET_BYTES // max(row_bytes, 1), 1, MAX_ROWS_PER_SHARD))
        return cls(tuple(fields), rows)

    @property
    def record_dtype(self) -> np.dtype:
        return np.dtype([(f.name, f.dtype, f.shape) for f in self.fields])

    def to_json(self) -> str:
        body = {"version": FORMAT_VERSION, "fields": [f.to_json() for f in self.fields],
                "rows_per_shard": self.rows_per_shard}
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Schema:
        """The schema `to_json` wrote; ValueError for any other text (a damaged file)."""
        body = json.loads(text)
        if not isinstance(body, dict) or body.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a version {FORMAT_VERSION} schema")
        fields, rows = body.get("fields"), body.get("rows_per_shard")
        if not isinstance(fields, list) or not _is_count(rows) or rows < 1:
            raise ValueError("no list of fields or no positive rows_per_shard")
        schema = cls(tuple(_field_from_json(item) for item in fields), rows)
        try:
            dtype = schema.record_dtype
        except (TypeError, ValueError) as exc:  # an unknown dtype, a repeated name, a huge shape
            raise ValueError(f"fields {fields}: {exc}") from exc
        if dtype.hasobject:  # object pointers read from a file would crash the process
            raise ValueError(f"fields {fields} hold Python objects")
        return schema


def _is_count(value: object) -> bool:
    """Whether `value` is a JSON integer >= 0 (not a boolean)."""
    return type(value) is int and value >= 0


def _field_from_json(item: object) -> Field:
    """The `Field` of one `[name, dtype, shape]` list; ValueError for anything else."""
    if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], str)
            and isinstance(item[2], list) and all(_is_count(d) for d in item[2])):
        raise ValueError(f"field {item!r} is not [name, dtype, shape]")
    return Field(item[0], item[1], tuple(item[2]))


def content_key(*parts: object) -> str:
    """A stable hex key for the given parts (their JSON)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class _Layout:
    """Byte offsets inside a shard of `rows` rows."""

    def __init__(self, schema: Schema, rows: int):
        self.rows = rows
        self.filled = HEADER_BYTES
        self.crc = _aligned(self.filled + rows)
        self.records = _aligned(self.crc + 4 * rows)
        self.size = self.records + rows * schema.record_dtype.itemsize


class Shard:
    """One shard file, mapped in this process (re-mapped after a fork: locks are per process)."""

    def __init__(self, path: Path, schema: Schema, rows: int):
        self.path = path
        self.schema = schema
        self.layout = _Layout(schema, rows)
        self._pid = -1
        self._fd = -1
        self._filled: np.ndarray | None = None
        self._crc: np.ndarray | None = None
        self._records: np.ndarray | None = None

    def header(self) -> bytes:
        body = json.dumps({"schema": self.schema.to_json(), "rows": self.layout.rows}).encode("utf-8")
        return (MAGIC + len(body).to_bytes(4, "little") + body).ljust(HEADER_BYTES, b"\0")

    def valid_file(self) -> bool:
        """The file exists with this shard's header and size."""
        if not self.path.is_file():  # a folder, or a FIFO that opening would block on
            return False
        try:
            with self.path.open("rb") as handle:
                head = handle.read(HEADER_BYTES)
                size = os.fstat(handle.fileno()).st_size
        except OSError:
            return False
        return head == self.header() and size == self.layout.size

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        self._fd = os.open(self.path, os.O_RDWR)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(self.layout.size,))
        lay = self.layout
        self._filled = mm[lay.filled:lay.filled + lay.rows]
        self._crc = mm[lay.crc:lay.crc + 4 * lay.rows].view(np.uint32)
        self._records = mm[lay.records:lay.size].view(self.schema.record_dtype)
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # a pickled shard re-maps in its new process
        state = dict(self.__dict__)
        state.update(_pid=-1, _fd=-1, _filled=None, _crc=None, _records=None)
        return state

    def filled(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` hold a value (a hint: `read` checks again under the lock)."""
        self._open()
        return self._filled[rows].astype(bool)

    def read(self, rows: np.ndarray, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(records of `rows`, which are valid). With `check`, rows that fail their crc are
        marked unfilled, with one warning, so they get recomputed."""
        self._open()
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            records = self._records[rows].copy()
            crcs = self._crc[rows].copy()
            ok = self._filled[rows].astype(bool)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        bad = [i for i in np.flatnonzero(ok) if check and row_crc(records[i:i + 1]) != crcs[i]]
        if bad:
            LOG.warning("ndbench: cache shard %s: %d row(s) failed their checksum; recomputing them",
                        self.path, len(bad))
            ok[bad] = False
            self._unfill(rows[bad])
        return records, ok

    def _unfill(self, rows: np.ndarray) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._filled[rows] = 0
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def write(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Store `records` at `rows` (rows another process filled meanwhile are left as they are)."""
        self._open()
        crcs = np.asarray([row_crc(records[i:i + 1]) for i in range(len(rows))], dtype=np.uint32)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            todo = ~self._filled[rows].astype(bool)
            self._records[rows[todo]] = records[todo]
            self._crc[rows[todo]] = crcs[todo]
            self._filled[rows[todo]] = 1  # last: the row is valid from here on
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


def row_crc(record: np.ndarray) -> int:
    """crc32 of one record's bytes (a 1-row structured array)."""
    return zlib.crc32(np.ascontiguousarray(record).view(np.uint8))


class Entry:
    """The rows of one content key, over positions 0..n-1 of a dataset index."""

    def __init__(self, store: ArrayStore, kind: str, key: str, n_rows: int, description: str = ""):
        self.store = store
        self.kind = kind
        self.key = key
        self.n_rows = n_rows
        self.description = description
        self.folder = store.root / kind / key[:2] / key
        self._schema: Schema | None = None
        self._shards: dict[int, Shard] = {}

    # --- schema ----------------------------------------------------------------------------
    def schema(self) -> Schema | None:
        """The entry's schema, or None while nothing was ever stored (or a damaged entry was
        just emptied, see `_load_schema`)."""
        if self._schema is None:
            self._schema = self._load_schema(locked=False)
        return self._schema

    def _load_schema(self, locked: bool) -> Schema | None:
        """The schema in `schema.json`, None when there is none. A damaged one (not a file, not
        a schema) empties the entry with one warning, so its rows are recomputed; `locked`:
        the caller holds the entry's lock."""
        path = self.folder / "schema.json"
        try:
            return _read_schema(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            if not locked:  # look again under the lock: another process may be repairing it
                with self._entry_lock():
                    return self._load_schema(locked=True)
            LOG.warning("ndbench: cache entry %s has a damaged schema.json (%s); recomputing it", self.folder, exc)
            try:
                for old in [path, *self.folder.glob("shard-*.bin")]:
                    _remove(old)
            except OSError:
                pass  # what cannot be removed is refused again by its checks
            self._shards.clear()
            return None

    def ensure_schema(self, fields: tuple[Field, ...]) -> Schema:
        """The entry's schema for `fields`: created when absent; when it holds other fields
        (the code that fills it changed), the entry is emptied with one warning."""
        wanted = Schema.for_fields(fields)
        if self.schema() == wanted:
            return wanted
        with self._entry_lock():
            found = self._load_schema(locked=True)
            if found != wanted:
                if found is not None:
                    LOG.warning("ndbench: cache entry %s holds other fields; recomputing it", self.folder)
                for old in self.folder.glob("shard-*.bin"):
                    _remove(old)
                meta = {"kind": self.kind, "description": self.description, "rows": self.n_rows}
                atomic_write_text(self.folder / "meta.json", json.dumps(meta, sort_keys=True) + "\n")
                atomic_write_text(self.folder / "schema.json", wanted.to_json())
                self._shards.clear()
            self._schema = wanted
        return wanted

    # --- rows ------------------------------------------------------------------------------
    def _groups(self, positions: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard number, indices into `positions`, rows inside the shard) per shard touched."""
        per = self.schema().rows_per_shard
        shard_of = positions // per
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            yield int(k), where, positions[where] - k * per

    def _shard_rows(self, k: int) -> int:
        per = self.schema().rows_per_shard
        return min(per, self.n_rows - k * per)

    def _shard(self, k: int, create: bool) -> Shard | None:
        shard = self._shards.get(k)
        if shard is not None:
            return shard
        path = self.folder / f"shard-{k:05d}.bin"
        shard = Shard(path, self.schema(), self._shard_rows(k))
        if not shard.valid_file():
            if not path.exists() and not create:
                return None
            with self._entry_lock():
                if not shard.valid_file():
                    if path.exists():
                        LOG.warning("ndbench: cache shard %s failed its size or header check; recomputing it", path)
                        try:
                            _remove(path)
                        except OSError:  # it stays refused by its check: recompute without storing
                            return None
                    if not create or not self.store.reserve(shard.layout.size, self.folder):
                        return None
                    try:
                        _create_file(path, shard.header(), shard.layout.size)
                    except OSError as exc:  # the disk filled up meanwhile: recompute instead
                        LOG.warning("ndbench: cannot make cache shard %s (%s); recomputing instead", path, exc)
                        return None
        self._shards[k] = shard
        return shard

    def filled(self, positions: np.ndarray) -> np.ndarray:
        """Which positions hold a stored row (without reading them)."""
        positions = np.asarray(positions, dtype=np.int64)
        found = np.zeros(len(positions), dtype=bool)
        if self.schema() is None or not len(positions):
            return found
        for k, where, rows in self._groups(positions):
            shard = self._shard(k, create=False)
            if shard is not None:
                found[where] = shard.filled(rows)
        return found

    def read(self, positions: np.ndarray, check: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """(records at `positions`, which of them are valid); (None, all False) when the entry
        holds nothing yet. `check`: verify each row's crc (skip it only for rows checked before)."""
        positions = np.asarray(positions, dtype=np.int64)
        schema = self.schema()
        ok = np.zeros(len(positions), dtype=bool)
        if schema is None:
            return None, ok
        records = np.zeros(len(positions), dtype=schema.record_dtype)
        for k, where, rows in self._groups(positions):
            shard = self._shard(k, create=False)
            if shard is not None:
                records[where], ok[where] = shard.read(rows, check)
        return records, ok

    def write(self, positions: np.ndarray, records: np.ndarray) -> np.ndarray:
        """Store `records` at `positions`; returns which were stored (False where the budget or
        the free disk space refused a new shard)."""
        positions = np.asarray(positions, dtype=np.int64)
        stored = np.zeros(len(positions), dtype=bool)
        if self.schema() is None:
            return stored
        for k, where, rows in self._groups(positions):
            shard = self._shard(k, create=True)
            if shard is not None:
                shard.write(rows, records[where])
                stored[where] = True
        return stored

    def _entry_lock(self) -> _FileLock:
        return _FileLock(self.folder / ".lock")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_shards"] = {}
        return state


class _FileLock:
    """An exclusive `flock` on a lock file, as a context manager."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1

    def __enter__(self) -> _FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _read_schema(path: Path) -> Schema:
    """The schema in the file at `path`; FileNotFoundError when there is none, ValueError or
    another OSError when what is there is not a schema file."""
    if path.exists() and not path.is_file():
        raise ValueError("not a file")
    return Schema.from_json(path.read_text(encoding="utf-8"))


def _remove(path: Path) -> None:
    """Delete `path` whatever it is (a damaged entry's file may have been replaced by a folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _create_file(path: Path, header: bytes, size: int) -> None:
    """A zero-filled file of `size` bytes starting with `header`, its blocks reserved on disk
    (so writing rows through the memory map can never hit a full disk), renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(header)
            handle.truncate(size)
            try:
                os.posix_fallocate(handle.fileno(), 0, size)
            except (AttributeError, OSError) as exc:  # a file system without fallocate: sparse it stays
                if getattr(exc, "errno", None) == errno.ENOSPC:
                    raise
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class KindUsage:
    """What one kind of entry takes on disk."""

    kind: str
    entries: int
    shards: int
    allocated_bytes: int  # logical size of the shards (what the budget counts)
    disk_bytes: int  # blocks actually written (shards are sparse until filled)


class ArrayStore:
    """The store under `root` with a size budget in bytes (None: no budget, free space only)."""

    def __init__(self, root: Path, budget_bytes: float | None = None):
        self.root = Path(root)
        self.budget_bytes = budget_bytes

    def entry(self, kind: str, key: str, n_rows: int, description: str = "") -> Entry:
        """The entry of `key` (rows 0..n_rows-1) among entries of `kind`."""
        return Entry(self, kind, key, n_rows, description)

    def allocated_bytes(self) -> int:
        """Logical size of every shard under the root."""
        return sum(u.allocated_bytes for u in self.usage())

    def reserve(self, size: int, folder: Path) -> bool:
        """Whether a new shard of `size` bytes fits the budget and the free disk space."""
        if self.budget_bytes is not None and self.allocated_bytes() + size > self.budget_bytes:
            LOG.info("ndbench: cache budget reached; recomputing instead of storing")
            return False
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder).free < size + FREE_SPACE_RESERVE:
            LOG.info("ndbench: too little free disk space for the cache; recomputing instead of storing")
            return False
        return True

    def usage(self) -> list[KindUsage]:
        """Sizes per kind of entry."""
        found = []
        if not self.root.is_dir():
            return found
        for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            entries = shards = allocated = disk = 0
            for entry in kind_dir.glob("*/*"):
                if not entry.is_dir():
                    continue
                entries += 1
                for shard in entry.glob("shard-*.bin"):
                    try:
                        st = shard.stat()
                    except FileNotFoundError:
                        continue
                    shards += 1
                    allocated += st.st_size
                    disk += st.st_blocks * 512
            found.append(KindUsage(kind_dir.name, entries, shards, allocated, disk))
        return found

    def clear(self, kind: str | None = None) -> int:
        """Delete every entry (of `kind` only, when given); returns the bytes freed on disk."""
        def disk(usage: list[KindUsage]) -> int:
            return sum(u.disk_bytes for u in usage if kind is None or u.kind == kind)

        before = self.usage()
        for usage in before:
            if kind is None or usage.kind == kind:
                shutil.rmtree(self.root / usage.kind, ignore_errors=True)  # what cannot go stays counted
        return disk(before) - disk(self.usage())


def default_budget_bytes(root: Path) -> int:
    """Half of the space the store could use (the free space where it lives plus what it holds
    already), at most `DEFAULT_BUDGET_CAP`."""
    probe = Path(root)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free + ArrayStore(root).allocated_bytes()
    return int(min(DEFAULT_BUDGET_CAP, DEFAULT_BUDGET_FRACTION * free))


def writable_root(root: Path) -> bool:
    """Whether the store's root can be created and written to."""
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(root, os.W_OK)
