# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Reading clinical images and turning them into encoder inputs.

Reading is done by MONAI ``ImageReader`` s (:mod:`medcbm.io.readers`) through ``monai.transforms.LoadImage``:
one 2D image (DICOM, NIfTI, PNG, JPEG, BMP, TIFF) becomes a float32 tensor ``(C, H, W)`` with ``C`` in
{1, 3} and values in ``[0, 1]``. Rows are the image rows as an image viewer (PIL) shows them: nothing is
transposed, and EXIF orientation tags are not applied. Every failure raises :class:`ImageReadError`,
which names the file and gives a short reason; DICOM header values never appear in these messages.

The MONAI-style transforms come in array/dictionary pairs:

.. code-block:: python

    from medcbm.transforms import ClinicalImagePipeline

    pipeline = ClinicalImagePipeline("grey", 224, mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276))
    x = pipeline("scan.dcm")          # torch.float32, shape (3, 224, 224)
    key = pipeline.fingerprint()      # sha256 of the preprocessing parameters, for caches

Note:
    MONAI's ``Compose``/``apply_transform`` re-raises any error as ``RuntimeError("applying transform
    ...")``; the :class:`ImageReadError` is then its ``__cause__`` (:func:`find_read_error` finds it).
    :class:`ClinicalImagePipeline` calls its steps directly so that callers can catch
    :class:`ImageReadError` itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform, Transform
from monai.utils import TransformBackends

from medcbm.io.errors import FileReasonError, ImageReadError, find_read_error
from medcbm.io.files import SUPPORTED_SUFFIXES, check_image_file, supported_suffix
from medcbm.io.readers import (
    READER_VERSION,
    ClinicalDicomReader,
    ClinicalImageReader,
    ClinicalNiftiReader,
    ClinicalPILReader,
    read_image,
)

