# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""MONAI ``ImageReader`` s for 2D clinical images: DICOM, NIfTI and PIL formats (PNG, JPEG, BMP, TIFF).

Each reader returns, from ``get_data``, a float32 array of shape ``(H, W, C)`` with ``C`` in {1, 3}
and values in ``[0, 1]``, plus a small metadata dict (``original_channel_dim = -1``, so
``LoadImage(ensure_channel_first=True)`` gives ``(C, H, W)``). Rows are the image rows as an image
viewer (PIL) shows them: nothing is transposed, and EXIF orientation tags are not applied.

Before any pixel is decoded, ``read`` checks that the path is a regular, non-empty file (a FIFO is
never opened) and that the image size in the header fits the pixel budget: at most
:data:`MAX_IMAGE_SIDE` pixels per side and :data:`MAX_IMAGE_PIXELS` pixels in total (module-level
defaults, read at call time; each reader also takes ``max_side``/``max_pixels``).

Every failure raises :class:`~medcbm.io.errors.ImageReadError` naming the file with a short reason;
DICOM header values (patient name, identifiers, dates, ...) never appear in these messages.

.. code-block:: python

    from monai.transforms import LoadImage
    from medcbm.io.readers import ClinicalDicomReader

    loader = LoadImage(reader=ClinicalDicomReader(), image_only=True, ensure_channel_first=True)
    img = loader("scan.dcm", reader=loader.readers[-1])  # MetaTensor (1, H, W) in [0, 1]

Note:
    ``LoadImage`` tries user-given readers one after another and *swallows* their errors (it then
    raises a generic ``RuntimeError``). Pass the reader at call time, as above (or use
    :class:`medcbm.transforms.LoadClinicalImage`, which does), so that the ``ImageReadError`` itself
    reaches the caller.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monai.data.image_reader import ImageReader
from PIL import Image

from medcbm.io.dicom import dcmread_regular, dicom_decode_reason, dicom_grey
from medcbm.io.errors import ImageReadError
from medcbm.io.files import check_image_file, open_regular_file, supported_suffix

__all__ = [
    "READER_VERSION",
    "MAX_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "PIL_SUFFIXES",
    "NIFTI_SUFFIXES",
    "DICOM_SUFFIXES",
    "check_pixel_budget",
    "ClinicalImageReader",
    "ClinicalPILReader",
    "ClinicalNiftiReader",
    "ClinicalDicomReader",
    "reader_for",
    "read_image",
]

# Bump when the meaning of the arrays produced by the readers changes (invalidates feature caches).
# 2: DICOM without a VOI window maps the stored bit-depth range (no per-image min-max); Presentation LUT.
READER_VERSION = 2
# Pixel budget checked from the header before decoding (both are read at call time: override here).
MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 64 * 1024 * 1024

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm",)

# PIL's own decompression-bomb guard (warning above the limit, error above twice it) backs up the budget.
if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# PIL modes whose arrays ``_pil_to_unit`` understands without conversion.
_PIL_NATIVE_MODES = ("L", "LA", "I", "F", "RGB", "RGBA")
_MAX_REASON = 160


def _short(exc: BaseException) -> str:
    """A short description of a (non-DICOM) library exception for an error reason."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def check_pixel_budget(
    path: str,
    height: int,
    width: int,
    frames: int = 1,
    *,
    max_side: int | None = None,
    max_pixels: int | None = None,
) -> None:
    """Raise unless an image of ``height x width`` (x ``frames``) fits the pixel budget.

    Args:
        path: the file (for the message).
        height: rows from the header.
        width: columns from the header.
        frames: frames (or slices) from the header.
        max_side: largest allowed side; ``None``: :data:`MAX_IMAGE_SIDE`.
        max_pixels: largest allowed ``height * width * frames``; ``None``: :data:`MAX_IMAGE_PIXELS`.

    Raises:
        ImageReadError: a side or the total is over the budget.
    """
    side = MAX_IMAGE_SIDE if max_side is None else int(max_side)
    total_max = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    if max(height, width) > side:
        raise ImageReadError(
            path, f"image is too large: {height} x {width} pixels, a side is over the limit of {side} pixels"
        )
    total = int(height) * int(width) * max(int(frames), 1)
    if total > total_max:
        raise ImageReadError(path, f"image is too large: {total} pixels, over the limit of {total_max} pixels")


def _finish(arr: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` in [0, 1] -> contiguous float32 ``(H, W, C)``, clipped."""
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


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


