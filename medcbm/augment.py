# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Site-shift augmentation: the variation that separates one hospital's images from another's.

:class:`SiteShiftAugment` turns a batch of images ``(B, 3, L, L)`` in ``[0, 1]`` (loaded once at a
resolution ``L`` above the encoder's, typically twice) into an augmented batch ``(B, 3, S, S)`` in
``[0, 1]`` at the encoder size ``S``. Every step is optional and driven by a plain ``dict`` (the
``train.augment`` block of a pretraining recipe, ``configs/pretrain/*.yaml``):

=================  ===============================================================================
key                what it draws per image (library that does the work)
=================  ===============================================================================
``geometry``       object size x ``zoom`` (log-uniform), off-centre shift (``translate``, fraction of
                   the side), rotation (``rotate`` degrees), ``aspect`` stretch, flips; one batched
                   resampling (MONAI ``AffineTransform``, matrices from ``monai.transforms.utils``),
                   then an antialiased resize to ``S`` as at inference
``stain``          haematoxylin / eosin / DAB scale and shift in colour-deconvolution space
                   (scikit-image ``rgb2hed`` / ``hed2rgb``, Ruifrok & Johnston 2001)
``colour``         hue rotation about the grey axis and saturation scale
``greyscale``      probability of replacing the image by its luminance (BT.601)
``contrast``       gamma (MONAI ``AdjustContrast``), linear contrast and brightness
``histogram``      random non-linear intensity curve (MONAI ``RandHistogramShift``)
``illumination``   smooth multiplicative illumination field (MONAI ``RandBiasField``, one field for
                   all channels) and radial vignetting
``resolution``     down-sampling by a factor then back up (loss of detail of a lower-resolution camera)
``blur``           Gaussian blur (MONAI ``GaussianSmooth``)
``jpeg``           JPEG re-encoding at a random quality (Pillow)
``noise``          additive Gaussian noise
=================  ===============================================================================

Each step has a ``prob`` (default 1 for ``geometry``, 0.1 for ``greyscale``, 0.5 otherwise).
``channel_mode="grey"`` applies the intensity steps to one channel and replicates it (colour steps are
then ignored). The draws come from one ``numpy`` generator seeded at construction (MONAI's random
transforms are seeded from it), so two augmenters built with the same seed give identical batches for
identical inputs.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SiteShiftAugment", "AUGMENT_STEPS", "resize_batch"]

#: The recognised step names, in the order they are applied.
AUGMENT_STEPS: tuple[str, ...] = (
    "geometry",
    "stain",
    "colour",
    "greyscale",
    "contrast",
    "histogram",
    "illumination",
    "resolution",
    "blur",
    "jpeg",
    "noise",
)

_LUMA = torch.tensor([0.299, 0.587, 0.114])
_DEFAULT_PROB = {"geometry": 1.0, "greyscale": 0.1}  # every other step: 0.5
_COLOUR_STEPS = ("stain", "colour", "greyscale")  # skipped for channel_mode="grey"


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of a batch ``(B, C, H, W)`` to ``(B, C, size, size)``, clamped to [0, 1]."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)


def _pair(value: Any, name: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if hi < lo:
        raise ValueError(f"augment {name}: range [{lo}, {hi}] is reversed")
    return lo, hi


class SiteShiftAugment:
    """Batched, seeded site-shift augmentation (see the module docstring for the steps).

    Args:
        cfg: step name -> parameters (``{}`` turns a step on with its defaults; absent steps are off).
        out_size: encoder input side ``S``.
        channel_mode: ``"rgb"`` or ``"grey"``.
        seed: seed of every random draw.

    Raises:
        ValueError: an unknown step name or a reversed range.
    """

    def __init__(self, cfg: Mapping[str, Any], out_size: int, channel_mode: str = "rgb", seed: int = 0) -> None:
        unknown = sorted(set(cfg) - set(AUGMENT_STEPS))
        if unknown:
            raise ValueError(f"unknown augmentation step(s) {unknown}; known: {list(AUGMENT_STEPS)}")
        self.cfg = {k: dict(v or {}) if not isinstance(v, (int, float)) else v for k, v in cfg.items()}
        self.out_size = int(out_size)
        self.grey = str(channel_mode).lower() in ("grey", "gray")
        self.rng = np.random.default_rng(seed)
        from monai.transforms import RandBiasField, RandHistogramShift

        hist = self.cfg.get("histogram", {}) or {}
        self._hist = RandHistogramShift(num_control_points=tuple(hist.get("control_points", (5, 10))), prob=1.0)
        self._hist.set_random_state(seed=int(self.rng.integers(2**31)))
        ill = self.cfg.get("illumination", {}) or {}
        self._bias = RandBiasField(
            degree=int(ill.get("degree", 3)), coeff_range=_pair(ill.get("coeff", (0.0, 0.3)), "coeff"), prob=1.0
        )
        self._bias.set_random_state(seed=int(self.rng.integers(2**31)))

    # ---- helpers ---------------------------------------------------------------------------------
    def _on(self, step: str, n: int) -> np.ndarray:
        """Which of ``n`` images get ``step`` (all False when the step is off)."""
        if step not in self.cfg:
            return np.zeros(n, dtype=bool)
        c = self.cfg[step]
        p = c if isinstance(c, (int, float)) else c.get("prob", _DEFAULT_PROB.get(step, 0.5))
        return self.rng.random(n) < float(p)

    def _uniform(self, rng: tuple[float, float], n: int) -> np.ndarray:
        return self.rng.uniform(rng[0], rng[1], n)

    def _step(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Draw which images get step ``name`` and apply it to those (``x`` itself when none is drawn).

        Every step after ``geometry`` is the method ``_<name>(x, on, c)``: ``on`` marks the images to change
        (at least one) and ``c`` is the step's entry of the configuration.
        """
        on = self._on(name, x.shape[0])
        if not on.any():
            return x
        return getattr(self, f"_{name}")(x, on, self.cfg[name])

    # ---- steps -----------------------------------------------------------------------------------
    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        from monai.networks.layers import AffineTransform
        from monai.transforms.utils import create_rotate, create_scale, create_translate

        b, _, h, w = x.shape
        g = self.cfg.get("geometry")
        if g is None:
            return resize_batch(x, self.out_size)
        on = self._on("geometry", b)
        zoom = _pair(g.get("zoom", (1.0, 1.0)), "zoom")
        aspect = _pair(g.get("aspect", (1.0, 1.0)), "aspect")
        z = np.exp(self._uniform((math.log(zoom[0]), math.log(zoom[1])), b))
        a = np.exp(self._uniform((math.log(aspect[0]), math.log(aspect[1])), b))
        rot = np.deg2rad(self._uniform((-float(g.get("rotate", 0.0)), float(g.get("rotate", 0.0))), b))
        t = float(g.get("translate", 0.0))
        shift = self.rng.uniform(-t, t, (b, 2)) * np.array([h, w])
        flip_h = self.rng.random(b) < (0.5 if g.get("flip") else 0.0)
        flip_v = self.rng.random(b) < (0.5 if g.get("vflip") else 0.0)
        thetas = []
        for i in range(b):
            if not on[i]:
                thetas.append(np.eye(3))
                continue
            # output -> input coordinates: a scale above 1 samples a wider field (object looks smaller)
            sy, sx = math.sqrt(a[i]) / z[i], 1.0 / (math.sqrt(a[i]) * z[i])
            sx *= -1.0 if flip_h[i] else 1.0
            sy *= -1.0 if flip_v[i] else 1.0
            m = create_translate(2, shift[i]) @ create_rotate(2, rot[i]) @ create_scale(2, (sy, sx))
            thetas.append(np.asarray(m))
        theta = torch.as_tensor(np.stack(thetas), dtype=x.dtype)
        pad = str(g.get("padding_mode", "reflection"))
        warp = AffineTransform(
            normalized=False, mode="bilinear", padding_mode=pad, align_corners=False, zero_centered=True
        )
        x = warp(x, theta, spatial_size=(h, w))
        return resize_batch(x.clamp(0.0, 1.0), self.out_size)

    def _stain(self, x: torch.Tensor, on: np.ndarray, c: Mapping[str, Any]) -> torch.Tensor:
        from skimage.color import hed2rgb, rgb2hed

        sigma, bias = float(c.get("sigma", 0.05)), float(c.get("bias", 0.02))
        idx = np.flatnonzero(on)
        sub = x[idx].permute(0, 2, 3, 1).double().numpy()
        hed = rgb2hed(sub, channel_axis=-1)
        alpha = self.rng.uniform(1 - sigma, 1 + sigma, (len(idx), 1, 1, 3))
        beta = self.rng.uniform(-bias, bias, (len(idx), 1, 1, 3))
        rgb = hed2rgb(hed * alpha + beta, channel_axis=-1)
        x = x.clone()
        x[idx] = torch.as_tensor(rgb, dtype=x.dtype).permute(0, 3, 1, 2).clamp(0.0, 1.0)
        return x

    def _colour(self, x: torch.Tensor, on: np.ndarray, c: Mapping[str, Any]) -> torch.Tensor:
        hue = np.deg2rad(self.rng.uniform(-1, 1, x.shape[0]) * float(c.get("hue_degrees", 10.0))) * on
        sat = np.where(on, self._uniform(_pair(c.get("saturation", (0.7, 1.3)), "saturation"), x.shape[0]), 1.0)
        # hue rotation about the grey axis (Rodrigues), then saturation as a blend with luminance
        k = torch.full((3,), 1 / math.sqrt(3.0), dtype=x.dtype)
        kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=x.dtype)
        cos = torch.as_tensor(np.cos(hue), dtype=x.dtype).view(-1, 1, 1)
        sin = torch.as_tensor(np.sin(hue), dtype=x.dtype).view(-1, 1, 1)
        rot = cos * torch.eye(3, dtype=x.dtype) + sin * kx + (1 - cos) * torch.outer(k, k)
        y = torch.einsum("bij,bjhw->bihw", rot, x)
        lum = (y * _LUMA.to(x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        s = torch.as_tensor(sat, dtype=x.dtype).view(-1, 1, 1, 1)
        return (lum + s * (y - lum)).clamp(0.0, 1.0)

    def _greyscale(self, x: torch.Tensor, on: np.ndarray, c: Any) -> torch.Tensor:
        lum = (x * _LUMA.to(x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(x)
        return torch.where(torch.as_tensor(on).view(-1, 1, 1, 1), lum, x)

    def _contrast(self, x: torch.Tensor, on: np.ndarray, c: Mapping[str, Any]) -> torch.Tensor:
        from monai.transforms import AdjustContrast

        gamma = self._uniform(_pair(c.get("gamma", (0.7, 1.5)), "gamma"), x.shape[0])
        gain = self._uniform(_pair(c.get("contrast", (0.75, 1.25)), "contrast"), x.shape[0])
        shift = self._uniform((-float(c.get("brightness", 0.1)), float(c.get("brightness", 0.1))), x.shape[0])
        out = x.clone()
        for i in np.flatnonzero(on):
            y = AdjustContrast(gamma=float(gamma[i]))(x[i])
            m = y.mean()
            out[i] = ((y - m) * float(gain[i]) + m + float(shift[i])).clamp(0.0, 1.0)
        return out

    def _histogram(self, x: torch.Tensor, on: np.ndarray, c: Any) -> torch.Tensor:
        out = x.clone()
        for i in np.flatnonzero(on):
            out[i] = torch.as_tensor(self._hist(x[i]), dtype=x.dtype).clamp(0.0, 1.0)
        return out

    def _illumination(self, x: torch.Tensor, on: np.ndarray, c: Mapping[str, Any]) -> torch.Tensor:
        b, _, h, w = x.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        r2 = (yy**2 + xx**2).to(x.dtype) / 2.0
        vig = self._uniform(_pair(c.get("vignette", (0.0, 0.5)), "vignette"), b)
        out = x.clone()
        for i in np.flatnonzero(on):
            field = torch.as_tensor(self._bias(torch.ones(1, h, w)), dtype=x.dtype)  # one field, all channels
            out[i] = (x[i] * field * (1.0 - float(vig[i]) * r2)).clamp(0.0, 1.0)
        return out

    def _resolution(self, x: torch.Tensor, on: np.ndarray, c: Mapping[str, Any]) -> torch.Tensor:
        factor = self._uniform(_pair(c.get("factor", (1.0, 2.5)), "factor"), x.shape[0])
        out = x.clone()
        s = x.shape[-1]
        for i in np.flatnonzero(on):
            small = max(4, int(round(s / factor[i])))
            y = F.interpolate(x[i : i + 1], size=(small, small), mode="bilinear", antialias=True, align_corners=False)
            out[i] = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)[0].clamp(0.0, 1.0)
        return out

    def _blur(self, x: torch.Tensor, on: np.ndarray, c: Mapping[str, Any]) -> torch.Tensor:
        from monai.networks.layers import GaussianFilter

        sigma = self._uniform(_pair(c.get("sigma", (0.3, 1.5)), "sigma"), x.shape[0])
        level = np.round(sigma * 10.0) / 10.0  # one batched filter per 0.1 step of sigma
        out = x.clone()
        for s in np.unique(level[on]):
            idx = np.flatnonzero(on & (level == s))
            with torch.no_grad():
                out[idx] = GaussianFilter(spatial_dims=2, sigma=float(s))(x[idx]).clamp(0.0, 1.0)
        return out

    def _jpeg(self, x: torch.Tensor, on: np.ndarray, c: Mapping[str, Any]) -> torch.Tensor:
        from PIL import Image

        q = self.rng.integers(*(int(v) for v in c.get("quality", (30, 90))), size=x.shape[0], endpoint=True)
        out = x.clone()
        for i in np.flatnonzero(on):
            arr = (x[i].permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=int(q[i]))
            buf.seek(0)
            dec = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
            out[i] = torch.from_numpy(dec).permute(2, 0, 1).to(x.dtype)
        return out

    def _noise(self, x: torch.Tensor, on: np.ndarray, c: Mapping[str, Any]) -> torch.Tensor:
        std = self._uniform((0.0, float(c.get("std", 0.02))), x.shape[0]) * on
        noise = torch.as_tensor(self.rng.standard_normal(x.shape), dtype=x.dtype)
        return (x + noise * torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1, 1)).clamp(0.0, 1.0)

    # ---- public ----------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment ``x`` ``(B, 3, L, L)`` in [0, 1]; returns ``(B, 3, S, S)`` float32 in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch of shape (B, 3, H, W), got {tuple(x.shape)}")
        x = self._geometry(x.float())
        if self.grey:
            x = x[:, :1].expand(-1, 3, -1, -1).contiguous()
        for name in AUGMENT_STEPS[1:]:  # in order, each drawing from the one generator
            if not (self.grey and name in _COLOUR_STEPS):
                x = self._step(name, x)
        if self.grey:
            x = x[:, :1].expand(-1, 3, -1, -1).contiguous()
        return x.clamp(0.0, 1.0)
