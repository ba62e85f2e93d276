# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Tests for medcbm.io.atomic: complete-or-untouched writes, pretty JSON."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from medcbm.io import atomic
from medcbm.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text


def test_json_is_four_space_indented_with_trailing_newline(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "metadata.json"
    obj = {"version": "0.1.0", "nested": {"a": [1, 2]}, "name": "Zürich"}
    assert atomic_write_json(target, obj) == target
    text = target.read_text(encoding="utf-8")
    assert text == json.dumps(obj, indent=4, ensure_ascii=False) + "\n"
    assert '\n    "nested": {\n        "a": [' in text and text.endswith("}\n") and not text.endswith("\n\n")
    assert json.loads(text) == obj


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.json"
    atomic_write_json(target, {"ok": 1})
    before = target.read_bytes()
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")})  # not JSON
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new content")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_replace_goes_through_a_synced_temp_in_the_same_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.bin"
    seen: list[tuple[str, str]] = []
    synced: list[int] = []
    real_replace, real_fsync = os.replace, os.fsync

    def spy_replace(src: str, dst: str) -> None:
        seen.append((str(src), str(dst)))
        assert Path(src).read_bytes() == b"\x00payload"  # complete before it is renamed into place
        assert synced, "the temp file must be fsynced before the rename"
        real_replace(src, dst)

    def spy_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "replace", spy_replace)
    monkeypatch.setattr(atomic.os, "fsync", spy_fsync)
    atomic_write_bytes(target, b"\x00payload")
    assert target.read_bytes() == b"\x00payload"
    ((src, dst),) = seen
    assert Path(src).parent == tmp_path and dst == str(target) and synced


def test_permissions_of_an_existing_file_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    fresh = atomic_write_text(tmp_path / "fresh.txt", "x")  # a new file gets the umask mode, not mkstemp's 0600
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~atomic._UMASK


def test_atomic_open_streams_and_commits_only_on_success(tmp_path: Path) -> None:
    import csv

    from medcbm.io.atomic import atomic_open

    target = tmp_path / "rows.csv"
    with atomic_open(target, newline="") as fh:
        csv.writer(fh).writerows([["image", "label"], ["a.png", "x"]])
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_bytes() == b"image,label\r\na.png,x\r\n"
    with pytest.raises(KeyError):
        with atomic_open(target) as fh:
            fh.write("partial")
            raise KeyError("interrupted")
    assert target.read_bytes() == b"image,label\r\na.png,x\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]
