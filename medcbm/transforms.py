# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Reading clinical images and turning them into encoder inputs.

:func:`read_image` reads one 2D image (DICOM, NIfTI, PNG, JPEG, BMP, TIFF) into a float32 array of
shape ``(H, W, C)`` with ``C`` in {1, 3} and values in ``[0, 1]``. Rows are the image rows as an
image viewer (PIL) shows them: nothing is transposed, and EXIF orientation tags are not applied.
Every failure raises :class:`ImageReadError`, which names the file and gives a short reason; DICOM
header values (patient name, identifiers, dates, ...) never appear in these messages.

The MONAI-style transforms come in array/dictionary pairs:

.. code-block:: python

    from medcbm.transforms import ClinicalImagePipeline

    pipeline = ClinicalImagePipeline("grey", 224, mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276))
    x = pipeline("scan.dcm")          # torch.float32, shape (3, 224, 224)
    key = pipeline.fingerprint()      # sha256 of the preprocessing parameters, for caches

Note:
    MONAI's ``Compose``/``apply_transform`` re-raises any error as ``RuntimeError("applying transform
    ...")``; the :class:`ImageReadError` is then its ``__cause__``. :class:`ClinicalImagePipeline`
    calls its steps directly so that callers can catch :class:`ImageReadError` itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import NibabelReader, PILReader
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

__all__ = [
    "SUPPORTED_SUFFIXES",
    "CHANNEL_MODES",
    "FileReasonError",
    "ImageReadError",
    "supported_suffix",
    "read_image",
    "LoadClinicalImage",
    "LoadClinicalImaged",
    "ToModalityChannels",
    "ToModalityChannelsd",
    "EncoderInput",
    "EncoderInputd",
    "preprocessing_fingerprint",
    "ClinicalImagePipeline",
]

SUPPORTED_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CHANNEL_MODES = ("rgb", "grey")

# Bump when the meaning of the arrays produced by ``read_image`` changes (invalidates caches).
_READER_VERSION = 1
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
# ITU-R BT.601 luma weights, as used by PIL's ``convert("L")``.
_LUMA = (0.299, 0.587, 0.114)
# PIL modes whose arrays ``_pil_to_array`` understands without conversion.
_PIL_NATIVE_MODES = ("L", "LA", "I", "F", "RGB", "RGBA")
_MAX_REASON = 160


class FileReasonError(ValueError):
    """A file or folder could not be used; ``str()`` is ``"<path>: <reason>"``.

    Attributes:
        path: the file, as the caller named it (a string).
        reason: a short, human-readable reason (never contains DICOM header values).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:  # keep both attributes through pickling (worker processes)
        return (type(self), (self.path, self.reason))


class ImageReadError(FileReasonError):
    """An image could not be read."""


def supported_suffix(path: str | os.PathLike[str]) -> str | None:
    """The supported suffix of ``path`` in lower case (``".nii.gz"`` counts as one), or ``None``."""
    name = os.fspath(path).lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def _short(exc: BaseException) -> str:
    """A short description of a (non-DICOM) library exception for an error reason."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _min_max(arr: np.ndarray) -> np.ndarray:
    """Scale finite values to ``[0, 1]``; non-finite values become 0; a constant image becomes 0."""
    arr = arr.astype(np.float64, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        if not finite.any():
            raise ValueError("image has no finite pixel values")
        arr = np.where(finite, arr, np.nan)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = np.nan_to_num(arr, nan=lo)
    else:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float64)
    return (arr - lo) / (hi - lo)


