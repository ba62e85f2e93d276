# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Concept activation maps (CoAM): where in the image a concept's score comes from.

Four methods, picked per image tower by :func:`default_map_method`:

- ``"contribution"`` (open_clip ``ModifiedResNet`` with a probe or text grounding, the default there): the
  attention pool's output is split exactly over the last feature map's locations (attention weight times
  value, through the output projection), and each part is projected on the concept's direction: the map
  holds each location's share of the concept's logit (they add up to it, up to a constant).
- ``"value"`` (open_clip ``ModifiedResNet``): the last spatial feature map goes, location by location,
  through the attention pool's value and output projections (the pooled embedding is an attention-weighted
  mean of exactly these vectors), is L2-normalised like the image embedding and grounded: the map holds the
  concept score each location alone would give, in the concept's own units.
- ``"tokens"`` (open_clip ``VisionTransformer``): the same for each patch token after the final norm and
  projection (per-patch token similarity to the concept direction).
- ``"gradcam"`` (any other tower with a conv layer): Grad-CAM from ``monai.visualize.GradCAM`` with the
  concept score as the target, on ``layer4`` (ResNets), the final norm + activation of a timm EfficientNet trunk
  (``trunk.bn2``) or the last ``Conv2d``; values are Grad-CAM's, scaled to [0, 1].

Maps are upsampled (bilinear) to the encoder input size. Overlays use ``monai.visualize.blend_images``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MAP_METHODS", "ConceptMapper", "default_map_method", "grounding_directions", "overlay", "denormalize"]

MAP_METHODS = ("contribution", "value", "tokens", "gradcam")


def _is_modified_resnet(visual: torch.nn.Module) -> bool:
    pool = getattr(visual, "attnpool", None)
    return pool is not None and all(hasattr(pool, a) for a in ("v_proj", "c_proj", "positional_embedding"))


def _is_open_clip_vit(visual: torch.nn.Module) -> bool:
    return (
        all(hasattr(visual, a) for a in ("conv1", "transformer", "class_embedding", "ln_post", "_embeds"))
        and getattr(visual, "attn_pool", None) is None
    )


def grounding_directions(grounding: torch.nn.Module) -> torch.Tensor | None:
    """``M`` (K, D) such that each concept's pre-activation is ``normalised_features @ M.T + const``, or ``None``.

    Probe grounding: calibrated logit ``calib_scale * (w . f + b) + shift``; text grounding:
    ``scale * (cos(f, t) - offset)``. Other groundings are not linear in the features.
    """
    if hasattr(grounding, "calib_scale") and hasattr(grounding, "weight"):
        return grounding.calib_scale[:, None] * grounding.weight
    if hasattr(grounding, "text_embeddings") and hasattr(grounding, "scale"):
        return grounding.scale[:, None] * grounding.text_embeddings
    return None


def default_map_method(visual: torch.nn.Module, grounding: torch.nn.Module | None = None) -> str:
    """``"contribution"`` for a ModifiedResNet with a linear grounding (``"value"`` otherwise), ``"tokens"``
    for an open_clip ViT, else ``"gradcam"``."""
    if _is_modified_resnet(visual):
        return "contribution" if grounding is not None and grounding_directions(grounding) is not None else "value"
    if _is_open_clip_vit(visual):
        return "tokens"
    return "gradcam"


