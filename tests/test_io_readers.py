# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Tests for medcbm.io.readers: MONAI ImageReader conformance, DICOM display mapping, pixel budget."""

from __future__ import annotations

import os
import threading
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.data.image_reader import ImageReader
from monai.transforms import Compose, LoadImage
from PIL import Image

from medcbm.io import readers
from medcbm.io.errors import ImageReadError, find_read_error
from medcbm.io.readers import (
    ClinicalDicomReader,
    ClinicalNiftiReader,
    ClinicalPILReader,
    read_image,
    reader_for,
)
from medcbm.io.samples import write_synthetic_dicom
from medcbm.transforms import ClinicalImagePipeline, LoadClinicalImage, ToModalityChannels


def _grey(h: int = 12, w: int = 20) -> np.ndarray:
    """8-bit values in a narrow dark band (20..90) with an asymmetric block: min-max would stretch it."""
    a = (np.arange(h * w).reshape(h, w) % 71 + 20).astype(np.uint8)
    a[:3, :4] = 90
    return a


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _tiny_wide_png(path: Path, width: int, height: int = 1) -> Path:
    """A valid greyscale PNG of ``height x width`` zeros, compressed to a few hundred bytes."""
    raw = (b"\x00" + b"\x00" * width) * height
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, 9))
    path.write_bytes(data + _png_chunk(b"IEND", b""))
    return path


# --------------------------------------------------------------------------------------------------
# MONAI ImageReader conformance
# --------------------------------------------------------------------------------------------------
def test_readers_are_monai_image_readers_and_verify_suffix() -> None:
    for cls, good, bad in (
        (ClinicalPILReader, ["a.PNG", "b.jpg", "c.tiff"], ["a.dcm", "x.nii.gz", "y.txt"]),
        (ClinicalNiftiReader, ["a.nii", "b.NII.GZ"], ["a.png", "b.gz"]),
        (ClinicalDicomReader, ["a.dcm", "B.DCM"], ["a.png", "a.nii"]),
    ):
        r = cls()
        assert isinstance(r, ImageReader)
        for name in good:
            assert r.verify_suffix(name) and r.verify_suffix([name, Path(name)]), name
        for name in bad:
            assert not r.verify_suffix(name), name
            assert not r.verify_suffix([good[0], name])
    assert isinstance(reader_for("x.nii.gz"), ClinicalNiftiReader) and reader_for("x.txt") is None


def test_read_and_get_data_give_hwc_unit_float_and_metadata(tmp_path: Path) -> None:
    f = tmp_path / "g.png"
    Image.fromarray(_grey()).save(f)
    r = ClinicalPILReader()
    arr, meta = r.get_data(r.read(str(f)))
    assert arr.dtype == np.float32 and arr.shape == (12, 20, 1)
    np.testing.assert_allclose(arr[..., 0], _grey() / 255.0, atol=1e-7)
    assert meta["original_channel_dim"] == -1 and list(meta["spatial_shape"]) == [12, 20]
    assert meta["medcbm_reader_version"] == readers.READER_VERSION >= 2
    arr2, _ = r.get_data(r.read((str(f),)))  # LoadImage passes a one-element tuple
    np.testing.assert_array_equal(arr, arr2)


@pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI's optional GPU DICOM decoder is absent here
def test_registered_with_monai_load_image(tmp_path: Path) -> None:
    png = tmp_path / "c.png"
    rgb = np.zeros((6, 9, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb).save(png)
    dcm = write_synthetic_dicom(tmp_path / "g.dcm", _grey(), bits=8)
    # no reader given: LoadImage picks by verify_suffix, trying the last registered first
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    assert loader.auto_select
    loader.register(ClinicalPILReader())
    loader.register(ClinicalDicomReader())
    img = loader(str(png))
    assert isinstance(img, MetaTensor) and tuple(img.shape) == (3, 6, 9)  # (C, H, W), rows not transposed
    assert img[0, 0, 0] == 1.0 and img[1, 0, 0] == 0.0
    assert img.meta["medcbm_reader"] == "pil"
    g = loader(str(dcm))
    assert tuple(g.shape) == (1, 12, 20)
    np.testing.assert_allclose(g[0].numpy(), _grey() / 255.0, atol=1e-7)
    # reader passed by name at construction, as a MONAI bundle config would
    by_name = LoadImage(reader="medcbm.io.readers.ClinicalDicomReader", image_only=True, ensure_channel_first=True)
    assert tuple(by_name(str(dcm), reader=by_name.readers[-1]).shape) == (1, 12, 20)


def test_load_clinical_image_goes_through_load_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "g.png"
    Image.fromarray(_grey()).save(f)
    calls: list[object] = []
    original = LoadImage.__call__

    def spy(self, filename, reader=None):  # type: ignore[no-untyped-def]
        calls.append(reader)
        return original(self, filename, reader=reader)

    monkeypatch.setattr(LoadImage, "__call__", spy)
    t = LoadClinicalImage()(f)
    assert type(t) is torch.Tensor and tuple(t.shape) == (1, 12, 20) and t.is_contiguous()
    assert len(calls) == 1 and isinstance(calls[0], ClinicalPILReader)
    assert any(isinstance(r, ClinicalDicomReader) for r in LoadClinicalImage().loader.readers)


def test_read_error_reaches_the_caller_through_monai_compose(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png" * 20)
    with pytest.raises(ImageReadError) as direct:
        ClinicalImagePipeline("rgb", 8, [0.5] * 3, [0.5] * 3)(bad)
    assert direct.value.path == str(bad)
    with pytest.raises(Exception) as wrapped:
        Compose([LoadClinicalImage(), ToModalityChannels("rgb")])(str(bad))
    found = find_read_error(wrapped.value)
    assert found is not None and found.path == str(bad) and "not a valid image" in found.reason
    assert find_read_error(RuntimeError("other")) is None


# --------------------------------------------------------------------------------------------------
# DICOM display mapping
# --------------------------------------------------------------------------------------------------
def test_8bit_monochrome2_dicom_reads_exactly_like_the_png(tmp_path: Path) -> None:
    pixels = _grey()
    png = tmp_path / "same.png"
    Image.fromarray(pixels).save(png)
    dcm = write_synthetic_dicom(tmp_path / "same.dcm", pixels, "MONOCHROME2", bits=8)
    np.testing.assert_array_equal(read_image(dcm), read_image(png))
    pipe = ClinicalImagePipeline("grey", 16, [0.5] * 3, [0.25] * 3)
    torch.testing.assert_close(pipe(dcm), pipe(png), rtol=0, atol=0)
    assert read_image(dcm).max() == pytest.approx(90 / 255)  # not stretched to 1


def test_no_window_maps_stored_bit_depth_not_image_range(tmp_path: Path) -> None:
    dark = np.full((8, 8), 100.0)
    dark[0, 0] = 200.0
    out = read_image(write_synthetic_dicom(tmp_path / "d.dcm", dark, bits=12))[..., 0]
    np.testing.assert_allclose(out, dark / 4095.0, atol=1e-7)
    flat = read_image(write_synthetic_dicom(tmp_path / "f.dcm", np.full((4, 5), 2048.0), bits=12))
    np.testing.assert_allclose(flat, 2048 / 4095.0, atol=1e-7)  # a constant image is not all-zero


@pytest.mark.parametrize(
    "photometric, shape, inverted",
    [
        ("MONOCHROME2", None, False),
        ("MONOCHROME2", "IDENTITY", False),
        ("MONOCHROME2", "INVERSE", True),
        ("MONOCHROME1", None, True),
        ("MONOCHROME1", "INVERSE", True),  # the conformant MONOCHROME1 pairing: one inversion, not two
    ],
)
def test_presentation_lut_shape(tmp_path: Path, photometric: str, shape: str | None, inverted: bool) -> None:
    data = _grey().astype(np.float64)
    f = write_synthetic_dicom(tmp_path / "p.dcm", data, photometric, bits=8, presentation_lut_shape=shape)
    out = read_image(f)[..., 0]
    expected = 1.0 - data / 255.0 if inverted else data / 255.0
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_presentation_lut_inverse_with_window(tmp_path: Path) -> None:
    data = np.tile(np.arange(0, 4000, 100, dtype=np.float64), (3, 1))
    plain = read_image(write_synthetic_dicom(tmp_path / "a.dcm", data, bits=12, window=(2000, 1000)))
    inv = read_image(
        write_synthetic_dicom(tmp_path / "b.dcm", data, bits=12, window=(2000, 1000), presentation_lut_shape="INVERSE")
    )
    np.testing.assert_allclose(inv, 1.0 - plain, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Pixel budget, checked from the header before decoding
# --------------------------------------------------------------------------------------------------
def test_tiny_png_with_huge_side_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _tiny_wide_png(tmp_path / "strip.png", 20000)
    assert f.stat().st_size < 200
    decoded: list[str] = []
    monkeypatch.setattr(readers, "_pil_convert", lambda img: decoded.append("x") or img)
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError, match="too large") as ei:
            ClinicalImagePipeline("grey", 224, [0.5] * 3, [0.5] * 3)(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded == [] and peak < 8 * 2**20
    assert ei.value.path == str(f) and "1 x 20000" in ei.value.reason and "16384" in ei.value.reason


def test_pixel_budget_total_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = tmp_path / "g.png"
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(png)
    assert read_image(png).shape == (40, 50, 1)
    with pytest.raises(ImageReadError, match="2000 pixels, over the limit of 1999"):
        read_image(png, max_pixels=1999)
    with pytest.raises(ImageReadError, match="over the limit of 49 pixels"):
        ClinicalImagePipeline("grey", 8, [0.5] * 3, [0.5] * 3, max_side=49)(png)
    monkeypatch.setattr(readers, "MAX_IMAGE_PIXELS", 1000)  # module default, read at call time
    with pytest.raises(ImageReadError, match="over the limit of 1000 pixels"):
        LoadClinicalImage()(png)
    assert LoadClinicalImage(max_pixels=5000)(png).shape == (1, 40, 50)
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 64 * 1024 * 1024


def test_dicom_budget_read_from_header_before_pixel_data(tmp_path: Path) -> None:
    import pydicom

    f = write_synthetic_dicom(tmp_path / "big.dcm", np.zeros((4, 4)), bits=8)
    ds = pydicom.dcmread(f)
    ds.Rows, ds.Columns = 30000, 30000  # header claims 900 MP; the pixel data is 16 bytes
    ds.save_as(tmp_path / "claims_big.dcm")
    with pytest.raises(ImageReadError, match="30000 x 30000 pixels") as ei:
        read_image(tmp_path / "claims_big.dcm")
    assert "truncated" not in ei.value.reason  # refused from the header, not by decoding


def test_nifti_budget_read_from_header(tmp_path: Path) -> None:
    f = tmp_path / "n.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((30, 40, 1), np.float32), np.eye(4)), f)
    assert read_image(f).shape == (30, 40, 1)
    with pytest.raises(ImageReadError, match="1200 pixels, over the limit of 1000"):
        read_image(f, max_pixels=1000)


def test_extreme_aspect_strip_within_budget_stays_small(monkeypatch: pytest.MonkeyPatch) -> None:
    import medcbm.transforms as tr

    sizes: list[tuple[int, ...]] = []
    real = tr.F.interpolate

    def spy(x, size=None, **kw):  # type: ignore[no-untyped-def]
        sizes.append(tuple(size))
        return real(x, size=size, **kw)

    monkeypatch.setattr(tr.F, "interpolate", spy)
    strip = torch.rand(1, 1, 16000)
    out = tr.EncoderInput(224, [0.5], [0.5])(strip)
    assert out.shape == (1, 224, 224) and max(h * w for h, w in sizes) < 64 * 224 * 224
    # ordinary aspect ratios take the plain resize-then-crop path
    sizes.clear()
    tr.EncoderInput(224, [0.5], [0.5])(torch.rand(1, 300, 400))
    assert sizes == [(224, 298)]


# --------------------------------------------------------------------------------------------------
# Non-regular files never block
# --------------------------------------------------------------------------------------------------
def _in_thread(fn, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "reading blocked"
    return box


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("name", ["pipe.png", "pipe.dcm", "pipe.nii.gz"])
def test_fifo_is_an_error_and_never_blocks(tmp_path: Path, name: str) -> None:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    box = _in_thread(lambda: ClinicalImagePipeline("rgb", 8, [0.5] * 3, [0.5] * 3)(fifo))
    err = box.get("error")
    assert isinstance(err, ImageReadError) and err.path == str(fifo)
    assert err.reason == "is a named pipe (FIFO), not a regular file"


def test_links_and_folders_get_clear_reasons(tmp_path: Path) -> None:
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "never_there.png")
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    folder = tmp_path / "scans"
    folder.mkdir()
    cases = {
        dangling: "broken symbolic link (its target does not exist)",
        loop: "symbolic link loop (the link never reaches a file)",
        folder: "is a folder, not an image file",
        tmp_path / "missing.png": "file not found",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageReadError) as ei:
            LoadClinicalImage()(path)
        assert (ei.value.path, ei.value.reason) == (str(path), reason)
    with pytest.raises(ImageReadError, match="unsupported file type '.txt'"):
        read_image(tmp_path / "notes.txt")


def test_invalid_window_falls_back_to_the_stored_range(tmp_path: Path) -> None:
    data = np.full((4, 6), 1000.0)
    data[0, 0] = 3000.0
    f = write_synthetic_dicom(tmp_path / "w0.dcm", data, bits=12, window=(2000, 0))  # width < 1 is invalid
    np.testing.assert_allclose(read_image(f)[..., 0], data / 4095.0, atol=1e-7)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to count open files")
def test_nifti_reads_close_their_files(tmp_path: Path) -> None:
    """A NIfTI read (gzip-compressed, or refused as a volume) closes its file itself, not when the garbage collector
    gets to the image or the exception that still refers to it."""
    import gc

    ok, vol = tmp_path / "slice.nii.gz", tmp_path / "volume.nii"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((30, 40)).astype(np.float32), np.eye(4)), ok)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), vol)
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    reader = ClinicalNiftiReader()
    handle = reader.read(str(ok))
    arr, _ = reader.get_data(handle)  # the handle is still alive here
    assert arr.shape == (30, 40, 1) and len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(ImageReadError, match="3D volume") as refused:
        reader.read(str(vol))
    assert refused.value is not None and len(os.listdir("/proc/self/fd")) == before