@dataclass
class _Handle:
    """What ``read`` returns: the checked file and a format-specific, not yet decoded, object."""

    path: str
    obj: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class ClinicalImageReader(ImageReader):
    """Base of the medcbm readers: one 2D image per file, checked before decoding.

    Args:
        max_side: largest allowed image side; ``None``: :data:`MAX_IMAGE_SIDE` at call time.
        max_pixels: largest allowed pixel count; ``None``: :data:`MAX_IMAGE_PIXELS` at call time.
    """

    suffixes: tuple[str, ...] = ()
    name = "clinical"

    def __init__(self, max_side: int | None = None, max_pixels: int | None = None) -> None:
        super().__init__()
        self.max_side = max_side
        self.max_pixels = max_pixels

    def verify_suffix(self, filename: Sequence[Any] | Any) -> bool:
        """Whether every file name has one of this reader's suffixes (case-insensitive)."""
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return bool(names) and all(supported_suffix(n) in self.suffixes for n in names)

    def read(self, data: Sequence[Any] | Any, **kwargs: Any) -> _Handle:
        """Check the file and its header (no pixel is decoded yet).

        Args:
            data: one file name (or a one-element sequence, as ``LoadImage`` passes it).
            kwargs: ignored.

        Raises:
            ImageReadError: not a readable regular file, an invalid header, or over the pixel budget.
        """
        if not isinstance(data, (str, os.PathLike)):
            items = list(data)
            if len(items) != 1:
                raise ImageReadError(", ".join(map(str, items)), "pass one 2D image file at a time")
            data = items[0]
        path = os.fspath(data)
        check_image_file(path)
        return self._read(path)

    def get_data(self, img: _Handle) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode the image.

        Returns:
            float32 ``(H, W, C)`` in [0, 1] and metadata: ``original_channel_dim`` (-1),
            ``spatial_shape``, ``medcbm_reader`` and ``medcbm_reader_version``.

        Raises:
            ImageReadError: the pixel data cannot be decoded or converted.
        """
        arr = self._decode(img)
        meta = {
            "original_channel_dim": -1,
            "spatial_shape": np.asarray(arr.shape[:2]),
            "medcbm_reader": self.name,
            "medcbm_reader_version": READER_VERSION,
            "filename_or_obj": img.path,
        }
        return arr, meta

    def _budget(self, path: str, height: int, width: int, frames: int = 1) -> None:
        check_pixel_budget(path, height, width, frames, max_side=self.max_side, max_pixels=self.max_pixels)

    def _read(self, path: str) -> _Handle:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, img: _Handle) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_side={self.max_side}, max_pixels={self.max_pixels})"


# --------------------------------------------------------------------------------------------------
# PNG / JPEG / BMP / TIFF
# --------------------------------------------------------------------------------------------------
def _pil_convert(img: Any) -> Any:
    """Bring an opened PIL image to one of ``_PIL_NATIVE_MODES`` (or ``I;16*``), decoding it."""
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


class ClinicalPILReader(ClinicalImageReader):
    """PNG, JPEG, BMP and TIFF through PIL.

    Modes ``L``, ``LA``, ``I;16``, ``I``, ``F``, ``P``, ``RGB``, ``RGBA`` (others via RGB); alpha is
    dropped (not blended); 8-bit data is divided by 255 and 16-bit data by 65535; float data already
    in [0, 1] is kept, other float or 32-bit data is min-max scaled. ``Image.open`` only parses the
    header, so the size is checked before any decoding. Multi-frame files are rejected.
    """

    suffixes = PIL_SUFFIXES
    name = "pil"

    def _read(self, path: str) -> _Handle:
        fh = open_regular_file(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fh)
        except Image.DecompressionBombError as e:
            fh.close()
            raise ImageReadError(path, f"image is too large ({_short(e)})") from None
        except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ...
            fh.close()
            if isinstance(e, Image.UnidentifiedImageError):
                raise ImageReadError(path, "not a valid image file (unrecognised or corrupt header)") from None
            raise ImageReadError(path, f"corrupt image header ({_short(e)})") from None
        try:
            width, height = img.size
            self._budget(path, int(height), int(width))
            frames = int(getattr(img, "n_frames", 1) or 1)
            if frames > 1:
                raise ImageReadError(path, f"multi-frame image with {frames} frames is not supported: pass a 2D image")
        except ImageReadError:
            img.close()
            fh.close()
            raise
        except Exception as e:
            img.close()
            fh.close()
            raise ImageReadError(path, f"corrupt image header ({_short(e)})") from None
        return _Handle(path, img, {"file": fh})

    def _decode(self, handle: _Handle) -> np.ndarray:
        path, img = handle.path, handle.obj
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                converted = _pil_convert(img)
            mode = converted.mode
            arr = np.asarray(converted)
        except MemoryError:
            raise ImageReadError(path, "image is too large to load into memory") from None
        except Exception as e:  # OSError (truncated), SyntaxError, ValueError, ...
            raise ImageReadError(path, f"corrupt or truncated image data ({_short(e)})") from None
        finally:
            img.close()
            handle.extra["file"].close()
        if arr.size == 0 or arr.ndim < 2:
            raise ImageReadError(path, "empty image")
        try:
            return _finish(_pil_to_unit(arr, mode))
        except ValueError as e:
            raise ImageReadError(path, str(e)) from None


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------
def _nifti_open(nib: Any, path: str, raw: Any) -> tuple[Any, Any]:
    """A lazily read NIfTI image on the open file ``raw`` (from :func:`open_regular_file`, so bytes already read are
    decoded, not re-read), and the stream it reads (``raw`` or a gzip stream over it)."""
    fh = raw
    if path.lower().endswith(".gz"):
        import gzip

        fh = gzip.GzipFile(fileobj=raw, mode="rb")
    holder = nib.FileHolder(filename=path, fileobj=fh)
    try:
        return nib.Nifti1Image.from_file_map({"header": holder, "image": holder}), fh
    except nib.spatialimages.HeaderDataError:  # a 540-byte NIfTI-2 header
        fh.seek(0)
        return nib.Nifti2Image.from_file_map({"header": holder, "image": holder}), fh


def _close_all(*files: Any) -> None:
    for f in files:
        f.close()


class ClinicalNiftiReader(ClinicalImageReader):
    """2D NIfTI (``.nii``, ``.nii.gz``) through nibabel.

    2D, or 3D/4D with singleton axes; the array is taken as stored (``data[i, j]`` is row ``i``,
    column ``j``, no reorientation) and min-max scaled (NIfTI has no display range). The header
    shape is checked against the pixel budget before the data is read.
    """

    suffixes = NIFTI_SUFFIXES
    name = "nifti"

    def _read(self, path: str) -> _Handle:
        raw = open_regular_file(path)
        try:
            return self._header(path, raw)
        except BaseException:  # the handle owns the file only when the header is accepted
            raw.close()
            raise

    def _header(self, path: str, raw: Any) -> _Handle:
        import nibabel as nib

        try:
            img, stream = _nifti_open(nib, path, raw)  # parses the header; the data is read on decode
            shape = tuple(int(s) for s in img.shape)
        except Exception as e:  # nibabel ImageFileError, gzip/zlib errors, EOFError, ...
            raise ImageReadError(path, f"not a valid NIfTI file ({_short(e)})") from None
        if not shape or 0 in shape:
            raise ImageReadError(path, "empty image")
        plane = [s for s in shape if s != 1]
        if len(shape) < 2 or len(plane) > 2:
            dims = f"{len(shape)}D volume" if len(shape) >= 3 else f"{len(shape)}D array"
            raise ImageReadError(path, f"{dims} with shape {shape} is not supported: pass a 2D image")
        if len(shape) == 2:
            height, width = shape
        else:
            plane = plane + [1] * (2 - len(plane))
            height, width = plane
        self._budget(path, height, width)
        return _Handle(path, img, {"shape": shape, "plane": (height, width), "files": (stream, raw)})

    def _decode(self, handle: _Handle) -> np.ndarray:
        path = handle.path
        try:
            arr = np.asarray(handle.obj.dataobj)
        except MemoryError:
            raise ImageReadError(path, "image is too large to load into memory") from None
        except Exception as e:
            raise ImageReadError(path, f"not a valid NIfTI file ({_short(e)})") from None
        finally:
            _close_all(*handle.extra["files"])
        if arr.dtype.kind not in "biuf":
            raise ImageReadError(path, f"unsupported NIfTI data type {arr.dtype}")
        if arr.size == 0:
            raise ImageReadError(path, "empty image")
        squeezed = arr.reshape(handle.extra["plane"]) if arr.ndim > 2 else arr  # drop the singleton axes
        try:
            return _finish(_min_max(squeezed))
        except ValueError as e:
            raise ImageReadError(path, str(e)) from None


# --------------------------------------------------------------------------------------------------
# DICOM (decoding rules in medcbm.io.dicom)
# --------------------------------------------------------------------------------------------------
class ClinicalDicomReader(ClinicalImageReader):
    """Single-frame DICOM through pydicom.

    Greyscale (MONOCHROME1/2, 1 to 16 bits, signed or unsigned): modality LUT or rescale, then the
    VOI LUT or window centre/width when present, else the stored bit-depth range mapped to [0, 1]
    (an 8-bit MONOCHROME2 file reads exactly like the same pixels in a PNG); MONOCHROME1 and
    Presentation LUT Shape INVERSE invert (once). Colour: RGB and YBR_* (converted by pydicom), and
    PALETTE COLOR. Rows, Columns and NumberOfFrames are checked, from a header read that stops
    before the pixel data, before any pixel data is read.
    """

    suffixes = DICOM_SUFFIXES
    name = "dicom"

    def _read(self, path: str) -> _Handle:
        with warnings.catch_warnings():  # pydicom warnings can quote element values
            warnings.simplefilter("ignore")
            header = dcmread_regular(path, stop_before_pixels=True)
            try:
                frames = int(header.get("NumberOfFrames", 1) or 1)
                rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
            except Exception:
                raise ImageReadError(path, "DICOM image attributes are invalid") from None
        if frames > 1:
            raise ImageReadError(path, f"multi-frame DICOM with {frames} frames is not supported: pass a 2D image")
        if "Rows" not in header or "Columns" not in header:
            raise ImageReadError(path, "DICOM file has no pixel data")
        if rows <= 0 or cols <= 0:
            raise ImageReadError(path, "empty image (zero rows or columns)")
        self._budget(path, rows, cols, frames)
        return _Handle(path, None, {"rows": rows, "cols": cols})

    def _decode(self, handle: _Handle) -> np.ndarray:
        path = handle.path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread_regular(path, stop_before_pixels=False)
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                raise ImageReadError(path, "DICOM file has no pixel data")
            try:
                rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                samples = int(ds.get("SamplesPerPixel", 1) or 1)
                photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
            except Exception:
                raise ImageReadError(path, "DICOM image attributes are invalid") from None
            if (rows, cols) != (handle.extra["rows"], handle.extra["cols"]) or frames > 1:
                raise ImageReadError(path, "file changed while it was being read")
            try:
                arr = np.asarray(ds.pixel_array)  # pydicom 3 converts YBR_* colour to RGB
            except MemoryError:
                raise ImageReadError(path, "image is too large to load into memory") from None
            except Exception as e:
                raise ImageReadError(path, dicom_decode_reason(e, ds)) from None
            if arr.size == 0:
                raise ImageReadError(path, "empty image")
            try:
                if photometric in ("MONOCHROME1", "MONOCHROME2") or (samples == 1 and photometric != "PALETTE COLOR"):
                    if arr.ndim != 2:
                        raise ImageReadError(path, f"unexpected greyscale pixel array with {arr.ndim} dimensions")
                    out = dicom_grey(arr, ds, photometric)
                elif photometric == "PALETTE COLOR":
                    from pydicom.pixels import apply_color_lut

                    rgb = apply_color_lut(arr, ds)
                    out = rgb.astype(np.float64) / float(np.iinfo(rgb.dtype).max if rgb.dtype.kind == "u" else 1.0)
                elif samples == 3 and arr.ndim == 3 and arr.shape[-1] == 3:
                    # RGB, or YBR_* already converted to RGB by pydicom
                    bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize) or 8)
                    out = arr.astype(np.float64) / float(2**bits - 1)
                else:
                    raise ImageReadError(
                        path, f"unsupported DICOM photometric interpretation {photometric or '(missing)'}"
                    )
            except ImageReadError:
                raise
            except MemoryError:
                raise ImageReadError(path, "image is too large to load into memory") from None
            except ValueError as e:
                if "display range" in str(e) or "bit depth" in str(e):
                    raise ImageReadError(path, str(e)) from None
                raise ImageReadError(path, f"could not convert DICOM pixel values ({type(e).__name__})") from None
            except Exception as e:
                raise ImageReadError(path, f"could not convert DICOM pixel values ({type(e).__name__})") from None
        return _finish(out)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------
_READER_TYPES: dict[str, type[ClinicalImageReader]] = {
    **{s: ClinicalPILReader for s in PIL_SUFFIXES},
    **{s: ClinicalNiftiReader for s in NIFTI_SUFFIXES},
    **{s: ClinicalDicomReader for s in DICOM_SUFFIXES},
}


def reader_for(
    path: str | os.PathLike[str], max_side: int | None = None, max_pixels: int | None = None
) -> ClinicalImageReader | None:
    """A new reader for ``path`` by its suffix, or ``None`` for an unsupported suffix."""
    suffix = supported_suffix(path)
    cls = _READER_TYPES.get(suffix) if suffix else None
    return None if cls is None else cls(max_side=max_side, max_pixels=max_pixels)


def read_image(
    path: str | os.PathLike[str], *, max_side: int | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Read one 2D clinical image (see the readers for the per-format rules).

    Args:
        path: the image file.
        max_side: pixel budget, largest side (default :data:`MAX_IMAGE_SIDE`).
        max_pixels: pixel budget, total (default :data:`MAX_IMAGE_PIXELS`).

    Returns:
        float32 array of shape ``(H, W, C)``, ``C`` in {1, 3}, values in ``[0, 1]``.

    Raises:
        ImageReadError: a missing file, a folder, a FIFO or other non-regular file, a broken link or a
            link loop, an unsupported suffix, an empty, corrupt or truncated file, missing pixel data,
            an image over the pixel budget, or a volume/multi-frame file.
    """
    name = os.fspath(path)
    reader = reader_for(name, max_side, max_pixels)
    if reader is None:
        check_image_file(name)  # a folder, else the unsupported suffix
        raise AssertionError("unreachable")  # pragma: no cover
    arr, _ = reader.get_data(reader.read(name))
    return arr
