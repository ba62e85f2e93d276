# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Streaming outputs: an output-folder lock, an append-only resume journal, and ordered final files.

Rows are appended to a journal (``OUT/.medcbm/journal.rank<r>.jsonl``) as they are computed, so the cost of
writing is linear in the rows, and an interrupted run loses at most the batch in flight. Each journal line
carries the input as given, its content sha256 and the run fingerprint (model, edit, preprocessing, output
columns): a rerun keeps a row only when all three still match, so a file replaced under the same name is
recomputed. The final ``predictions.csv`` is assembled in input order and written atomically.

Two runs into one folder cannot interleave: :class:`OutputLock` holds an ``flock`` on ``OUT/.medcbm/lock``
for the whole run, and a second run is refused with a clear message (the first run's files are untouched).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import MedcbmUserError
from .io.atomic import atomic_open

__all__ = ["OutputLock", "OutputBusyError", "RowJournal", "write_csv_atomic", "iter_ordered", "STATE_DIR"]

STATE_DIR = ".medcbm"


class OutputBusyError(MedcbmUserError, RuntimeError):
    """Another medcbm run holds the output folder."""


class OutputLock:
    """Exclusive, non-blocking lock on an output folder for the life of a run (``with OutputLock(out): ...``)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / STATE_DIR / "lock"
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = ""
            try:
                holder = self.path.read_text().strip()
            except OSError:
                pass
            raise OutputBusyError(
                f"another medcbm run{f' (pid {holder})' if holder else ''} is writing to {self.path.parent.parent}; "
                "wait for it to finish or choose another --output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RowJournal:
    """Append-only JSON-lines journal of finished rows for one run fingerprint.

    Args:
        output_dir: the run's output folder.
        fingerprint: rows written under another fingerprint are ignored (and dropped on :meth:`open`).
        rank: this process's rank (each rank appends to its own file; all files are read back).
    """

    def __init__(self, output_dir: str | Path, fingerprint: str, rank: int = 0) -> None:
        self.dir = Path(output_dir) / STATE_DIR
        self.fingerprint = fingerprint
        self.rank = rank
        self.path = self.dir / f"journal.rank{rank}.jsonl"
        self._f: io.TextIOWrapper | None = None

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("journal.rank*.jsonl"))

    def read(self) -> dict[str, dict[str, Any]]:
        """``image -> {"sha256", "row"}`` for every valid line of this fingerprint, across all ranks' files.

        A torn last line (interrupted write) or a line of another fingerprint is skipped.
        """
        out: dict[str, dict[str, Any]] = {}
        for path in self.files():
            try:
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                        except json.JSONDecodeError:
                            continue
                        if entry.get("fp") == self.fingerprint and "image" in entry:
                            out[entry["image"]] = entry
            except OSError:
                continue
        return out

    def done(self) -> dict[str, str]:
        """``image -> sha256`` of finished ``ok`` rows (what a rerun may skip)."""
        return {k: v["sha256"] for k, v in self.read().items() if v.get("row", {}).get("status") == "ok"}

    def open(self, keep: dict[str, dict[str, Any]] | None = None) -> "RowJournal":
        """Start this rank's file: compact it to the ``keep`` entries of the current fingerprint, then append."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:  # drop journals of other fingerprints or world sizes; keep what is still valid
            kept = self.read() if keep is None else keep
            for p in self.files():
                if p != self.path:
                    p.unlink(missing_ok=True)
            with atomic_open(self.path, "w") as f:
                for entry in kept.values():
                    f.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._f = open(self.path, "a", encoding="utf-8")
        return self

    def append(self, image: str, sha256: str | None, row: dict[str, Any]) -> None:
        assert self._f is not None, "open() the journal first"
        entry = {"image": image, "sha256": sha256, "fp": self.fingerprint, "row": row}
        self._f.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self.flush()
            self._f.close()
            self._f = None


def write_csv_atomic(path: str | Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> int:
    """Stream ``rows`` into ``path`` through :func:`medcbm.io.atomic.atomic_open`; returns the row count."""
    n = 0
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
            n += 1
    return n


def iter_ordered(keys: Sequence[str], rows: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for k in keys:
        r = rows.get(k)
        if r is not None:
            yield r