def _finish(arr: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` in [0, 1] -> contiguous float32 ``(H, W, C)``, clipped."""
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# PNG / JPEG / BMP / TIFF (MONAI PILReader)
# --------------------------------------------------------------------------------------------------
class _MultiFrameError(Exception):
    pass


def _pil_converter(img: Any) -> Any:
    """Bring a freshly opened PIL image to one of ``_PIL_NATIVE_MODES`` (or ``I;16*``)."""
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1:
        raise _MultiFrameError(frames)
    mode = img.mode
    if mode in _PIL_NATIVE_MODES or mode.startswith("I;16"):
        img.load()  # decode now, so that a truncated file fails here
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        return img.convert("RGBA" if (mode == "PA" or "transparency" in img.info) else "RGB")
    if mode == "La":
        return img.convert("LA")
    if mode in ("RGBa", "RGBX"):
        return img.convert("RGBA" if mode == "RGBa" else "RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...


def _pil_to_unit(arr: np.ndarray, mode: str) -> np.ndarray:
    """Array from a PIL image in a native mode -> float ``(H, W[, C])`` in [0, 1], alpha dropped."""
    if arr.ndim == 3:
        arr = arr[..., :1] if arr.shape[-1] == 2 else arr[..., :3]  # LA -> L, RGBA -> RGB
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # I;16 variants
        return arr.astype(np.float64) / 65535.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if mode == "I" or arr.dtype.kind in "iu":
        # 32-bit integer images: 16-bit data (the usual case) keeps its full-range scale.
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.float64) / 65535.0
        return _min_max(arr)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if finite.all() and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            return arr.astype(np.float64)
        return _min_max(arr)
    raise ValueError(f"unsupported pixel type {arr.dtype}")


def _read_pil(path: str) -> np.ndarray:
    reader = PILReader(converter=_pil_converter, reverse_indexing=False)
    img = None
    try:
        img = reader.read(path)
        mode = img.mode
        data, _ = reader.get_data(img)
    except _MultiFrameError as e:
        raise ImageReadError(path, f"multi-frame image with {e.args[0]} frames is not supported: pass a 2D image")
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(path, "image is too large to load into memory") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        if type(e).__name__ == "UnidentifiedImageError":
            raise ImageReadError(path, "not a valid image file (unrecognised or corrupt header)") from None
        if type(e).__name__ == "DecompressionBombError":
            raise ImageReadError(path, f"image is too large ({_short(e)})") from None
        raise ImageReadError(path, f"corrupt or truncated image data ({_short(e)})") from None
    finally:
        if img is not None:
            try:
                img.close()
            except Exception:  # pragma: no cover - best effort
                pass
    arr = np.asarray(data)
    if arr.size == 0 or arr.ndim < 2:
        raise ImageReadError(path, "empty image")
    try:
        return _finish(_pil_to_unit(arr, mode))
    except ValueError as e:
        raise ImageReadError(path, str(e)) from None


# --------------------------------------------------------------------------------------------------
# NIfTI (MONAI NibabelReader)
# --------------------------------------------------------------------------------------------------
def _read_nifti(path: str) -> np.ndarray:
    reader = NibabelReader()
    try:
        img = reader.read(path)
        data, _ = reader.get_data(img)
        arr = np.asarray(data)
    except MemoryError:
        raise ImageReadError(path, "image is too large to load into memory") from None
    except Exception as e:  # nibabel ImageFileError, gzip/zlib errors, EOFError, ...
        raise ImageReadError(path, f"not a valid NIfTI file ({_short(e)})") from None
    if arr.dtype.kind not in "biuf":
        raise ImageReadError(path, f"unsupported NIfTI data type {arr.dtype}")
    if arr.size == 0:
        raise ImageReadError(path, "empty image")
    shape = tuple(int(s) for s in arr.shape)
    squeezed = arr.squeeze() if arr.ndim > 2 else arr
    if squeezed.ndim != 2:
        dims = f"{arr.ndim}D volume" if arr.ndim >= 3 else f"{arr.ndim}D array"
        raise ImageReadError(path, f"{dims} with shape {shape} is not supported: pass a 2D image")
    try:
        return _finish(_min_max(squeezed))
    except ValueError as e:
        raise ImageReadError(path, str(e)) from None


# --------------------------------------------------------------------------------------------------
# DICOM (pydicom)
# --------------------------------------------------------------------------------------------------
def _dicom_decode_reason(exc: BaseException, ds: Any) -> str:
    """A reason for a pixel-data decoding failure built from the exception *type* and technical
    attributes only: pydicom messages are not echoed because they may quote element values."""
    text = str(exc).lower()
    if "length of the pixel data" in text or ("expected" in text and "bytes" in text) or "truncat" in text:
        return "pixel data is truncated or does not match the image size in the header"
    if "unable to decode" in text or "no pixel data decoders" in text or "plugin" in text or "handler" in text:
        try:
            syntax = ds.file_meta.TransferSyntaxUID.name
        except Exception:
            syntax = "unknown transfer syntax"
        return f"cannot decode compressed pixel data ({syntax}): install a pydicom decoder plugin"
    return f"pixel data could not be decoded ({type(exc).__name__})"


def _voi_range(ds: Any, used_lut: bool) -> tuple[float, float] | None:
    """The output range of ``apply_voi_lut`` (DICOM PS3.3 C.11.2), or ``None`` when unknown."""
    try:
        if used_lut:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            return 0.0, float(2**bits - 1)
        if ds.get("ModalityLUTSequence"):
            bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
            y_min, y_max = 0.0, float(2**bits - 1)
        elif int(ds.get("PixelRepresentation", 0)) == 0:
            y_min, y_max = 0.0, float(2 ** int(ds.BitsStored) - 1)
        else:
            y_min, y_max = -float(2 ** (int(ds.BitsStored) - 1)), float(2 ** (int(ds.BitsStored) - 1) - 1)
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
        return (min(y_min, y_max), max(y_min, y_max))
    except Exception:
        return None


def _dicom_grey(arr: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = apply_modality_lut(arr, ds)
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    out: np.ndarray | None = None
    if has_lut or has_window:
        try:
            voi = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
            rng = _voi_range(ds, used_lut=has_lut)
            if rng is not None and rng[1] > rng[0]:
                scaled = (voi.astype(np.float64) - rng[0]) / (rng[1] - rng[0])
                # a header whose declared LUT depth does not match its data: fall back to min-max
                out = scaled if (scaled.min() >= -0.01 and scaled.max() <= 1.01) else _min_max(voi)
            else:
                out = _min_max(voi)
        except Exception:  # invalid window (e.g. width < 1), malformed LUT: ignore the VOI step
            out = None
    if out is None:
        out = _min_max(arr)
    out = np.clip(out, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: low values are bright; make bone bright
    return out


def _read_dicom(path: str) -> np.ndarray:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise ImageReadError(path, "reading DICOM needs pydicom: pip install pydicom") from None

    # pydicom warnings can quote element values: keep them out of the logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            try:  # DICOM without the 128-byte preamble and 'DICM' prefix
                ds = pydicom.dcmread(path, force=True)
            except Exception:
                raise ImageReadError(path, "not a valid DICOM file") from None
            if "Rows" not in ds and "PixelData" not in ds:
                raise ImageReadError(path, "not a valid DICOM file") from None
        except MemoryError:
            raise ImageReadError(path, "file is too large to load into memory") from None
        except Exception as e:
            raise ImageReadError(path, f"not a valid or truncated DICOM file ({type(e).__name__})") from None

        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise ImageReadError(path, "DICOM file has no pixel data")
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        except Exception:
            raise ImageReadError(path, "DICOM image attributes are invalid") from None
        if frames > 1:
            raise ImageReadError(path, f"multi-frame DICOM with {frames} frames is not supported: pass a 2D image")
        if rows <= 0 or cols <= 0:
            raise ImageReadError(path, "empty image (zero rows or columns)")
        try:
            arr = ds.pixel_array  # pydicom 3 converts YBR_* colour to RGB
        except MemoryError:
            raise ImageReadError(path, "image is too large to load into memory") from None
        except Exception as e:
            raise ImageReadError(path, _dicom_decode_reason(e, ds)) from None
        arr = np.asarray(arr)
        if arr.size == 0:
            raise ImageReadError(path, "empty image")

        try:
            if photometric in ("MONOCHROME1", "MONOCHROME2") or (samples == 1 and photometric != "PALETTE COLOR"):
                if arr.ndim != 2:
                    raise ImageReadError(path, f"unexpected greyscale pixel array with {arr.ndim} dimensions")
                out = _dicom_grey(arr, ds, photometric)
            elif photometric == "PALETTE COLOR":
                from pydicom.pixels import apply_color_lut

                rgb = apply_color_lut(arr, ds)
                out = rgb.astype(np.float64) / float(np.iinfo(rgb.dtype).max if rgb.dtype.kind == "u" else 1.0)
            elif samples == 3 and arr.ndim == 3 and arr.shape[-1] == 3:
                # RGB, or YBR_* already converted to RGB by pydicom
                bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize) or 8)
                out = arr.astype(np.float64) / float(2**bits - 1)
            else:
                raise ImageReadError(path, f"unsupported DICOM photometric interpretation {photometric or '(missing)'}")
        except ImageReadError:
            raise
        except MemoryError:
            raise ImageReadError(path, "image is too large to load into memory") from None
        except Exception as e:
            raise ImageReadError(path, f"could not convert DICOM pixel values ({type(e).__name__})") from None
    return _finish(out)


# --------------------------------------------------------------------------------------------------
# Public reader
# --------------------------------------------------------------------------------------------------
def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one 2D clinical image.

    * PNG, JPEG, BMP, TIFF: ``monai.data.PILReader(reverse_indexing=False)``. Modes ``L``, ``LA``,
      ``I;16``, ``I``, ``F``, ``P``, ``RGB``, ``RGBA`` (and others via RGB) are handled; alpha is
      dropped; 8-bit data is divided by 255 and 16-bit data by 65535. EXIF orientation is not applied.
    * NIfTI: ``monai.data.NibabelReader``; 2D, or 3D with a singleton axis; the array is taken as
      stored (``data[i, j]`` is row ``i``, column ``j``) and min-max scaled.
    * DICOM: ``pydicom.dcmread``; modality LUT (rescale), then VOI LUT or window centre/width when
      present, ``MONOCHROME1`` inverted so that bone is bright; 8 to 16 bit, signed or unsigned,
      RGB/YBR colour; single frame only.

    Args:
        path: the image file.

    Returns:
        float32 array of shape ``(H, W, C)``, ``C`` in {1, 3}, values in ``[0, 1]``.

    Raises:
        ImageReadError: for a missing file, an unsupported suffix, a corrupt or truncated file,
            missing pixel data, an empty image, or a volume/multi-frame file.
    """
    name = os.fspath(path)
    suffix = supported_suffix(name)
    if suffix is None:
        ext = "".join(Path(name).suffixes[-2:]) or "(none)"
        raise ImageReadError(name, f"unsupported file type '{ext}' (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if not os.path.exists(name):
        raise ImageReadError(name, "file not found")
    if os.path.isdir(name):
        raise ImageReadError(name, "is a directory, not an image file")
    try:
        size = os.path.getsize(name)
        with open(name, "rb"):
            pass
    except OSError as e:
        raise ImageReadError(name, f"cannot open file ({e.strerror or type(e).__name__})") from None
    if size == 0:
        raise ImageReadError(name, "file is empty")
    if suffix == ".dcm":
        return _read_dicom(name)
    if suffix in _NIFTI_SUFFIXES:
        return _read_nifti(name)
    return _read_pil(name)


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------
def _as_chw_tensor(img: Any) -> torch.Tensor:
    t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
    if t.ndim != 3:
        raise ValueError(f"expected a channel-first image of shape (C, H, W), got shape {tuple(t.shape)}")
    return t.float()


class LoadClinicalImage(Transform):
    """Load an image file as a float tensor of shape ``(C, H, W)``, ``C`` in {1, 3}, values in [0, 1].

    Wraps :func:`read_image`; raises :class:`ImageReadError` on failure.
    """

    backend = [TransformBackends.TORCH]

    def __call__(self, path: str | os.PathLike[str]) -> torch.Tensor:  # type: ignore[override]
        """Read ``path``; see :func:`read_image`."""
        arr = read_image(path)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def fingerprint(self) -> dict[str, Any]:
        """Stable description of this step (changes when the reader semantics change)."""
        return {"transform": "LoadClinicalImage", "reader_version": _READER_VERSION, "range": [0.0, 1.0]}


class LoadClinicalImaged(MapTransform):
    """Dictionary version of :class:`LoadClinicalImage`: replaces each path under ``keys`` by a tensor."""

    backend = LoadClinicalImage.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadClinicalImage()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:  # type: ignore[override]
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d

    def fingerprint(self) -> dict[str, Any]:
        """Stable description of this step."""
        return {**self.loader.fingerprint(), "transform": "LoadClinicalImaged"}


class ToModalityChannels(Transform):
    """Make a ``(C, H, W)`` image (``C`` in {1, 3}) a 3-channel encoder input.

    Args:
        mode: ``"rgb"`` keeps colour (a grey image is replicated to 3 channels); ``"grey"`` converts to
            luminance (ITU-R BT.601 weights) and replicates it to 3 identical channels, as X-ray
            encoders expect.

    Raises:
        ValueError: for an unknown ``mode`` or an image with another number of channels.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, mode: str = "rgb") -> None:
        mode = str(mode).lower()
        if mode == "gray":
            mode = "grey"
        if mode not in CHANNEL_MODES:
            raise ValueError(f"channel mode {mode!r} must be one of {list(CHANNEL_MODES)}")
        self.mode = mode

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:  # type: ignore[override]
        """Return a float tensor of shape ``(3, H, W)``."""
        t = _as_chw_tensor(img)
        c = t.shape[0]
        if c not in (1, 3):
            raise ValueError(f"expected 1 or 3 channels, got {c}")
        if self.mode == "grey" and c == 3:
            w = torch.tensor(_LUMA, dtype=t.dtype, device=t.device).view(3, 1, 1)
            t = (t * w).sum(dim=0, keepdim=True)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return t.contiguous()

    def fingerprint(self) -> dict[str, Any]:
        """Stable description of this step."""
        return {"transform": "ToModalityChannels", "mode": self.mode, "luma": list(_LUMA), "channels": 3}


class ToModalityChannelsd(MapTransform):
    """Dictionary version of :class:`ToModalityChannels`."""

    backend = ToModalityChannels.backend

    def __init__(self, keys: KeysCollection, mode: str = "rgb", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = ToModalityChannels(mode)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:  # type: ignore[override]
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d

    def fingerprint(self) -> dict[str, Any]:
        """Stable description of this step."""
        return {**self.converter.fingerprint(), "transform": "ToModalityChannelsd"}


class EncoderInput(Transform):
    """Resize, centre-crop and normalise a ``(C, H, W)`` image for an image encoder.

    The shortest side is resized to ``image_size`` (bicubic with antialiasing; the long side becomes
    ``int(image_size * long / short)`` as in torchvision), the centre ``image_size x image_size``
    square is cropped, values are clamped to [0, 1] (bicubic overshoot), then
    ``(x - mean[c]) / std[c]`` is applied per channel.

    Args:
        image_size: output side length in pixels.
        mean: per-channel mean (one value per channel, or a single value for all).
        std: per-channel standard deviation, all > 0 (same length as ``mean``).

    Raises:
        ValueError: for a non-positive ``image_size``, mismatched or non-positive ``std`` values.

    .. code-block:: python

        enc = EncoderInput(224, mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276))
        x = enc(torch.rand(3, 300, 400))  # (3, 224, 224)
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if isinstance(image_size, bool) or int(image_size) != image_size or int(image_size) < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        mean_t = tuple(float(m) for m in mean)
        std_t = tuple(float(s) for s in std)
        if not mean_t or len(mean_t) != len(std_t):
            raise ValueError(f"mean and std must be non-empty and of equal length, got {mean_t} and {std_t}")
        if any(not math.isfinite(m) for m in mean_t) or any(not (math.isfinite(s) and s > 0) for s in std_t):
            raise ValueError(f"mean must be finite and std finite and > 0, got {mean_t} and {std_t}")
        self.image_size = int(image_size)
        self.mean = mean_t
        self.std = std_t

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:  # type: ignore[override]
        """Return a float tensor of shape ``(C, image_size, image_size)``."""
        t = _as_chw_tensor(img)
        c, h, w = t.shape
        if h < 1 or w < 1:
            raise ValueError(f"empty image of shape {tuple(t.shape)}")
        if len(self.mean) not in (1, c):
            raise ValueError(f"mean/std have {len(self.mean)} values but the image has {c} channels")
        s = self.image_size
        if h <= w:
            nh, nw = s, int(s * w / h)
        else:
            nh, nw = int(s * h / w), s
        if (nh, nw) != (h, w):
            t = F.interpolate(t[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        t = t[:, top : top + s, left : left + s].clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=t.dtype, device=t.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=t.dtype, device=t.device).view(-1, 1, 1)
        return ((t - mean) / std).contiguous()

    def fingerprint(self) -> dict[str, Any]:
        """Stable description of this step."""
        return {
            "transform": "EncoderInput",
            "image_size": self.image_size,
            "resize": "shortest_side",
            "interpolation": "bicubic",
            "antialias": True,
            "crop": "center",
            "clamp": [0.0, 1.0],
            "mean": list(self.mean),
            "std": list(self.std),
        }


class EncoderInputd(MapTransform):
    """Dictionary version of :class:`EncoderInput`."""

    backend = EncoderInput.backend

    def __init__(
        self,
        keys: KeysCollection,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.encoder_input = EncoderInput(image_size, mean, std)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:  # type: ignore[override]
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.encoder_input(d[key])
        return d

    def fingerprint(self) -> dict[str, Any]:
        """Stable description of this step."""
        return {**self.encoder_input.fingerprint(), "transform": "EncoderInputd"}


def _canonical_sha256(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def preprocessing_fingerprint(channel_mode: str, image_size: int, mean: Sequence[float], std: Sequence[float]) -> str:
    """sha256 (hex) of the canonical JSON of the full preprocessing (reader, channels, encoder input).

    Features cached under one fingerprint are stale for any other; the value changes with every
    parameter and with the reader version.

    Args:
        channel_mode: ``"rgb"`` or ``"grey"``.
        image_size: encoder input side length.
        mean: per-channel mean.
        std: per-channel standard deviation.

    Returns:
        64 hexadecimal characters.
    """
    steps = [
        LoadClinicalImage().fingerprint(),
        ToModalityChannels(channel_mode).fingerprint(),
        EncoderInput(image_size, mean, std).fingerprint(),
    ]
    return _canonical_sha256({"medcbm_preprocessing": 1, "steps": steps})


class ClinicalImagePipeline:
    """Path -> ``(3, image_size, image_size)`` normalised float tensor.

    Composes :class:`LoadClinicalImage`, :class:`ToModalityChannels` and :class:`EncoderInput`. The
    steps are called directly (not through ``monai.transforms.Compose``), so an unreadable file
    raises :class:`ImageReadError` itself rather than a wrapping ``RuntimeError``.

    Args:
        channel_mode: ``"rgb"`` or ``"grey"``.
        image_size: output side length.
        mean: per-channel mean.
        std: per-channel standard deviation.
    """

    def __init__(self, channel_mode: str, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.loader = LoadClinicalImage()
        self.channels = ToModalityChannels(channel_mode)
        self.encoder_input = EncoderInput(image_size, mean, std)

    @property
    def transforms(self) -> tuple[Transform, ...]:
        """The steps, in order (e.g. for ``monai.transforms.Compose(pipeline.transforms)``)."""
        return (self.loader, self.channels, self.encoder_input)

    def __call__(self, path: str | os.PathLike[str]) -> torch.Tensor:
        """Read and preprocess ``path``; raises :class:`ImageReadError` if it cannot be read."""
        return self.encoder_input(self.channels(self.loader(path)))

    def fingerprint(self) -> str:
        """Same value as :func:`preprocessing_fingerprint` for these parameters."""
        return preprocessing_fingerprint(
            self.channels.mode, self.encoder_input.image_size, self.encoder_input.mean, self.encoder_input.std
        )

    def __repr__(self) -> str:
        e = self.encoder_input
        return (
            f"ClinicalImagePipeline(channel_mode={self.channels.mode!r}, image_size={e.image_size}, "
            f"mean={list(e.mean)}, std={list(e.std)})"
        )