class _ConceptScores(torch.nn.Module):
    """image -> unedited concept scores (B, K): the Grad-CAM target model."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.net = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net.concept_scores(image, edited=False)


class ConceptMapper:
    """Computes concept activation maps for a :class:`~medcbm.networks.ConceptBottleneckClassifier`.

    Args:
        network: the concept bottleneck network (with an encoder wrapping an open_clip image tower in
            ``encoder.visual``) and a grounding.
        method: ``"auto"`` (see :func:`default_map_method`) or one of :data:`MAP_METHODS`.

    Maps are of the *unedited* concept scores (what the image shows, before any test-time edit).
    """

    def __init__(self, network: torch.nn.Module, method: str = "auto"):
        encoder = getattr(network, "encoder", None)
        visual = getattr(encoder, "visual", None)
        if visual is None:
            raise ValueError("concept maps need the network's image encoder (network.encoder.visual)")
        self.network = network
        self.visual = visual
        auto = default_map_method(visual, network.grounding)
        self.method = auto if method in (None, "", "auto") else method
        if self.method not in MAP_METHODS:
            raise ValueError(f"unknown map method {method!r}; expected 'auto' or one of {MAP_METHODS}")
        if self.method in ("value", "contribution") and not _is_modified_resnet(visual):
            raise ValueError(
                f"map method {self.method!r} needs an open_clip ModifiedResNet image tower (with attnpool)"
            )
        if self.method == "contribution" and grounding_directions(network.grounding) is None:
            raise ValueError("map method 'contribution' needs a linear (probe or text) grounding")
        if self.method == "tokens" and not _is_open_clip_vit(visual):
            raise ValueError("map method 'tokens' needs an open_clip VisionTransformer image tower")
        self._gradcam_layer = self._last_conv_name() if self.method == "gradcam" else None
        #: (h, w) of the last maps' native grid before upsampling (``None`` for Grad-CAM or before any call)
        self.grid_shape: tuple[int, int] | None = None

    # ------------------------------------------------------------------ per-location embeddings
    @torch.no_grad()
    def location_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) L2-normalised per-location embeddings (``value`` and ``tokens`` methods)."""
        v = self.visual
        if self.method == "value":
            x = v.stem(image)
            x = v.layer4(v.layer3(v.layer2(v.layer1(x))))
            B, Cf, h, w = x.shape
            pool = v.attnpool
            pos = pool.positional_embedding[1:].to(x.dtype)  # (h*w, Cf), row-major like the flatten below
            if pos.shape[0] != h * w:
                raise ValueError(f"feature map {h}x{w} does not match the attention pool ({pos.shape[0]} positions)")
            tokens = x.flatten(2).transpose(1, 2) + pos  # (B, h*w, Cf)
            emb = pool.c_proj(pool.v_proj(tokens))  # (B, h*w, D)
        elif self.method == "tokens":
            x = v.transformer(v._embeds(image))
            _, tokens = v._pool(x)
            if getattr(v, "final_ln_after_pool", False):
                tokens = v.ln_post(tokens)
            n = tokens.shape[1]
            h = w = int(round(math.sqrt(n)))
            if h * w != n:
                raise ValueError(f"{n} patch tokens do not form a square grid")
            emb = tokens @ v.proj if v.proj is not None else tokens
            B = emb.shape[0]
        else:
            raise ValueError("location embeddings exist only for the 'value' and 'tokens' methods")
        emb = F.normalize(emb, dim=-1)
        return emb.transpose(1, 2).reshape(B, -1, h, w)

    @torch.no_grad()
    def location_contributions(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact split of the pooled (unnormalised) embedding over feature-map locations (ModifiedResNet).

        The attention pool returns ``c_proj(sum_j A_j * v_j)`` (per head, ``A`` summing to 1 over the mean
        token and the ``h*w`` locations). Location ``j`` gets ``c_proj.W (A_j * v_j)`` plus its share of the
        mean token's value (the mean token is the average of the locations); the rest (positional and bias
        terms of the mean token, ``c_proj`` bias) is a constant.

        Returns:
            ``(E, const, f)``: per-location parts ``(B, D, h, w)``, the constant ``(B, D)`` and the pooled
            embedding ``(B, D)``, with ``E.sum((2, 3)) + const == f`` up to rounding.
        """
        v = self.visual
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(image)))))
        B, Cf, h, w = x.shape
        pool = v.attnpool
        L = h * w
        t = x.flatten(2).transpose(1, 2)  # (B, L, Cf)
        pos = pool.positional_embedding.to(x.dtype)
        if pos.shape[0] != L + 1:
            raise ValueError(f"feature map {h}x{w} does not match the attention pool ({pos.shape[0] - 1} positions)")
        tok = torch.cat([t.mean(1, keepdim=True), t], 1) + pos  # (B, L+1, Cf)
        nh = pool.num_heads
        hd = Cf // nh
        q = pool.q_proj(tok[:, 0]).view(B, nh, 1, hd)
        k = pool.k_proj(tok).view(B, L + 1, nh, hd).transpose(1, 2)  # (B, nh, L+1, hd)
        att = torch.softmax((q * k).sum(-1) / math.sqrt(hd), dim=-1)  # (B, nh, L+1)
        val = pool.v_proj(tok).view(B, L + 1, nh, hd)
        a = att.transpose(1, 2)[..., None]  # (B, L+1, nh, 1)
        per_loc = (a[:, 1:] * val[:, 1:]).reshape(B, L, Cf)
        wv_t = (t @ pool.v_proj.weight.T).view(B, L, nh, hd)  # the mean token's value, spread over locations
        per_loc = per_loc + (a[:, :1] * wv_t / L).reshape(B, L, Cf)
        E = per_loc @ pool.c_proj.weight.T  # (B, L, D)
        rest = a[:, 0] * pool.v_proj(pos[:1]).view(1, nh, hd)  # the mean token's positional + bias part
        const = rest.reshape(B, Cf) @ pool.c_proj.weight.T + pool.c_proj.bias
        f = v.attnpool(x)
        return E.transpose(1, 2).reshape(B, -1, h, w), const, f

    # ------------------------------------------------------------------ maps
    def maps(self, image: torch.Tensor, concepts: Sequence[int] | None = None) -> torch.Tensor:
        """Concept maps ``(B, len(concepts), H, W)`` at the input's resolution.

        Args:
            image: (B, 3, H, W) encoder input (already preprocessed).
            concepts: concept indices (default: all).
        """
        if image.ndim != 4:
            raise ValueError(f"image must be (B, 3, H, W), got shape {tuple(image.shape)}")
        K = len(self.network.concepts)
        idx = list(range(K)) if concepts is None else [int(k) for k in concepts]
        if any(k < 0 or k >= K for k in idx):
            raise ValueError(f"concept indices must be in [0, {K}), got {idx}")
        H, W = image.shape[-2:]
        if self.method == "gradcam":
            return self._gradcam(image, idx)
        if self.method == "contribution":
            with torch.no_grad():
                E, _, f = self.location_contributions(image)
                M = grounding_directions(self.network.grounding)[idx].to(E.dtype)  # (k, D)
                grid = torch.einsum("bdhw,kd->bkhw", E, M) / f.norm(dim=-1).clamp_min(1e-12)[:, None, None, None]
                self.grid_shape = tuple(grid.shape[-2:])
                return F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)
        emb = self.location_embeddings(image)  # (B, D, h, w)
        B, D, h, w = emb.shape
        with torch.no_grad():
            flat = emb.permute(0, 2, 3, 1).reshape(B * h * w, D)
            scores = self.network.grounding(flat)[:, idx]  # (B*h*w, k)
            grid = scores.reshape(B, h, w, len(idx)).permute(0, 3, 1, 2)
            self.grid_shape = (h, w)
            return F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)

    def _last_conv_name(self) -> str:
        if isinstance(getattr(self.visual, "layer4", None), torch.nn.Module):  # ResNet-like: the last stage's output
            return "net.encoder.visual.layer4"
        trunk = getattr(self.visual, "trunk", None)  # open_clip TimmModel: timm EfficientNet's final norm + activation
        if isinstance(getattr(trunk, "bn2", None), torch.nn.Module) and hasattr(trunk, "conv_head"):
            return "net.encoder.visual.trunk.bn2"
        name = None
        for n, m in self.visual.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                name = n
        if name is None:
            raise ValueError("the image tower has no Conv2d layer for Grad-CAM")
        return f"net.encoder.visual.{name}"

    def _gradcam(self, image: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        from monai.visualize import GradCAM

        model = _ConceptScores(self.network).eval()
        cam = GradCAM(nn_module=model, target_layers=self._gradcam_layer)
        out = []
        with torch.enable_grad():
            for k in idx:
                out.append(cam(image.detach().clone().requires_grad_(True), class_idx=int(k)))  # (B, 1, H, W)
        return torch.cat(out, dim=1).detach()


def denormalize(image: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Encoder input (3, H, W) back to a displayable (H, W, 3) float image in [0, 1]."""
    x = torch.as_tensor(image).detach().float().cpu()
    m = torch.tensor(list(mean)).view(-1, 1, 1)
    s = torch.tensor(list(std)).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def overlay(image_hwc: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a heatmap (H, W) over an image (H, W, 3) in [0, 1] with ``monai.visualize.blend_images``.

    The heatmap is min-max scaled per map (the overlay shows *where*, the score says *how much*).
    """
    from monai.visualize import blend_images

    img = np.asarray(image_hwc, dtype=np.float32)
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.shape != img.shape[:2]:
        raise ValueError(f"heatmap shape {hm.shape} differs from the image's {img.shape[:2]}")
    lo, hi = float(hm.min()), float(hm.max())
    hm = (hm - lo) / (hi - lo) if hi > lo else np.zeros_like(hm)
    blended = blend_images(
        img.transpose(2, 0, 1), hm[None], alpha=alpha, cmap=cmap, rescale_arrays=False, transparent_background=False
    )
    return np.clip(np.asarray(blended).transpose(1, 2, 0), 0, 1)
