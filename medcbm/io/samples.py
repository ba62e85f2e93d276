# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Synthetic sample inputs: small, deterministic images per modality, and a synthetic DICOM writer.

:func:`make_sample_inputs` writes a few images per modality so that every bundle runs on a fresh machine
with no data. They are not real patients and carry no patient information (DICOM headers hold
anonymous placeholders).

.. code-block:: python

    from medcbm.io.samples import make_sample_inputs, synthetic_dicom_bytes, write_synthetic_dicom

    paths = make_sample_inputs("cxr", "/tmp/samples")   # PNG, DICOM (MONOCHROME1/2), NIfTI
    data = synthetic_dicom_bytes(np.zeros((8, 8)), "MONOCHROME1", bits=12)   # the file's bytes
    write_synthetic_dicom("/tmp/x.dcm", np.zeros((8, 8)), "MONOCHROME1", bits=12)   # the same bytes, written
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from medcbm.io.atomic import atomic_write_bytes

__all__ = [
    "SAMPLE_MODALITIES",
    "make_sample_inputs",
    "synthetic_dicom_bytes",
    "write_synthetic_dicom",
    "is_sample_path",
]

SAMPLE_MODALITIES = ("dermoscopy", "cxr", "blood")
_SAMPLE_PREFIX = "sample_"
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


# --------------------------------------------------------------------------------------------------
# Synthetic DICOM
# --------------------------------------------------------------------------------------------------
def _uid(*parts: Any) -> str:
    """A deterministic UUID-derived DICOM UID (root ``2.25``)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()
    return "2.25." + str(int(digest[:32], 16))


class _PixelData(NamedTuple):
    """Validated, packed pixels and the geometry the DICOM header states."""

    data: bytes  # PixelData, padded to an even length
    frames: int
    rows: int
    cols: int
    allocated: int  # BitsAllocated: 8 or 16


def _pixel_data(array: np.ndarray, photometric: str, bits: int, signed: bool) -> _PixelData:
    """Check ``array`` against the photometric interpretation and bit depth, and pack it little-endian.

    Args:
        array: ``(H, W)`` / ``(frames, H, W)`` greyscale or ``(H, W, 3)`` RGB values.
        photometric: upper-case ``MONOCHROME1``, ``MONOCHROME2``, ``RGB`` or ``YBR_FULL``.
        bits: bits stored (1..16; 8 for colour).
        signed: two's complement pixels.

    Returns:
        The packed pixels (``YBR_FULL`` converted from RGB) and their geometry.

    Raises:
        ValueError: for an unsupported photometric interpretation, shape, bit depth or value range.
    """
    from pydicom.pixels import convert_color_space

    colour = photometric in ("RGB", "YBR_FULL")
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL"):
        raise ValueError(f"photometric {photometric!r} must be MONOCHROME1, MONOCHROME2, RGB or YBR_FULL")
    if not 1 <= int(bits) <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    arr = np.asarray(array)
    if colour:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"{photometric} needs an (H, W, 3) array, got shape {arr.shape}")
        if signed or bits != 8:
            raise ValueError(f"{photometric} DICOM must be unsigned 8-bit")
        frames, rows, cols = 1, arr.shape[0], arr.shape[1]
    else:
        if arr.ndim not in (2, 3):
            raise ValueError(f"greyscale DICOM needs an (H, W) or (frames, H, W) array, got shape {arr.shape}")
        frames = arr.shape[0] if arr.ndim == 3 else 1
        rows, cols = arr.shape[-2], arr.shape[-1]
    if rows < 1 or cols < 1:
        raise ValueError("array must not be empty")
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = np.rint(arr.astype(np.float64))
    if values.min() < lo or values.max() > hi:
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"array values [{values.min()}, {values.max()}] do not fit {bits}-bit {kind} pixels")
    allocated = 8 if bits <= 8 else 16
    dtype = np.dtype(f"{'<i' if signed else '<u'}{allocated // 8}")
    pixels = values.astype(dtype)
    if photometric == "YBR_FULL":
        pixels = convert_color_space(pixels.astype(np.uint8), "RGB", "YBR_FULL")
    data = pixels.tobytes()
    if len(data) % 2:
        data += b"\x00"
    return _PixelData(data, frames, rows, cols, allocated)


def _file_meta(sop_uid: str) -> Any:
    """The file meta information of a Secondary Capture instance in Explicit VR Little Endian."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _set_image_pixel_module(ds: Any, px: _PixelData, photometric: str, bits: int, signed: bool) -> None:
    """Write the attributes that describe the pixels (samples, geometry, bit depth, sign) into ``ds``."""
    colour = photometric in ("RGB", "YBR_FULL")
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    if px.frames > 1:
        ds.NumberOfFrames = px.frames
    ds.Rows, ds.Columns = int(px.rows), int(px.cols)
    ds.BitsAllocated = px.allocated
    ds.BitsStored = int(bits)
    ds.HighBit = int(bits) - 1
    ds.PixelRepresentation = 1 if signed else 0


