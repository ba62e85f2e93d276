# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""DICOM decoding rules used by :class:`medcbm.io.readers.ClinicalDicomReader`: reading a regular file without
blocking, the stored and VOI display ranges, and the greyscale mapping (MONOCHROME1/2, Presentation LUT).

Error reasons are built from exception types and technical attributes only: no header value (patient name,
identifiers, dates) reaches a message.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medcbm.io.errors import ImageReadError
from medcbm.io.files import open_regular_file

__all__ = ["dcmread_regular", "dicom_decode_reason", "dicom_grey"]


def dicom_decode_reason(exc: BaseException, ds: Any) -> str:
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


def _stored_range(ds: Any, arr: np.ndarray) -> tuple[float, float]:
    """Output range of the modality LUT/rescale applied to the stored bit depth (PS3.3 C.11.1).

    ``[0, 2**BitsStored - 1]`` (unsigned) or ``[-2**(BitsStored-1), 2**(BitsStored-1) - 1]`` (signed),
    through RescaleSlope/Intercept; the modality LUT's output depth when there is one.
    """
    if ds.get("ModalityLUTSequence"):
        item = ds.ModalityLUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        hi = float(2**bits - 1)
        try:
            hi = max(hi, float(np.max(np.asarray(item.LUTData))))
        except Exception:
            pass
        return 0.0, hi
    bits = ds.get("BitsStored") or ds.get("BitsAllocated") or 8 * arr.dtype.itemsize
    bits = int(bits)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None or intercept is not None:
        s = 1.0 if slope is None else float(slope)
        b = 0.0 if intercept is None else float(intercept)
        lo, hi = lo * s + b, hi * s + b
    return min(lo, hi), max(lo, hi)


def _voi_lut_range(ds: Any) -> tuple[float, float]:
    """Output range of the first VOI LUT: its descriptor's depth, widened to its data if larger."""
    item = ds.VOILUTSequence[0]
    hi = float(2 ** int(item.LUTDescriptor[2]) - 1)
    try:
        hi = max(hi, float(np.max(np.asarray(item.LUTData))))
    except Exception:
        pass
    return 0.0, hi


def dicom_grey(arr: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    """Stored values -> [0, 1] display values, bright = high P-value.

    Modality LUT/rescale, then the VOI LUT or window when present (scaled by its output range), else
    the stored bit-depth range mapped linearly (as torchxrayvision does; never per-image min-max).
    MONOCHROME1 and Presentation LUT Shape INVERSE each mean "invert for display"; a conformant
    MONOCHROME1 file carries INVERSE for the same single inversion (PS3.3 C.8.11.6.1.2), so the two
    are combined with OR, never applied twice.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    stored_lo, stored_hi = _stored_range(ds, arr)
    values = apply_modality_lut(arr, ds)
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    out: np.ndarray | None = None
    if has_lut or has_window:
        try:
            voi = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            # pydicom's windowing maps onto the modality output range; a VOI LUT onto its own depth
            lo, hi = _voi_lut_range(ds) if has_lut else (stored_lo, stored_hi)
            if hi > lo:
                out = (np.asarray(voi, dtype=np.float64) - lo) / (hi - lo)
        except Exception:  # invalid window (e.g. width < 1), malformed LUT: ignore the VOI step
            out = None
    if out is None:
        if arr.dtype.kind == "f":  # Float/DoubleFloatPixelData: no bit depth to map
            raise ValueError("float pixel data without a VOI window has no defined display range")
        if not stored_hi > stored_lo:
            raise ValueError("invalid stored bit depth or rescale")
        out = (np.asarray(values, dtype=np.float64) - stored_lo) / (stored_hi - stored_lo)
    out = np.clip(out, 0.0, 1.0)
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        out = 1.0 - out
    return out


def dcmread_regular(path: str, stop_before_pixels: bool) -> Any:
    """pydicom.dcmread on a non-blocking-opened regular file, retrying without the preamble."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with open_regular_file(path) as fh:
        try:
            return pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            pass
        except MemoryError:
            raise ImageReadError(path, "file is too large to load into memory") from None
        except Exception as e:
            raise ImageReadError(path, f"not a valid or truncated DICOM file ({type(e).__name__})") from None
        fh.seek(0)
        try:  # DICOM without the 128-byte preamble and 'DICM' prefix
            ds = pydicom.dcmread(fh, force=True, stop_before_pixels=stop_before_pixels)
        except Exception:
            raise ImageReadError(path, "not a valid DICOM file") from None
    if "Rows" not in ds and "PixelData" not in ds:
        raise ImageReadError(path, "not a valid DICOM file")
    return ds