__all__ = [
    "SUPPORTED_SUFFIXES",
    "CHANNEL_MODES",
    "RESIZE_MODES",
    "INTERPOLATIONS",
    "FileReasonError",
    "ImageReadError",
    "find_read_error",
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

CHANNEL_MODES = ("rgb", "grey")
RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

# Kept for code that imported the private name.
_READER_VERSION = READER_VERSION
# ITU-R BT.601 luma weights, as used by PIL's ``convert("L")``.
_LUMA = (0.299, 0.587, 0.114)
# "shortest" resize: beyond this aspect ratio the source is centre-cropped (plus a filter margin) before
# resizing, so a 1 x 16000 strip does not become a 224 x 3.6M intermediate.
_PRECROP_ASPECT = 8
# open_clip's PreprocessCfg keys and defaults (OpenAI CLIP normalisation).
_OPEN_CLIP_DEFAULTS: dict[str, Any] = {
    "size": 224,
    "mode": "RGB",
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------
_LOAD_IMAGE: LoadImage | None = None


def _monai_load_image() -> LoadImage:
    """One ``LoadImage`` per process, with the medcbm readers registered.

    ``LoadImage.__init__`` also instantiates all of MONAI's own readers, some of which log about
    optional decoders they cannot find; that happens once, quietly. ``expanduser=False``: the path is
    passed on (and named in errors) exactly as the caller gave it.
    """
    global _LOAD_IMAGE
    if _LOAD_IMAGE is None:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _LOAD_IMAGE = LoadImage(
                    reader=[ClinicalNiftiReader(), ClinicalDicomReader(), ClinicalPILReader()],
                    image_only=True,
                    dtype=np.float32,
                    ensure_channel_first=True,
                    expanduser=False,
                )
        finally:
            logging.disable(previous)
    return _LOAD_IMAGE


def _as_chw_tensor(img: Any) -> torch.Tensor:
    t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
    if t.ndim != 3:
        raise ValueError(f"expected a channel-first image of shape (C, H, W), got shape {tuple(t.shape)}")
    return t.float()


class LoadClinicalImage(Transform):
    """Load an image file as a float tensor of shape ``(C, H, W)``, ``C`` in {1, 3}, values in [0, 1].

    Goes through ``monai.transforms.LoadImage`` with the medcbm readers registered
    (:class:`~medcbm.io.readers.ClinicalDicomReader`, :class:`~medcbm.io.readers.ClinicalNiftiReader`,
    :class:`~medcbm.io.readers.ClinicalPILReader`). The reader is chosen by suffix and passed to
    ``LoadImage`` at call time, so its :class:`ImageReadError` reaches the caller unchanged (``LoadImage``
    would otherwise swallow it and try MONAI's own readers).

    Args:
        max_side: pixel budget, largest side (``None``: ``medcbm.io.readers.MAX_IMAGE_SIDE``).
        max_pixels: pixel budget, total (``None``: ``medcbm.io.readers.MAX_IMAGE_PIXELS``).

    Raises:
        ImageReadError: see :func:`read_image`.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, max_side: int | None = None, max_pixels: int | None = None) -> None:
        self.max_side = max_side
        self.max_pixels = max_pixels
        readers: tuple[ClinicalImageReader, ...] = (
            ClinicalNiftiReader(max_side, max_pixels),
            ClinicalDicomReader(max_side, max_pixels),
            ClinicalPILReader(max_side, max_pixels),
        )
        self._by_suffix = {s: r for r in readers for s in r.suffixes}

    @property
    def loader(self) -> LoadImage:
        """The process-wide ``LoadImage`` with the medcbm readers registered."""
        return _monai_load_image()

    def reader_for(self, path: str | os.PathLike[str]) -> ClinicalImageReader | None:
        """The registered reader for ``path``'s suffix, or ``None``."""
        suffix = supported_suffix(path)
        return self._by_suffix.get(suffix) if suffix else None

    def __call__(self, path: str | os.PathLike[str]) -> torch.Tensor:  # type: ignore[override]
        """Read ``path``; see :func:`read_image`."""
        name = os.fspath(path)
        reader = self.reader_for(name)
        if reader is None:
            check_image_file(name)  # raises: a folder, else the unsupported suffix
        img = self.loader(name, reader=reader)
        t = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
        return t.contiguous()

    def fingerprint(self) -> dict[str, Any]:
        """Stable description of this step (changes when the reader semantics change)."""
        return {"transform": "LoadClinicalImage", "reader_version": READER_VERSION, "range": [0.0, 1.0]}


class _DictVersion(MapTransform):
    """MONAI's dictionary form of an array transform: applies ``self.inner`` to each key (one definition of the
    loop and the fingerprint for the three pairs below)."""

    inner: Any

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:  # type: ignore[override]
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.inner(d[key])
        return d

    def fingerprint(self) -> dict[str, Any]:
        """Stable description of this step."""
        return {**self.inner.fingerprint(), "transform": type(self).__name__}


class LoadClinicalImaged(_DictVersion):
    """Dictionary version of :class:`LoadClinicalImage`: replaces each path under ``keys`` by a tensor."""

    backend = LoadClinicalImage.backend

    def __init__(
        self,
        keys: KeysCollection,
        allow_missing_keys: bool = False,
        max_side: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = self.inner = LoadClinicalImage(max_side, max_pixels)


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


class ToModalityChannelsd(_DictVersion):
    """Dictionary version of :class:`ToModalityChannels`."""

    backend = ToModalityChannels.backend

    def __init__(self, keys: KeysCollection, mode: str = "rgb", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = self.inner = ToModalityChannels(mode)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    v = str(value).strip().lower()
    if v not in choices:
        raise ValueError(f"{name} {value!r} must be one of {list(choices)}")
    return v


class EncoderInput(Transform):
    """Resize (and crop or pad) and normalise a ``(C, H, W)`` image for an image encoder.

    ``resize_mode`` (as open_clip's ``PreprocessCfg.resize_mode``):

    * ``"shortest"`` (default): the short side is resized to ``image_size`` (the long side becomes
      ``int(image_size * long / short)``, as in torchvision) and the centre square is cropped. Beyond an
      aspect ratio of 8 the source is first centre-cropped to the part the square needs (plus the
      filter's margin), so extreme strips cost no more memory than a square.
    * ``"longest"``: the long side is resized to ``image_size`` (the short side to
      ``round(short * image_size / long)``) and the image is padded to a square with zeros (black),
      centred as open_clip's ``CenterCropOrPad``: the whole object stays in view.
    * ``"squash"``: both sides are resized to ``image_size`` (the aspect ratio is not kept).

    Resampling uses ``interpolation`` (antialiased except for ``"nearest"``); values are clamped to
    [0, 1] (bicubic overshoot), then ``(x - mean[c]) / std[c]`` is applied per channel.

    Args:
        image_size: output side length in pixels.
        mean: per-channel mean (one value per channel, or a single value for all).
        std: per-channel standard deviation, all > 0 (same length as ``mean``).
        resize_mode: ``"shortest"``, ``"longest"`` or ``"squash"``.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.

    Raises:
        ValueError: for a non-positive ``image_size``, mismatched or non-positive ``std`` values, or an
            unknown ``resize_mode``/``interpolation``.

    .. code-block:: python

        enc = EncoderInput(224, mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276), resize_mode="longest")
        x = enc(torch.rand(3, 300, 400))  # (3, 224, 224), rows 28..195 hold the image, the rest is padding
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
    ) -> None:
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
        self.resize_mode = _check_choice("resize_mode", resize_mode, RESIZE_MODES)
        self.interpolation = _check_choice("interpolation", interpolation, INTERPOLATIONS)

    def _resize(self, t: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
        if (nh, nw) == tuple(t.shape[-2:]):
            return t
        if self.interpolation == "nearest":
            return F.interpolate(t[None], size=(nh, nw), mode="nearest-exact")[0]
        return F.interpolate(t[None], size=(nh, nw), mode=self.interpolation, align_corners=False, antialias=True)[0]

    def _shortest(self, t: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        _, h, w = t.shape
        if max(h, w) > _PRECROP_ASPECT * min(h, w):
            short = min(h, w)
            margin = math.ceil(2 * max(1.0, short / s)) + 2  # bicubic support in source pixels, and spare
            keep = min(max(h, w), short + 2 * margin)
            start = (max(h, w) - keep) // 2
            t = t[:, start : start + keep, :] if h > w else t[:, :, start : start + keep]
            _, h, w = t.shape
        if h <= w:
            nh, nw = s, int(s * w / h)
        else:
            nh, nw = int(s * h / w), s
        t = self._resize(t, nh, nw)
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        return t[:, top : top + s, left : left + s].clamp(0.0, 1.0)

    def _longest(self, t: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        _, h, w = t.shape
        ratio = max(h, w) / s
        nh, nw = max(1, round(h / ratio)), max(1, round(w / ratio))  # open_clip ResizeKeepRatio(longest=1)
        t = self._resize(t, nh, nw).clamp(0.0, 1.0)
        left, top = (s - nw) // 2, (s - nh) // 2  # open_clip center_crop_or_pad
        return F.pad(t, (left, s - nw - left, top, s - nh - top), value=0.0)

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor:  # type: ignore[override]
        """Return a float tensor of shape ``(C, image_size, image_size)``."""
        t = _as_chw_tensor(img)
        c, h, w = t.shape
        if h < 1 or w < 1:
            raise ValueError(f"empty image of shape {tuple(t.shape)}")
        if len(self.mean) not in (1, c):
            raise ValueError(f"mean/std have {len(self.mean)} values but the image has {c} channels")
        if self.resize_mode == "shortest":
            t = self._shortest(t)
        elif self.resize_mode == "longest":
            t = self._longest(t)
        else:
            t = self._resize(t, self.image_size, self.image_size).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=t.dtype, device=t.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=t.dtype, device=t.device).view(-1, 1, 1)
        return ((t - mean) / std).contiguous()

    def fingerprint(self) -> dict[str, Any]:
        """Stable description of this step."""
        fp: dict[str, Any] = {
            "transform": "EncoderInput",
            "image_size": self.image_size,
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "antialias": self.interpolation != "nearest",
            "clamp": [0.0, 1.0],
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.resize_mode == "shortest":
            fp.update(crop="center", precrop_above_aspect=_PRECROP_ASPECT)
        elif self.resize_mode == "longest":
            fp.update(pad="center", fill=0.0)
        return fp


class EncoderInputd(_DictVersion):
    """Dictionary version of :class:`EncoderInput`."""

    backend = EncoderInput.backend

    def __init__(
        self,
        keys: KeysCollection,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        allow_missing_keys: bool = False,
        *,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.encoder_input = self.inner = EncoderInput(
            image_size, mean, std, resize_mode=resize_mode, interpolation=interpolation
        )


def _canonical_sha256(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def preprocessing_fingerprint(steps: Iterable[Any]) -> str:
    """sha256 (hex) of the canonical JSON of a preprocessing: the ``fingerprint()`` of each step, in order.

    Features cached under one fingerprint are stale for any other; the value changes with every
    parameter of every step and with the reader version. :meth:`ClinicalImagePipeline.fingerprint` is
    this function over the pipeline's :attr:`~ClinicalImagePipeline.transforms`.

    Args:
        steps: transforms with a ``fingerprint()`` method (e.g. :class:`LoadClinicalImage`,
            :class:`ToModalityChannels`, :class:`EncoderInput`).

    Returns:
        64 hexadecimal characters.
    """
    return _canonical_sha256({"medcbm_preprocessing": 1, "steps": [step.fingerprint() for step in steps]})


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
        resize_mode: ``"shortest"`` (default), ``"longest"`` or ``"squash"``; see :class:`EncoderInput`.
        interpolation: ``"bicubic"`` (default), ``"bilinear"`` or ``"nearest"``.
        max_side: pixel budget, largest side (``None``: ``medcbm.io.readers.MAX_IMAGE_SIDE``).
        max_pixels: pixel budget, total (``None``: ``medcbm.io.readers.MAX_IMAGE_PIXELS``).

    .. code-block:: python

        cfg = dict(size=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", resize_mode="longest")
        pipe = ClinicalImagePipeline.from_config("rgb", cfg)  # e.g. model.visual.preprocess_cfg
    """

    def __init__(
        self,
        channel_mode: str,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        max_side: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.loader = LoadClinicalImage(max_side, max_pixels)
        self.channels = ToModalityChannels(channel_mode)
        self.encoder_input = EncoderInput(image_size, mean, std, resize_mode=resize_mode, interpolation=interpolation)

    @classmethod
    def from_config(
        cls, channel_mode: str, preprocess_cfg: Mapping[str, Any], **kwargs: Any
    ) -> "ClinicalImagePipeline":
        """Build from open_clip's ``preprocess_cfg`` (``model.visual.preprocess_cfg``).

        Args:
            channel_mode: ``"rgb"`` or ``"grey"``.
            preprocess_cfg: keys ``size`` (an int, or a square ``[h, w]``), ``mean``, ``std``,
                ``interpolation``, ``resize_mode``, and open_clip's ``mode`` (``"RGB"``) and
                ``fill_color`` (0); missing keys take open_clip's defaults.
            kwargs: ``max_side``/``max_pixels``.

        Raises:
            ValueError: an unknown key, a non-square size, another ``mode`` or a non-zero ``fill_color``.
        """
        cfg = dict(preprocess_cfg)
        unknown = sorted(set(cfg) - set(_OPEN_CLIP_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown preprocess_cfg keys {unknown} (known: {sorted(_OPEN_CLIP_DEFAULTS)})")
        cfg = {**_OPEN_CLIP_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        size = cfg["size"]
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or int(size[0]) != int(size[1]):
                raise ValueError(f"preprocess_cfg size {size!r} must be square")
            size = size[0]
        if str(cfg["mode"]).upper() != "RGB":
            raise ValueError(f"preprocess_cfg mode {cfg['mode']!r} is not supported (only 'RGB')")
        if cfg["fill_color"] not in (0, 0.0, (0, 0, 0), [0, 0, 0]):
            raise ValueError(f"preprocess_cfg fill_color {cfg['fill_color']!r} is not supported (only 0)")
        return cls(
            channel_mode,
            int(size),
            cfg["mean"],
            cfg["std"],
            resize_mode=cfg["resize_mode"],
            interpolation=cfg["interpolation"],
            **kwargs,
        )

    @property
    def transforms(self) -> tuple[Transform, ...]:
        """The steps, in order (e.g. for ``monai.transforms.Compose(pipeline.transforms)``)."""
        return (self.loader, self.channels, self.encoder_input)

    def __call__(self, path: str | os.PathLike[str]) -> torch.Tensor:
        """Read and preprocess ``path``; raises :class:`ImageReadError` if it cannot be read."""
        return self.encoder_input(self.channels(self.loader(path)))

    def to_dict(self) -> dict[str, Any]:
        """The parameters: ``channel_mode``, ``image_size``, ``mean``, ``std``, ``resize_mode``, ``interpolation``."""
        e = self.encoder_input
        return {
            "channel_mode": self.channels.mode,
            "image_size": e.image_size,
            "mean": list(e.mean),
            "std": list(e.std),
            "resize_mode": e.resize_mode,
            "interpolation": e.interpolation,
        }

    def fingerprint(self) -> str:
        """sha256 of the preprocessing (:func:`preprocessing_fingerprint` of :attr:`transforms`), for caches.

        The pixel budget (``max_side``/``max_pixels``) is not part of it: it refuses files, it does not change
        the tensor of a file it reads.
        """
        return preprocessing_fingerprint(self.transforms)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"ClinicalImagePipeline({args})"