def synthetic_dicom_bytes(
    array: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits: int = 16,
    window: tuple[float, float] | None = None,
    signed: bool = False,
    *,
    rescale: tuple[float, float] | None = None,
    patient_name: str = "ANONYMOUS^SAMPLE",
    patient_id: str = "SAMPLE0000",
    modality: str = "OT",
    extra: Mapping[str, Any] | None = None,
    presentation_lut_shape: str | None = None,
) -> bytes:
    """The bytes of a synthetic Secondary Capture DICOM file (Explicit VR Little Endian).

    The stored values are ``array`` itself (rounded), so ``MONOCHROME1`` and ``MONOCHROME2`` files
    made from the same array display inverted relative to each other. UIDs are derived from the
    content (the same call gives the same bytes); patient attributes are anonymous placeholders.
    :func:`write_synthetic_dicom` writes these bytes to a file.

    Args:
        array: ``(H, W)`` (or ``(frames, H, W)``) for ``MONOCHROME1``/``MONOCHROME2``; ``(H, W, 3)``
            RGB values for ``RGB`` and ``YBR_FULL`` (converted to YBR on write).
        photometric: ``MONOCHROME1``, ``MONOCHROME2``, ``RGB`` or ``YBR_FULL``.
        bits: bits stored (1..16; 8 for colour); 8 bits allocated up to 8, else 16.
        window: ``(centre, width)`` written as WindowCenter/WindowWidth.
        signed: two's complement pixels (PixelRepresentation 1).
        rescale: ``(slope, intercept)`` written as RescaleSlope/RescaleIntercept.
        patient_name: PatientName (placeholder by default).
        patient_id: PatientID (placeholder by default).
        modality: Modality, e.g. ``"DX"``, ``"XC"``, ``"OT"``.
        extra: further attributes by keyword, e.g. ``{"StudyDate": "20000101"}``.
        presentation_lut_shape: ``"IDENTITY"`` or ``"INVERSE"`` written as PresentationLUTShape.

    Returns:
        The DICOM file's bytes (preamble and file meta included).

    Raises:
        ValueError: for an unsupported photometric interpretation, shape, bit depth or value range.
    """
    from pydicom.dataset import Dataset

    photometric = photometric.upper()
    px = _pixel_data(array, photometric, bits, signed)
    # UIDs derive from the content, so the same call writes the same bytes
    salt = (hashlib.sha256(px.data).hexdigest(), photometric, bits, signed, window, rescale, modality)
    sop_uid = _uid("sop", *salt)

    ds = Dataset()
    ds.file_meta = _file_meta(sop_uid)
    ds.SOPClassUID = _SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid("study", *salt)
    ds.SeriesInstanceUID = _uid("series", *salt)
    ds.Modality = modality
    ds.ConversionType = "SYN"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientIdentityRemoved = "YES"
    ds.BurnedInAnnotation = "NO"
    ds.InstanceNumber = 1
    _set_image_pixel_module(ds, px, photometric, bits, signed)
    if window is not None:
        ds.WindowCenter = f"{float(window[0]):g}"
        ds.WindowWidth = f"{float(window[1]):g}"
    if rescale is not None:
        ds.RescaleSlope = f"{float(rescale[0]):g}"
        ds.RescaleIntercept = f"{float(rescale[1]):g}"
    if presentation_lut_shape is not None:
        ds.PresentationLUTShape = presentation_lut_shape
    for keyword, value in (extra or {}).items():  # last, so that callers may override any attribute above
        setattr(ds, keyword, value)
    ds.PixelData = px.data

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_synthetic_dicom(path: str | os.PathLike[str], array: np.ndarray, *args: Any, **options: Any) -> Path:
    """Write a synthetic Secondary Capture DICOM file (Explicit VR Little Endian), atomically.

    Args:
        path: output file.
        array: the pixel values, as for :func:`synthetic_dicom_bytes`.
        *args: ``photometric``, ``bits``, ``window``, ``signed`` by position, as for
            :func:`synthetic_dicom_bytes`.
        **options: the same options as :func:`synthetic_dicom_bytes` (``photometric``, ``bits``,
            ``window``, ``signed``, ``rescale``, ``patient_name``, ``patient_id``, ``modality``,
            ``extra``, ``presentation_lut_shape``).

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: for an unsupported photometric interpretation, shape, bit depth or value range.
        TypeError: for an unknown option.
    """
    return atomic_write_bytes(path, synthetic_dicom_bytes(array, *args, **options))


