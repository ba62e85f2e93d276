# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Tests for medcbm.io.inputs: special files keep their row and fail later with a clear reason."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcbm.data import InputListError, InputRecord, list_inputs
from medcbm.io.errors import ImageReadError
from medcbm.transforms import ClinicalImagePipeline

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8), 77, dtype=np.uint8)).save(path)
    return path


def _read_all(records: list[InputRecord], timeout: float = 20.0) -> dict[str, str]:
    """image -> "ok" or the error reason, read in a thread that must not block."""
    pipe = ClinicalImagePipeline("rgb", 8, [0.5] * 3, [0.5] * 3)
    out: dict[str, str] = {}

    def run() -> None:
        for r in records:
            try:
                pipe(r.path)
                out[r.image] = "ok"
            except ImageReadError as e:
                assert e.path == str(r.path)
                out[r.image] = e.reason

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "reading the listed inputs blocked"
    return out


@needs_fifo
def test_csv_special_entries_keep_their_rows_and_fail_clearly(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "scans").mkdir()
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "good_link.png").symlink_to(tmp_path / "ok.png")
    csv_path = tmp_path / "in.csv"
    names = ["ok.png", "pipe.png", "scans", "gone.png", "loop.png", "missing.png", "good_link.png", "notes.txt"]
    csv_path.write_text("image,label\n" + "".join(f"{n},a\n" for n in names))
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.setdefault("r", list_inputs(csv_path)), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "listing blocked"
    records = box["r"]
    assert [r.image for r in records] == names  # nothing vanishes, order kept
    assert records[6].path == (tmp_path / "ok.png").resolve()  # a working link resolves to its target
    assert records[3].path.name == "gone.png" and records[4].path.name == "loop.png"  # broken links kept as links
    assert _read_all(records) == {
        "ok.png": "ok",
        "pipe.png": "is a named pipe (FIFO), not a regular file",
        "scans": "is a folder, not an image file",
        "gone.png": "broken symbolic link (its target does not exist)",
        "loop.png": "symbolic link loop (the link never reaches a file)",
        "missing.png": "file not found",
        "good_link.png": "ok",
        "notes.txt": "unsupported file type '.txt' (supported: .dcm, .nii, .nii.gz, .png, .jpg, .jpeg, .bmp, .tif, "
        ".tiff)",
    }


@needs_fifo
def test_folder_scan_lists_broken_links_loops_and_fifos(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _png(root / "a.png")
    (root / "sub").mkdir()
    (root / "sub" / "gone.dcm").symlink_to(root / "absent.dcm")
    (root / "loop.png").symlink_to(root / "loop.png")
    os.mkfifo(root / "sub" / "pipe.jpg")
    (root / "up").symlink_to(root, target_is_directory=True)  # a folder cycle: followed once
    (root / "notes.txt").symlink_to(root / "nothing.txt")  # not an image suffix: not listed
    records = list_inputs(root)
    rel = [Path(r.image).relative_to(root).as_posix() for r in records]
    assert rel == ["a.png", "loop.png", "sub/gone.dcm", "sub/pipe.jpg"]
    reasons = _read_all(records)
    assert reasons[os.path.join(str(root), "sub/gone.dcm")].startswith("broken symbolic link")
    assert reasons[os.path.join(str(root), "loop.png")].startswith("symbolic link loop")
    assert reasons[os.path.join(str(root), "sub/pipe.jpg")].startswith("is a named pipe")
    assert reasons[os.path.join(str(root), "a.png")] == "ok"


@needs_fifo
def test_fifo_csv_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "list.csv"
    os.mkfifo(fifo)
    box: dict[str, object] = {}

    def run() -> None:
        try:
            list_inputs(fifo)
        except InputListError as e:
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "listing a FIFO CSV blocked"
    err = box["e"]
    assert isinstance(err, InputListError) and err.path == str(fifo) and "not a regular file" in err.reason


@needs_fifo
def test_regular_file_sha256_never_opens_special_files(tmp_path: Path) -> None:
    import hashlib

    from medcbm.io.files import regular_file_sha256

    f = _png(tmp_path / "a.png")
    assert regular_file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    os.mkfifo(tmp_path / "p.png")
    box: dict[str, object] = {}

    def run() -> None:
        try:
            regular_file_sha256(tmp_path / "p.png")
        except ImageReadError as e:
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive() and "named pipe" in box["e"].reason  # type: ignore[union-attr]
