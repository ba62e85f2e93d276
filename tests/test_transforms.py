# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Tests for medcbm.transforms: reading clinical images and encoder preprocessing."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medcbm.data import write_synthetic_dicom
from medcbm.transforms import (
    SUPPORTED_SUFFIXES,
    ClinicalImagePipeline,
    EncoderInput,
    EncoderInputd,
    ImageReadError,
    LoadClinicalImage,
    LoadClinicalImaged,
    ToModalityChannels,
    ToModalityChannelsd,
    preprocessing_fingerprint,
    read_image,
)

REPO = Path(__file__).resolve().parents[1]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def shared_data_dir() -> Path | None:
    env = os.environ.get("MEDCBM_SHARED_DATA")
    candidate = Path(env) if env else REPO.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def asymmetric_rgb(h: int = 30, w: int = 50) -> np.ndarray:
    """Non-square RGB image with a white marker in the top-left and a red one in the bottom-right."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 1] = np.arange(w, dtype=np.uint8)[None, :] * 3  # green ramp along columns
    arr[..., 2] = np.arange(h, dtype=np.uint8)[:, None] * 5  # blue ramp along rows
    arr[:4, :6] = 255
    arr[-3:, -2:] = (255, 0, 0)
    return arr


def ramp(h: int = 24, w: int = 40, hi: int = 4000) -> np.ndarray:
    """Greyscale ramp with an asymmetric bright block (values 0..hi)."""
    a = np.linspace(0, hi * 0.6, h * w).reshape(h, w)
    a[:5, :7] = hi
    return np.rint(a)


# --------------------------------------------------------------------------------------------------
# Orientation and PIL modes
# --------------------------------------------------------------------------------------------------
def test_png_orientation_matches_pil(tmp_path: Path) -> None:
    arr = asymmetric_rgb()
    f = tmp_path / "asym.png"
    Image.fromarray(arr).save(f)
    out = read_image(f)
    assert out.dtype == np.float32 and out.shape == (30, 50, 3)
    np.testing.assert_allclose(out, np.asarray(Image.open(f)) / 255.0, atol=1e-6)
    assert out[0, 0].tolist() == [1.0, 1.0, 1.0]
    assert out[-1, -1].tolist() == [1.0, 0.0, 0.0]


def test_load_transform_is_channel_first(tmp_path: Path) -> None:
    arr = asymmetric_rgb()
    f = tmp_path / "asym.png"
    Image.fromarray(arr).save(f)
    t = LoadClinicalImage()(str(f))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (3, 30, 50)
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), arr / 255.0, atol=1e-6)
    d = LoadClinicalImaged(keys="image")({"image": f, "label": "x"})
    assert tuple(d["image"].shape) == (3, 30, 50) and d["label"] == "x"


def test_real_cxr_orientation_matches_pil() -> None:
    root = shared_data_dir()
    if root is None:
        pytest.skip("shared data not found: set MEDCBM_SHARED_DATA or provide <repo>/../shared/data")
    files = sorted((root / "nih_cxr14_multires" / "images").glob("*/*.png"))
    if not files:
        pytest.skip(f"no PNG under {root / 'nih_cxr14_multires' / 'images'}")
    for f in (files[0], files[-1]):  # covers the RGB and the greyscale resolutions
        ref = np.asarray(Image.open(f)).astype(np.float64) / 255.0
        if ref.ndim == 2:
            ref = ref[..., None]
        out = read_image(f)
        assert out.shape == ref.shape, f
        np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize(
    "mode, channels",
    [("L", 1), ("LA", 1), ("RGBA", 3), ("RGB", 3), ("P", 3), ("1", 1)],
)
def test_pil_modes(tmp_path: Path, mode: str, channels: int) -> None:
    base = Image.fromarray(asymmetric_rgb())
    img = base.convert(mode)
    f = tmp_path / f"img_{mode}.png"
    img.save(f)
    out = read_image(f)
    assert out.shape == (30, 50, channels)
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    if mode == "RGBA":
        np.testing.assert_allclose(out, np.asarray(base) / 255.0, atol=1e-6)  # alpha dropped
    if mode == "LA":
        np.testing.assert_allclose(out[..., 0], np.asarray(base.convert("L")) / 255.0, atol=1e-6)


def test_rgba_alpha_is_dropped_not_blended(tmp_path: Path) -> None:
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent
    f = tmp_path / "transparent.png"
    Image.fromarray(rgba, mode="RGBA").save(f)
    out = read_image(f)
    assert out.shape == (8, 10, 3)
    np.testing.assert_allclose(out[..., 0], 200 / 255.0, atol=1e-6)


def test_png_16bit_scaled_by_full_range(tmp_path: Path) -> None:
    a = (np.arange(30 * 50).reshape(30, 50) * 40).astype(np.uint16)
    a[0, 0] = 65535
    f = tmp_path / "sixteen.png"
    Image.fromarray(a).save(f)
    assert Image.open(f).mode.startswith("I")
    out = read_image(f)
    assert out.shape == (30, 50, 1)
    np.testing.assert_allclose(out[..., 0], a / 65535.0, atol=1e-6)


def test_tiff_float_and_bmp(tmp_path: Path) -> None:
    a = np.linspace(-5, 5, 20 * 12, dtype=np.float32).reshape(20, 12)
    f = tmp_path / "float.tif"
    Image.fromarray(a, mode="F").save(f)
    out = read_image(f)
    assert out.shape == (20, 12, 1)
    assert out[0, 0, 0] == 0.0 and out[-1, -1, 0] == 1.0
    b = tmp_path / "x.BMP"  # upper-case suffix
    Image.fromarray(asymmetric_rgb()).save(b, format="BMP")
    np.testing.assert_allclose(read_image(b), asymmetric_rgb() / 255.0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------------
def test_truncated_jpeg(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(asymmetric_rgb(64, 64)).save(good, quality=90)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageReadError) as ei:
        read_image(bad)
    assert ei.value.path == str(bad) and str(bad) in str(ei.value)
    assert str(ei.value) == f"{bad}: {ei.value.reason}"


def test_garbage_png_and_empty_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    empty = tmp_path / "empty.jpeg"
    empty.write_bytes(b"")
    for f in (garbage, empty):
        with pytest.raises(ImageReadError) as ei:
            read_image(f)
        assert str(f) in str(ei.value)


def test_missing_file_and_unsupported_suffix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageReadError, match="file not found") as ei:
        read_image(missing)
    assert ei.value.path == str(missing)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ImageReadError, match="unsupported file type") as ei:
        read_image(txt)
    assert str(txt) in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_directory_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "folder.png"
    d.mkdir()
    with pytest.raises(ImageReadError, match="is a folder, not an image file"):
        read_image(d)


def test_image_read_error_pickles() -> None:
    e = pickle.loads(pickle.dumps(ImageReadError("a/b.png", "file not found")))
    assert (e.path, e.reason, str(e)) == ("a/b.png", "file not found", "a/b.png: file not found")


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------
def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    data = ramp(hi=60000)
    m1 = read_image(write_synthetic_dicom(tmp_path / "m1.dcm", data, "MONOCHROME1", bits=16))
    m2 = read_image(write_synthetic_dicom(tmp_path / "m2.dcm", data, "MONOCHROME2", bits=16))
    assert m1.shape == m2.shape == (24, 40, 1)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    # MONOCHROME2: the high-valued block is bright and orientation is kept; the 16-bit stored range maps to [0, 1]
    assert m2[0, 0, 0] == pytest.approx(60000 / 65535) and m2[-1, -1, 0] < 0.7
    np.testing.assert_allclose(m2[..., 0], data / 65535.0, atol=1e-6)


def test_dicom_window_applied(tmp_path: Path) -> None:
    data = np.tile(np.arange(0, 4000, 100, dtype=np.float64), (10, 1))  # columns 0..3900
    f = write_synthetic_dicom(tmp_path / "win.dcm", data, bits=12, window=(2000, 1000))
    out = read_image(f)[..., 0]
    row = out[0]
    assert np.all(row[data[0] <= 1500] == 0.0)
    assert np.all(row[data[0] >= 2500] == 1.0)
    mid = row[(data[0] > 1500) & (data[0] < 2500)]
    assert np.all(np.diff(mid) > 0) and 0.4 < row[data[0] == 2000][0] < 0.6
    # without the window the 12-bit stored range maps to [0, 1] (not the image's own min and max)
    plain = read_image(write_synthetic_dicom(tmp_path / "plain.dcm", data, bits=12))[..., 0]
    np.testing.assert_allclose(plain[0], data[0] / 4095.0, atol=1e-6)


def test_dicom_window_with_monochrome1(tmp_path: Path) -> None:
    data = np.tile(np.arange(0, 4000, 100, dtype=np.float64), (4, 1))
    m1 = read_image(write_synthetic_dicom(tmp_path / "a.dcm", data, "MONOCHROME1", bits=12, window=(2000, 1000)))
    m2 = read_image(write_synthetic_dicom(tmp_path / "b.dcm", data, "MONOCHROME2", bits=12, window=(2000, 1000)))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_rescale_and_signed(tmp_path: Path) -> None:
    data = ramp(hi=2000) - 1000  # -1000 .. 1000 (CT-like)
    signed = read_image(write_synthetic_dicom(tmp_path / "s.dcm", data, bits=16, signed=True))[..., 0]
    np.testing.assert_allclose(signed, (data + 32768) / 65535.0, atol=1e-6)  # signed 16-bit range
    # stored unsigned with a rescale intercept and a lung-ish window in rescaled units
    f = write_synthetic_dicom(tmp_path / "r.dcm", data + 1024, bits=12, rescale=(1.0, -1024.0), window=(0, 400))
    out = read_image(f)[..., 0]
    assert np.all(out[data <= -200] == 0.0) and np.all(out[data >= 200] == 1.0)
    signed12 = read_image(write_synthetic_dicom(tmp_path / "s12.dcm", data, bits=12, signed=True))[..., 0]
    np.testing.assert_allclose(signed12, (data + 2048) / 4095.0, atol=1e-6)
    # unsigned stored values with a rescale and no window: the rescaled stored range [-1024, 3071] maps to [0, 1]
    r = write_synthetic_dicom(tmp_path / "r2.dcm", data + 1024, bits=12, rescale=(1.0, -1024.0))
    np.testing.assert_allclose(read_image(r)[..., 0], (data + 1024) / 4095.0, atol=1e-6)


def test_dicom_8bit(tmp_path: Path) -> None:
    data = ramp(hi=255)
    out = read_image(write_synthetic_dicom(tmp_path / "e.dcm", data, bits=8))[..., 0]
    np.testing.assert_allclose(out, data / 255.0, atol=1e-6)
    m1 = read_image(write_synthetic_dicom(tmp_path / "e1.dcm", data, "MONOCHROME1", bits=8))[..., 0]
    np.testing.assert_allclose(m1, 1.0 - out, atol=1e-6)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_dicom_colour(tmp_path: Path, photometric: str) -> None:
    arr = asymmetric_rgb()
    out = read_image(write_synthetic_dicom(tmp_path / "c.dcm", arr, photometric, bits=8))
    assert out.shape == (30, 50, 3)
    tol = 1e-6 if photometric == "RGB" else 2.5 / 255  # YBR round trip is lossy by a level or two
    np.testing.assert_allclose(out, arr / 255.0, atol=tol)


def test_dicom_phi_never_in_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = ramp(hi=4000)
    f = write_synthetic_dicom(
        tmp_path / "phi.dcm",
        data,
        bits=12,
        patient_name="Doe^John",
        patient_id="SECRET123",
        extra={"PatientBirthDate": "19700101", "StudyDate": "20240229"},
    )
    assert read_image(f).shape == (24, 40, 1)  # the intact file reads
    raw = f.read_bytes()
    secrets = ("Doe", "John", "SECRET123", "19700101", "20240229")

    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[:-500])  # pixel data cut short
    import pydicom

    ds = pydicom.dcmread(f)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    short = tmp_path / "short_pixels.dcm"
    ds.save_as(short)
    ds = pydicom.dcmread(f)
    del ds.PixelData
    nopix = tmp_path / "no_pixels.dcm"
    ds.save_as(nopix)
    header_only = tmp_path / "header_only.dcm"
    header_only.write_bytes(raw[:400])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad in (truncated, short, nopix, header_only):
            with pytest.raises(ImageReadError) as ei:
                read_image(bad)
            msg = str(ei.value) + repr(ei.value) + ei.value.reason
            assert str(bad) in str(ei.value)
            for s in secrets:
                assert s not in msg, (bad.name, msg)
            assert ei.value.__cause__ is None  # pydicom's message (which may quote values) is not chained
            assert ei.value.__context__ is None or ei.value.__suppress_context__
    logged = caplog.text + " ".join(str(w.message) for w in caught)
    for s in secrets:
        assert s not in logged
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(nopix)


def test_dicom_multiframe_and_garbage(tmp_path: Path) -> None:
    frames = np.stack([ramp(hi=1000)] * 3)
    with pytest.raises(ImageReadError, match="multi-frame"):
        read_image(write_synthetic_dicom(tmp_path / "mf.dcm", frames, bits=12))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10 + b"not dicom" * 50)
    with pytest.raises(ImageReadError) as ei:
        read_image(junk)
    assert str(junk) in str(ei.value)


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["img.nii", "img.nii.gz"])
def test_nifti_2d_round_trip_keeps_orientation(tmp_path: Path, name: str) -> None:
    arr = ramp(hi=1000).astype(np.float32)  # 24 x 40, bright block top-left
    f = tmp_path / name
    nib.save(nib.Nifti1Image(arr, np.eye(4)), f)
    out = read_image(f)
    assert out.shape == (24, 40, 1)
    np.testing.assert_allclose(out[..., 0], (arr - arr.min()) / (arr.max() - arr.min()), atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 40, 1), (1, 24, 40)])
def test_nifti_singleton_axis(tmp_path: Path, shape: tuple[int, ...]) -> None:
    arr = ramp(hi=1000).astype(np.int16).reshape(shape)
    f = tmp_path / "s.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), f)
    out = read_image(f)
    assert out.shape == (24, 40, 1) and out[0, 0, 0] == 1.0


def test_nifti_3d_volume_rejected(tmp_path: Path) -> None:
    f = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 5), dtype=np.float32), np.eye(4)), f)
    with pytest.raises(ImageReadError, match=r"3D volume with shape \(8, 9, 5\) is not supported: pass a 2D image"):
        read_image(f)


def test_corrupt_nifti(tmp_path: Path) -> None:
    f = tmp_path / "bad.nii.gz"
    f.write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    with pytest.raises(ImageReadError) as ei:
        read_image(f)
    assert str(f) in str(ei.value)


# --------------------------------------------------------------------------------------------------
# Channel and encoder transforms
# --------------------------------------------------------------------------------------------------
def test_to_modality_channels() -> None:
    rgb = torch.rand(3, 5, 7)
    grey = torch.rand(1, 5, 7)
    out = ToModalityChannels("rgb")(rgb)
    assert torch.equal(out, rgb)
    out = ToModalityChannels("rgb")(grey)
    assert out.shape == (3, 5, 7) and torch.equal(out[0], out[2])
    out = ToModalityChannels("grey")(rgb)
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    assert out.shape == (3, 5, 7)
    for c in range(3):
        torch.testing.assert_close(out[c], lum)
    d = ToModalityChannelsd(keys=["img"], mode="grey")({"img": grey})
    assert d["img"].shape == (3, 5, 7)
    with pytest.raises(ValueError):
        ToModalityChannels("cmyk")
    with pytest.raises(ValueError):
        ToModalityChannels("rgb")(torch.rand(2, 4, 4))


def test_encoder_input_shape_and_normalisation() -> None:
    enc = EncoderInput(16, mean=CLIP_MEAN, std=CLIP_STD)
    x = torch.full((3, 30, 50), 0.5)
    out = enc(x)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(out[c], torch.full((16, 16), (0.5 - CLIP_MEAN[c]) / CLIP_STD[c]))
    # shortest side resized, centre crop: a portrait image keeps its centre rows
    img = torch.zeros(1, 40, 20)
    img[:, 18:22, :] = 1.0
    out = EncoderInput(10, mean=[0.0], std=[1.0])(img)
    assert out.shape == (1, 10, 10)
    assert out[0, 5].mean() > 0.8 and out[0, 0].mean() < 0.05
    # numpy input and the dictionary form
    d = EncoderInputd("image", 8, mean=[0.5] * 3, std=[0.5] * 3)({"image": np.ones((3, 12, 9), np.float32)})
    torch.testing.assert_close(d["image"], torch.ones(3, 8, 8))
    with pytest.raises(ValueError):
        EncoderInput(0, [0.5], [0.5])
    with pytest.raises(ValueError):
        EncoderInput(8, [0.5, 0.5], [0.5])
    with pytest.raises(ValueError):
        EncoderInput(8, [0.5], [0.0])


def _fingerprint(channel_mode: str, *encoder_args: object, **encoder_kwargs: object) -> str:
    """:func:`preprocessing_fingerprint` of the steps a pipeline with these parameters runs."""
    steps = (LoadClinicalImage(), ToModalityChannels(channel_mode), EncoderInput(*encoder_args, **encoder_kwargs))
    return preprocessing_fingerprint(steps)


def test_fingerprints_stable_and_parameter_sensitive() -> None:
    a = _fingerprint("rgb", 224, CLIP_MEAN, CLIP_STD)
    assert a == _fingerprint("rgb", 224, list(CLIP_MEAN), list(CLIP_STD))
    assert len(a) == 64 and int(a, 16) >= 0
    # the key of feature caches already on disk: it changes only with the reader version or the preprocessing
    assert a == "3fd0fc7e90b933d5dfd5f6d5c1921fc9353a82b2b25a483c33a7b9292b4f2a69"
    others = {
        _fingerprint("grey", 224, CLIP_MEAN, CLIP_STD),
        _fingerprint("rgb", 256, CLIP_MEAN, CLIP_STD),
        _fingerprint("rgb", 224, (0.5, 0.5, 0.5), CLIP_STD),
        _fingerprint("rgb", 224, CLIP_MEAN, (0.5, 0.5, 0.5)),
    }
    assert a not in others and len(others) == 4
    assert EncoderInput(8, [0.5], [0.5]).fingerprint() == EncoderInput(8, [0.5], [0.5]).fingerprint()
    assert EncoderInput(8, [0.5], [0.5]).fingerprint() != EncoderInput(9, [0.5], [0.5]).fingerprint()
    assert ToModalityChannels("rgb").fingerprint() != ToModalityChannels("grey").fingerprint()
    assert LoadClinicalImage().fingerprint() == LoadClinicalImage().fingerprint()
    p = ClinicalImagePipeline("rgb", 224, CLIP_MEAN, CLIP_STD)
    assert p.fingerprint() == a


def test_pipeline_end_to_end(tmp_path: Path) -> None:
    grey = tmp_path / "g.dcm"
    write_synthetic_dicom(grey, ramp(hi=4000), "MONOCHROME1", bits=12)
    rgb = tmp_path / "c.png"
    Image.fromarray(asymmetric_rgb()).save(rgb)
    for mode in ("grey", "rgb"):
        pipe = ClinicalImagePipeline(mode, 24, CLIP_MEAN, CLIP_STD)
        for f in (grey, rgb):
            out = pipe(f)
            assert out.shape == (3, 24, 24) and torch.isfinite(out).all()
        if mode == "grey":
            x = pipe(rgb) * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
            torch.testing.assert_close(x[0], x[1]) and torch.testing.assert_close(x[1], x[2])
    with pytest.raises(ImageReadError):  # not wrapped in a RuntimeError
        ClinicalImagePipeline("rgb", 24, CLIP_MEAN, CLIP_STD)(tmp_path / "missing.png")


def test_supported_suffixes_constant() -> None:
    assert SUPPORTED_SUFFIXES == (".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------------
# Resize modes, interpolation, open_clip config
# --------------------------------------------------------------------------------------------------
def test_resize_mode_longest_pads_to_square_keeping_the_whole_image() -> None:
    img = torch.ones(1, 40, 20)  # portrait: the long side (rows) becomes 10, the short side 5
    img[:, :, 0] = 0.5  # the left edge column stays in view
    out = EncoderInput(10, [0.0], [1.0], resize_mode="longest")(img)
    assert out.shape == (1, 10, 10)
    assert torch.all(out[:, :, :2] == 0) and torch.all(out[:, :, 7:] == 0)  # (10 - 5) // 2 = 2 left, 3 right
    assert torch.all(out[:, :, 3:6] > 0.9)
    # landscape: padding rows, normalisation applied after padding (pad value is black, not the mean)
    out = EncoderInput(8, [0.5], [0.5], resize_mode="longest")(torch.ones(1, 4, 8))
    assert (
        torch.all(out[:, :2] == -1.0) and torch.all(out[:, 6:] == -1.0) and torch.allclose(out[:, 2:6], torch.ones(1))
    )


def test_longest_padding_matches_open_clip() -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    arr = np.full((30, 50, 3), 255, np.uint8)
    cfg = PreprocessCfg(size=16, resize_mode="longest", mean=(0.0,) * 3, std=(1.0,) * 3)
    ref = image_transform_v2(cfg, is_train=False)(Image.fromarray(arr))
    ours = EncoderInput(16, [0.0] * 3, [1.0] * 3, resize_mode="longest")(torch.ones(3, 30, 50))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours == 0, ref == 0)  # same padded rows and columns
    torch.testing.assert_close(ours, ref, atol=0.02, rtol=0)


def test_resize_mode_squash_and_shortest_differ_as_documented() -> None:
    img = torch.zeros(1, 20, 40)
    img[:, :, :4] = 1.0  # a bar at the left edge
    squash = EncoderInput(10, [0.0], [1.0], resize_mode="squash")(img)
    shortest = EncoderInput(10, [0.0], [1.0])(img)
    assert squash.shape == shortest.shape == (1, 10, 10)
    assert squash[0, :, 0].min() > 0.9  # squash keeps the whole width
    assert shortest[0, :, 0].max() < 0.05  # shortest crops the sides away


def test_interpolation_choices() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 33, 47, generator=g)
    outs = {m: EncoderInput(16, [0.0], [1.0], interpolation=m)(img) for m in ("bicubic", "bilinear", "nearest")}
    assert not torch.allclose(outs["bicubic"], outs["bilinear"])
    assert set(torch.unique(outs["nearest"]).tolist()) <= set(torch.unique(img).tolist())  # values are picked
    with pytest.raises(ValueError, match="interpolation"):
        EncoderInput(16, [0.0], [1.0], interpolation="lanczos")
    with pytest.raises(ValueError, match="resize_mode"):
        EncoderInput(16, [0.0], [1.0], resize_mode="crop")


def test_fingerprint_covers_resize_mode_interpolation_and_reader_version(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _fingerprint("rgb", 224, CLIP_MEAN, CLIP_STD)
    assert base == _fingerprint("rgb", 224, CLIP_MEAN, CLIP_STD, resize_mode="shortest")
    variants = {
        _fingerprint("rgb", 224, CLIP_MEAN, CLIP_STD, resize_mode="longest"),
        _fingerprint("rgb", 224, CLIP_MEAN, CLIP_STD, resize_mode="squash"),
        _fingerprint("rgb", 224, CLIP_MEAN, CLIP_STD, interpolation="bilinear"),
    }
    assert base not in variants and len(variants) == 3
    p = ClinicalImagePipeline("rgb", 224, CLIP_MEAN, CLIP_STD, resize_mode="longest", interpolation="bilinear")
    assert p.fingerprint() == preprocessing_fingerprint(p.transforms)
    assert p.fingerprint() == _fingerprint(
        "rgb", 224, CLIP_MEAN, CLIP_STD, resize_mode="longest", interpolation="bilinear"
    )
    budget = ClinicalImagePipeline("rgb", 224, CLIP_MEAN, CLIP_STD, max_side=64, max_pixels=4096)
    assert budget.fingerprint() == base  # the pixel budget refuses files; it does not change their features
    import medcbm.transforms as tr

    monkeypatch.setattr(tr, "READER_VERSION", tr.READER_VERSION + 1)
    assert _fingerprint("rgb", 224, CLIP_MEAN, CLIP_STD) != base


def test_pipeline_from_open_clip_config_and_to_dict(tmp_path: Path) -> None:
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    cfg = asdict(PreprocessCfg(size=(32, 32), resize_mode="longest", interpolation="bilinear"))
    p = ClinicalImagePipeline.from_config("grey", cfg)
    d = p.to_dict()
    assert d == {
        "channel_mode": "grey",
        "image_size": 32,
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "resize_mode": "longest",
        "interpolation": "bilinear",
    }
    same = ClinicalImagePipeline(
        d["channel_mode"], d["image_size"], d["mean"], d["std"], resize_mode="longest", interpolation="bilinear"
    )
    assert same.fingerprint() == p.fingerprint()
    assert ClinicalImagePipeline.from_config("rgb", {}).to_dict()["resize_mode"] == "shortest"  # open_clip defaults
    f = tmp_path / "wide.png"
    Image.fromarray(np.full((10, 40), 200, np.uint8)).save(f)
    x = p(f)
    assert x.shape == (3, 32, 32)
    for bad in ({"size": (32, 48)}, {"colour": 1}, {"fill_color": 128}, {"mode": "L"}):
        with pytest.raises(ValueError):
            ClinicalImagePipeline.from_config("rgb", bad)