# --------------------------------------------------------------------------------------------------
# Synthetic sample images
# --------------------------------------------------------------------------------------------------
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in [-1, 1] (x to the right, y downwards), aspect preserved on the short side."""
    s = min(h, w) / 2.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return (xx - (w - 1) / 2.0) / s, (yy - (h - 1) / 2.0) / s


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Band-limited noise, roughly unit variance, by bicubic upsampling of a coarse grid."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BICUBIC), dtype=np.float64)


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (``d < 0``), 0 outside, with a logistic edge of width ``edge``."""
    return 1.0 / (1.0 + np.exp(np.clip(d / edge, -50, 50)))


def _blend(img: np.ndarray, colour: Any, alpha: np.ndarray) -> np.ndarray:
    return img * (1 - alpha[..., None]) + np.asarray(colour, dtype=np.float64) * alpha[..., None]


def _derm_image(seed: int, h: int, w: int) -> np.ndarray:
    """Skin-toned background with an irregular, brown, darker-centred lesion; uint8 RGB."""
    rng = np.random.default_rng(seed)
    x, y = _grid(h, w)
    skin = np.array([226.0, 178.0, 148.0]) + rng.uniform(-12, 12, 3)
    img = np.ones((h, w, 3)) * skin + _smooth_noise(rng, h, w, 6)[..., None] * 6.0
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    r = np.hypot(x - cx, y - cy)
    theta = np.arctan2(y - cy, x - cx)
    radius = np.full_like(r, rng.uniform(0.45, 0.6))
    for k in range(2, 7):
        radius *= 1 + rng.uniform(0.02, 0.09) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    lesion = _soft(r - radius, 0.03)
    core = _soft(r - 0.5 * radius, 0.08)
    brown = np.array([128.0, 82.0, 55.0]) + rng.uniform(-15, 10, 3)
    img = _blend(img, brown, lesion * 0.95)
    img = _blend(img, brown * 0.55, core * lesion * 0.7)
    # pigment network: a faint dark mesh inside the lesion
    f = rng.uniform(22, 30)
    mesh = (np.sin(f * x + 2 * _smooth_noise(rng, h, w, 5)) * np.sin(f * y)) > 0.55
    img = _blend(img, brown * 0.4, mesh * lesion * 0.35)
    # dots / globules
    for _ in range(int(rng.integers(4, 9))):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.8)
        gx, gy = cx + d * 0.5 * np.cos(a), cy + d * 0.5 * np.sin(a)
        img = _blend(img, brown * 0.35, _soft(np.hypot(x - gx, y - gy) - rng.uniform(0.02, 0.04), 0.01) * 0.8)
    # dark corners of the dermoscope's circular field
    img = _blend(img, [10.0, 8.0, 8.0], 1 - _soft(np.hypot(x, y * h / w if w > h else y) - 1.35, 0.05))
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _blood_image(seed: int, size: int, nucleus: str) -> np.ndarray:
    """Pale background, pink red cells, one white cell with a purple nucleus; uint8 RGB.

    ``nucleus``: ``"segmented"`` (3-4 lobes), ``"round"`` or ``"bilobed"`` (with orange granules).
    """
    rng = np.random.default_rng(seed)
    x, y = _grid(size, size)
    img = np.ones((size, size, 3)) * np.array([238.0, 228.0, 230.0]) + _smooth_noise(rng, size, size, 5)[..., None] * 3
    rbc = np.array([228.0, 152.0, 162.0])
    for _ in range(int(rng.integers(5, 9))):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.72, 1.15)
        px, py, pr = d * np.cos(a), d * np.sin(a), rng.uniform(0.2, 0.27)
        rr = np.hypot(x - px, y - py)
        img = _blend(img, rbc, _soft(rr - pr, 0.015))
        img = _blend(img, [240.0, 200.0, 205.0], _soft(rr - 0.45 * pr, 0.04) * 0.6)  # central pallor
    cyto = _soft(np.hypot(x, y) - rng.uniform(0.55, 0.62), 0.015)
    img = _blend(img, [214.0, 186.0, 218.0], cyto)
    if nucleus == "bilobed":
        gx, gy = rng.uniform(-0.55, 0.55, (2, 160))
        keep = np.hypot(gx, gy) < 0.52
        for px, py in zip(gx[keep], gy[keep]):
            img = _blend(img, [222.0, 118.0, 82.0], _soft(np.hypot(x - px, y - py) - 0.035, 0.008) * 0.85)
    nuc = np.zeros_like(x)
    if nucleus == "round":
        nuc = _soft(np.hypot(x - 0.05, y + 0.03) - 0.44, 0.02)
    else:
        n = 2 if nucleus == "bilobed" else int(rng.integers(3, 5))
        start = rng.uniform(0, 2 * np.pi)
        span = 1.6 if n == 2 else 2.6
        prev = None
        for i in range(n):
            a = start + span * (i / max(n - 1, 1) - 0.5)
            px, py = 0.3 * np.cos(a), 0.3 * np.sin(a)
            lobe_r = 0.2 if n == 2 else rng.uniform(0.13, 0.17)
            nuc = np.maximum(nuc, _soft(np.hypot(x - px, y - py) - lobe_r, 0.015))
            if prev is not None:  # thin chromatin strand between lobes
                t = np.clip(
                    ((x - prev[0]) * (px - prev[0]) + (y - prev[1]) * (py - prev[1]))
                    / ((px - prev[0]) ** 2 + (py - prev[1]) ** 2),
                    0,
                    1,
                )
                dist = np.hypot(x - prev[0] - t * (px - prev[0]), y - prev[1] - t * (py - prev[1]))
                nuc = np.maximum(nuc, _soft(dist - 0.035, 0.01))
            prev = (px, py)
    purple = np.array([98.0, 48.0, 138.0]) + _smooth_noise(rng, size, size, 12)[..., None] * np.array([10.0, 8.0, 12.0])
    img = img * (1 - nuc[..., None]) + purple * nuc[..., None]
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _cxr_image(seed: int, h: int, w: int) -> np.ndarray:
    """Frontal chest radiograph look-alike in [0, 1] (bone bright, lungs dark), float64."""
    rng = np.random.default_rng(seed)
    x, y = _grid(h, w)
    x = x * (1 + rng.uniform(-0.04, 0.04))
    img = np.full_like(x, 0.06)  # air around the body
    shoulders = np.clip(-0.75 - y, 0, None)
    body = _soft(np.abs(x) - (0.93 - 0.6 * shoulders), 0.05)
    img = img + body * (0.46 + 0.04 * _smooth_noise(rng, h, w, 4))
    lungs = np.zeros_like(x)
    for side in (-1, 1):
        lx, ly, ax, ay = side * rng.uniform(0.42, 0.46), rng.uniform(-0.06, 0.02), rng.uniform(0.27, 0.31), 0.62
        taper = 0.55 + 0.45 * np.clip((y - ly + ay) / (1.2 * ay), 0, 1)  # narrow apex, wide base
        lungs = np.maximum(lungs, _soft(np.hypot((x - lx) / (ax * taper), (y - ly) / ay) - 1, 0.07))
    # the heart shadow overlaps the lower lung on the patient's left (image right)
    heart = _soft(np.hypot((x - 0.14) / 0.32, (y - 0.33) / 0.27) - 1, 0.12)
    lungs = lungs * (1 - 0.75 * heart)
    lung_tone = 0.13 + 0.08 * (y + 1) / 2 + 0.02 * _smooth_noise(rng, h, w, 9)
    img = img * (1 - lungs) + lung_tone * lungs
    # posterior ribs: thin curved bands that drop towards the sides
    period = rng.uniform(0.15, 0.18)
    phase = ((y - 0.3 * np.abs(x) + 0.25 * x**2 + rng.uniform(0, period)) / period) % 1.0
    ribs = _soft(np.abs(phase - 0.5) - 0.1, 0.035)
    img = img + 0.1 * ribs * np.clip(lungs * 1.3, 0, 1)
    # mediastinum and spine, clavicles, diaphragm
    img = np.maximum(img, 0.7 * _soft(np.abs(x) - 0.12 - 0.03 * (y + 1), 0.05) * body)
    for side in (-1, 1):
        clav = np.abs(y + 0.7 - 0.15 * (side * x - 0.3) ** 2)
        img = np.maximum(img, 0.66 * _soft(clav - 0.03, 0.015) * _soft(np.abs(x - side * 0.4) - 0.32, 0.04))
    dome = 0.6 + 0.09 * np.cos(np.pi * x * 1.1) - 0.05 * (x < 0)
    img = np.maximum(img, 0.6 * _soft(dome - y, 0.04) * body)
    img = img + 0.008 * rng.standard_normal(img.shape)
    return np.clip(img, 0.0, 1.0)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92, subsampling=0)
    return buf.getvalue()


def _nifti_gz_bytes(arr: np.ndarray) -> bytes:
    import nibabel as nib

    raw = nib.Nifti1Image(arr, np.eye(4)).to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0)


def _derm_samples() -> list[tuple[str, Callable[[], bytes]]]:
    return [
        ("sample_derm_01.png", lambda: _png_bytes(_derm_image(101, 144, 192))),
        ("sample_derm_02.jpg", lambda: _jpeg_bytes(_derm_image(102, 160, 160))),
        ("sample_derm_03.png", lambda: _png_bytes(_derm_image(103, 128, 176))),
        ("sample_derm_04.dcm", lambda: synthetic_dicom_bytes(_derm_image(104, 144, 144), "RGB", bits=8, modality="XC")),
    ]


def _blood_samples() -> list[tuple[str, Callable[[], bytes]]]:
    return [
        ("sample_blood_01.png", lambda: _png_bytes(_blood_image(201, 128, "segmented"))),
        ("sample_blood_02.jpg", lambda: _jpeg_bytes(_blood_image(202, 128, "round"))),
        ("sample_blood_03.png", lambda: _png_bytes(_blood_image(203, 128, "bilobed"))),
        ("sample_blood_04.dcm", lambda: synthetic_dicom_bytes(_blood_image(204, 112, "segmented"), "YBR_FULL", bits=8)),
    ]


def _cxr_samples() -> list[tuple[str, Callable[[], bytes]]]:
    def mono1() -> bytes:
        # 16-bit MONOCHROME1 (CR/DX style): stored values high where the display is dark
        img = _cxr_image(302, 160, 144)
        return synthetic_dicom_bytes(np.rint((1.0 - img) * 60000 + 2000), "MONOCHROME1", bits=16, modality="DX")

    def mono2() -> bytes:
        # 12-bit MONOCHROME2 with a window that covers the image range
        img = _cxr_image(303, 144, 160)
        return synthetic_dicom_bytes(
            np.rint(img * 3800 + 100), "MONOCHROME2", bits=12, window=(2048, 4096), modality="DX"
        )

    return [
        ("sample_cxr_01.png", lambda: _png_bytes(np.rint(_cxr_image(301, 160, 160) * 255).astype(np.uint8))),
        ("sample_cxr_02_mono1.dcm", mono1),
        ("sample_cxr_03_mono2.dcm", mono2),
        ("sample_cxr_04.nii.gz", lambda: _nifti_gz_bytes(np.rint(_cxr_image(304, 152, 152) * 4000).astype(np.int16))),
    ]


_SAMPLES: dict[str, Callable[[], list[tuple[str, Callable[[], bytes]]]]] = {
    "dermoscopy": _derm_samples,
    "cxr": _cxr_samples,
    "blood": _blood_samples,
}


def is_sample_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a file written by :func:`make_sample_inputs` (by its ``sample_`` prefix)."""
    return Path(path).name.startswith(_SAMPLE_PREFIX)


def make_sample_inputs(modality: str, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write a few small, deterministic synthetic images for ``modality`` into ``out_dir``.

    * ``"dermoscopy"``: three PNG/JPEG lesions on skin and one RGB DICOM.
    * ``"cxr"``: an 8-bit PNG, a 16-bit ``MONOCHROME1`` DICOM, a 12-bit windowed ``MONOCHROME2``
      DICOM and a 2D NIfTI (``.nii.gz``).
    * ``"blood"``: three PNG/JPEG white cells among red cells and one ``YBR_FULL`` DICOM.

    File names start with ``sample_``. Files that already hold the expected bytes are left alone,
    others are (re)written atomically.

    Args:
        modality: ``"dermoscopy"``, ``"cxr"`` or ``"blood"``.
        out_dir: output folder (created if needed).

    Returns:
        The file paths, in a fixed order.

    Raises:
        ValueError: for an unknown modality.
    """
    key = str(modality).strip().lower()
    if key not in _SAMPLES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {list(SAMPLE_MODALITIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, make in _SAMPLES[key]():
        target = out / name
        data = make()
        if not (target.is_file() and target.read_bytes() == data):
            atomic_write_bytes(target, data)
        paths.append(target)
    return paths
