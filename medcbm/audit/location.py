# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Concept location (CLM@α) against box annotations in original image pixels.

A concept map is computed on the model input (``S x S``), which the bundle's preprocessing made from the
original image by resizing and centre-cropping (``shortest``), padding (``longest``) or squashing.
:class:`InputGeometry` replays that arithmetic (the same integer rounding as
:class:`medcbm.transforms.EncoderInput`) so a map can be sampled at every original pixel: the map is read back
into original coordinates, where the boxes are. Pixels the crop cut away have no map value (NaN) and are not
ranked; a box counts only if enough of it is in the visible area (``min_visible``), and then only its visible
part.

Per (image, concept) map and for each α the top ``round(α·V/12)`` of the ``V`` visible pixels are taken and:

- ``hit`` (CLM@α): any pixel of the (visible) boxes is among them;
- ``precision``: the fraction of them inside the boxes (a uniformly random map gives the boxes' area fraction);
- ``coverage``: the fraction of the boxes' pixels among them (a uniformly random map gives α/12).

Baselines, so the numbers mean something: ``uniform_random`` (exact expectations of a map with i.i.d. pixel
values), ``random_smooth`` (seeded Gaussian noise at the map's own grid resolution, upsampled like a real map:
as blobby as a real map but placed by chance), ``centre`` (a map peaking at the centre of the model input:
"look at the middle") and ``shuffled`` (the same concept rank's map from another image: the model's typical
spatial habits, not this image's content).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ALPHAS",
    "Box",
    "InputGeometry",
    "LocationItem",
    "box_mask",
    "location_audit",
    "location_scores",
    "parse_boxes",
    "uniform_random_expectation",
]

ALPHAS = (1, 3, 6)
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels (x: column, y: row)
_PRECROP_ASPECT = 8  # medcbm.transforms.EncoderInput pre-crops beyond this aspect ratio
_MAX_CELLS = 1 << 21  # larger originals are evaluated on a strided grid of pixel centres
_NUM = re.compile(r"[\s,]+")


def parse_boxes(text: Any) -> list[Box]:
    """``"x0 y0 x1 y1; x0 y0 x1 y1"`` (original pixels; numbers separated by spaces or commas) -> boxes.

    Raises:
        ValueError: a box without four numbers, a negative or non-finite coordinate, or ``x1 <= x0`` /
            ``y1 <= y0`` (the message names the box).
    """
    s = "" if text is None else str(text).strip()
    if s == "" or s.lower() in ("nan", "na", "none"):
        return []
    boxes: list[Box] = []
    for n, part in enumerate(p for p in s.split(";") if p.strip()):
        tokens = [t for t in _NUM.split(part.strip()) if t]
        try:
            v = [float(t) for t in tokens]
        except ValueError:
            raise ValueError(f"box {n + 1} {part.strip()!r}: not numbers (expected 'x0 y0 x1 y1')") from None
        if len(v) != 4:
            raise ValueError(f"box {n + 1} {part.strip()!r}: {len(v)} numbers, expected 4 (x0 y0 x1 y1)")
        if not all(math.isfinite(x) and x >= 0 for x in v):
            raise ValueError(f"box {n + 1} {part.strip()!r}: coordinates must be finite and >= 0")
        x0, y0, x1, y1 = v
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {n + 1} {part.strip()!r}: needs x1 > x0 and y1 > y0")
        boxes.append((x0, y0, x1, y1))
    return boxes


@dataclass(frozen=True)
class InputGeometry:
    """Where an original image's pixels land in the ``size x size`` model input: ``u = x·sx + bx``, ``v = y·sy + by``.

    Coordinates are continuous, pixel ``j`` spanning ``[j, j + 1)`` (so its centre is ``j + 0.5``), in both
    spaces; ``x``/``u`` run along columns, ``y``/``v`` along rows.

    Attributes:
        height, width: the original image (as read, before preprocessing).
        size: model input side.
        sx, sy, bx, by: the affine map from original to model coordinates.
    """

    height: int
    width: int
    size: int
    sx: float
    sy: float
    bx: float
    by: float

    @classmethod
    def from_preprocessing(cls, preprocessing: Any, height: int, width: int) -> "InputGeometry":
        """Replay the resize/crop/pad of ``preprocessing`` (anything with ``image_size`` and ``resize_mode``:
        :class:`medcbm.bundle.Preprocessing` or :class:`medcbm.transforms.EncoderInput`) for an image of
        ``height x width`` pixels."""
        s = int(preprocessing.image_size)
        mode = str(getattr(preprocessing, "resize_mode", "shortest"))
        h, w = int(height), int(width)
        if h < 1 or w < 1:
            raise ValueError(f"image size must be positive, got {h}x{w}")
        if mode == "shortest":
            ox = oy = 0
            if max(h, w) > _PRECROP_ASPECT * min(h, w):  # as EncoderInput._shortest
                short = min(h, w)
                margin = math.ceil(2 * max(1.0, short / s)) + 2
                keep = min(max(h, w), short + 2 * margin)
                start = (max(h, w) - keep) // 2
                if h > w:
                    oy, h = start, keep
                else:
                    ox, w = start, keep
            nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
            top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
            sx, sy = nw / w, nh / h
            return cls(int(height), int(width), s, sx, sy, -ox * sx - left, -oy * sy - top)
        if mode == "longest":
            ratio = max(h, w) / s
            nh, nw = max(1, round(h / ratio)), max(1, round(w / ratio))
            left, top = (s - nw) // 2, (s - nh) // 2
            return cls(h, w, s, nw / w, nh / h, float(left), float(top))
        if mode == "squash":
            return cls(h, w, s, s / w, s / h, 0.0, 0.0)
        raise ValueError(f"unknown resize_mode {mode!r}")

    def to_model(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Original ``(x, y)`` -> model input ``(u, v)``."""
        return np.asarray(x) * self.sx + self.bx, np.asarray(y) * self.sy + self.by

    def visible_area(self) -> Box:
        """The part of the original the model input shows, ``(x0, y0, x1, y1)`` in original pixels."""
        x0, x1 = (0 - self.bx) / self.sx, (self.size - self.bx) / self.sx
        y0, y1 = (0 - self.by) / self.sy, (self.size - self.by) / self.sy
        return max(0.0, x0), max(0.0, y0), min(float(self.width), x1), min(float(self.height), y1)

    def grid(self, max_cells: int = _MAX_CELLS) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates ``(xs, ys)`` of the evaluation grid (every pixel, or a stride so that the
        grid has at most ``max_cells`` cells)."""
        step = max(1, math.ceil(math.sqrt(self.height * self.width / max_cells)))
        xs = np.arange(0, self.width, step, dtype=np.float64) + min(step, self.width) / 2.0
        ys = np.arange(0, self.height, step, dtype=np.float64) + min(step, self.height) / 2.0
        return xs, ys

    def to_original(self, heatmap: Any, max_cells: int = _MAX_CELLS) -> np.ndarray:
        """A model-input map ``(size, size)`` sampled (bilinear) at the original pixel centres of :meth:`grid`;
        NaN where the model input does not show the original (cut by the crop)."""
        m = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
        if tuple(m.shape) != (self.size, self.size):
            raise ValueError(f"heatmap shape {tuple(m.shape)} is not the model input's ({self.size}, {self.size})")
        xs, ys = self.grid(max_cells)
        u, v = self.to_model(xs, ys)
        gx = torch.as_tensor(2.0 * u / self.size - 1.0, dtype=torch.float32)  # align_corners=False convention
        gy = torch.as_tensor(2.0 * v / self.size - 1.0, dtype=torch.float32)
        g = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]  # (1, H', W', 2) as (x, y)
        out = F.grid_sample(m[None, None], g, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
        out = out.numpy().astype(np.float64)
        inside = ((v >= 0) & (v < self.size))[:, None] & ((u >= 0) & (u < self.size))[None, :]
        out[~inside] = np.nan
        return out


def box_mask(boxes: Sequence[Box], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean ``(len(ys), len(xs))`` mask of the grid cells whose centre lies in any box (a box smaller than a
    cell marks the cell holding its centre)."""
    mask = np.zeros((len(ys), len(xs)), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        cols = (xs >= x0) & (xs < x1)
        rows = (ys >= y0) & (ys < y1)
        if not cols.any():
            cols = np.zeros_like(cols)
            cols[int(np.argmin(np.abs(xs - (x0 + x1) / 2)))] = True
        if not rows.any():
            rows = np.zeros_like(rows)
            rows[int(np.argmin(np.abs(ys - (y0 + y1) / 2)))] = True
        mask |= rows[:, None] & cols[None, :]
    return mask


def _visible_part(box: Box, area: Box) -> tuple[Box | None, float]:
    x0, y0, x1, y1 = box
    a0, b0, a1, b1 = area
    cx0, cy0, cx1, cy1 = max(x0, a0), max(y0, b0), min(x1, a1), min(y1, b1)
    if cx1 <= cx0 or cy1 <= cy0:
        return None, 0.0
    return (cx0, cy0, cx1, cy1), (cx1 - cx0) * (cy1 - cy0) / ((x1 - x0) * (y1 - y0))


def location_scores(heatmap: np.ndarray, mask: np.ndarray, alphas: Sequence[float] = ALPHAS) -> dict[str, float]:
    """``hit``/``precision``/``coverage`` at each α of one map (NaN pixels are not visible and not ranked).

    Returns keys ``hit_<α>``, ``precision_<α>``, ``coverage_<α>``; ``{}`` when the mask has no visible pixel.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if h.shape != m.shape:
        raise ValueError(f"location mask shape {m.shape} differs from heatmap shape {h.shape}")
    valid = ~np.isnan(h)
    vals, inside = h[valid], m[valid]
    n_in = int(inside.sum())
    if n_in == 0:
        return {}
    order = np.argsort(-vals, kind="stable")
    ranked = inside[order]
    out: dict[str, float] = {}
    for a in alphas:
        n = max(1, min(len(vals), int(round(a * len(vals) / 12.0))))
        k = int(ranked[:n].sum())
        out[f"hit_{a:g}"] = float(k > 0)
        out[f"precision_{a:g}"] = k / n
        out[f"coverage_{a:g}"] = k / n_in
    return out


def uniform_random_expectation(n_visible: int, n_inside: int, alphas: Sequence[float] = ALPHAS) -> dict[str, float]:
    """Exact expectations of :func:`location_scores` for a map with i.i.d. continuous pixel values: the top set
    is a uniformly random ``n``-subset, so ``coverage = n/V``, ``precision = A/V`` and
    ``hit = 1 - C(V-A, n) / C(V, n)`` (hypergeometric)."""
    V, A = int(n_visible), int(n_inside)
    out: dict[str, float] = {}
    for a in alphas:
        n = max(1, min(V, int(round(a * V / 12.0))))
        if V - A < n:
            miss = 0.0
        else:
            miss = math.exp(
                math.lgamma(V - A + 1) - math.lgamma(V - A - n + 1) - math.lgamma(V + 1) + math.lgamma(V - n + 1)
            )
        out[f"hit_{a:g}"] = 1.0 - miss
        out[f"precision_{a:g}"] = A / V
        out[f"coverage_{a:g}"] = n / V
    return out


@dataclass
class LocationItem:
    """One image with boxes and the model-input maps of its top concepts.

    Attributes:
        image: the image as the user gave it.
        geometry: :class:`InputGeometry` of the image under the bundle's preprocessing.
        boxes: annotated boxes in original pixels.
        maps: ``(concept_id, direction, map (size, size))`` per top concept, in rank order.
        grid_shape: the maps' native resolution (for the ``random_smooth`` baseline); ``None``: 7 x 7.
    """

    image: str
    geometry: InputGeometry
    boxes: list[Box]
    maps: list[tuple[str, str, np.ndarray]] = field(default_factory=list)
    grid_shape: tuple[int, int] | None = None


def _mean(rows: list[dict[str, float]], alphas: Sequence[float], nd: int = 4) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for a in alphas:
        for key, name in (("hit", "clm"), ("precision", "precision"), ("coverage", "coverage")):
            vals = [r[f"{key}_{a:g}"] for r in rows]
            out[f"{name}_at_{a:g}"] = round(float(np.mean(vals)), nd) if vals else None
    return out


@dataclass
class _Tally:
    """What :func:`location_audit` gathers over the images: the maps' scores, the baselines' scores, the box counts
    and each used image's box area fraction."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    base: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {"uniform_random": [], "random_smooth": [], "centre": [], "shuffled": []}
    )
    counts: dict[str, int] = field(
        default_factory=lambda: {
            "fully_visible": 0,
            "partly_visible_used": 0,
            "excluded_mostly_cut": 0,
            "excluded_not_visible": 0,
            "outside_image": 0,
        }
    )
    area_fraction: list[float] = field(default_factory=list)


def location_audit(
    items: Sequence[LocationItem],
    alphas: Sequence[float] = ALPHAS,
    min_visible: float = 0.5,
    n_random: int = 10,
    seed: int = 0,
    max_cells: int = _MAX_CELLS,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """CLM@α, precision and coverage of concept maps against boxes, with the four baselines.

    Args:
        items: images with boxes and maps (see :class:`LocationItem`).
        alphas: the α values (top α/12 of the visible pixels).
        min_visible: a box counts when at least this fraction of its area is inside the area the model sees;
            then only its visible part is the location.
        n_random: ``random_smooth`` maps per image (seeded by ``seed``).
        max_cells: evaluation grid budget per image (larger originals are strided).

    Returns:
        ``(summary, per_image)``: the ``model_audit.json`` ``concept_location`` entry, and per image
        ``{"image", "boxes_used", "boxes_excluded", "hits": {concept: {"clm_at_<α>": bool}}}``.
    """
    if not 0.0 < min_visible <= 1.0:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    rng = np.random.default_rng(seed)
    tally = _Tally()
    per_image: list[dict[str, Any]] = []
    used = [it for it in items if it.boxes]
    for n, it in enumerate(used):
        keep, excluded = _counted_boxes(it, min_visible, tally.counts)
        entry: dict[str, Any] = {"image": it.image, "boxes_used": len(keep), "boxes_excluded": excluded}
        per_image.append(entry)
        if not keep or not it.maps:
            continue
        mask, visible = _visible_mask(it.geometry, keep, max_cells)
        if not mask.any():
            continue
        others = [used[(n + j) % len(used)] for j in range(1, len(used))]  # the other images, cyclic from this one
        entry["hits"] = _score_maps(it, mask, int(visible.sum()), others, alphas, max_cells, tally)
        _chance_baselines(it, mask, alphas, max_cells, n_random, rng, tally)
    return _location_summary(tally, per_image, len(used), alphas, min_visible, n_random), per_image


def _counted_boxes(it: LocationItem, min_visible: float, counts: dict[str, int]) -> tuple[list[Box], int]:
    """The visible parts of the image's boxes that count, and how many boxes do not (each counted by reason)."""
    g = it.geometry
    area = g.visible_area()
    keep: list[Box] = []
    excluded = 0
    for b in it.boxes:
        if b[0] >= g.width or b[1] >= g.height:
            counts["outside_image"] += 1
            excluded += 1
            continue
        b = (b[0], b[1], min(b[2], float(g.width)), min(b[3], float(g.height)))
        part, frac = _visible_part(b, area)
        if part is None:
            counts["excluded_not_visible"] += 1
        elif frac < min_visible:
            counts["excluded_mostly_cut"] += 1
        else:
            counts["fully_visible" if frac >= 1.0 - 1e-9 else "partly_visible_used"] += 1
            keep.append(part)
            continue
        excluded += 1
    return keep, excluded


def _visible_mask(g: InputGeometry, keep: Sequence[Box], max_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, visible)`` on the evaluation grid: the counted boxes' cells the model sees, and all cells it sees."""
    xs, ys = g.grid(max_cells)
    mask = box_mask(keep, xs, ys)
    visible = ~np.isnan(g.to_original(np.zeros((g.size, g.size)), max_cells))
    mask &= visible
    return mask, visible


def _score_maps(
    it: LocationItem,
    mask: np.ndarray,
    n_visible: int,
    others: Sequence[LocationItem],
    alphas: Sequence[float],
    max_cells: int,
    tally: _Tally,
) -> dict[str, Any]:
    """Score each of the image's maps against ``mask`` and, per rank, the ``shuffled`` and ``uniform_random``
    baselines; returns the image's hits per concept."""
    g = it.geometry
    V, A = n_visible, int(mask.sum())
    tally.area_fraction.append(A / V)
    hits: dict[str, Any] = {}
    for rank, (cid, direction, hm) in enumerate(it.maps):
        sc = location_scores(g.to_original(hm, max_cells), mask, alphas)
        tally.rows.append({"concept": cid, "direction": direction, **sc})
        hits[cid] = {f"clm_at_{a:g}": bool(sc[f"hit_{a:g}"]) for a in alphas}
        # the same rank's map of another image, read through this image's geometry
        other = next((o for o in others if len(o.maps) > rank), None)
        if other is not None:
            tally.base["shuffled"].append(location_scores(g.to_original(other.maps[rank][2], max_cells), mask, alphas))
        tally.base["uniform_random"].append(uniform_random_expectation(V, A, alphas))
    return hits


def _chance_baselines(
    it: LocationItem,
    mask: np.ndarray,
    alphas: Sequence[float],
    max_cells: int,
    n_random: int,
    rng: np.random.Generator,
    tally: _Tally,
) -> None:
    """The image's ``random_smooth`` maps (``n_random`` draws from ``rng``) and its ``centre`` map, scored."""
    g = it.geometry
    gh, gw = it.grid_shape or (7, 7)
    for _ in range(n_random):
        noise = torch.as_tensor(rng.standard_normal((1, 1, gh, gw)), dtype=torch.float32)
        smooth = F.interpolate(noise, size=(g.size, g.size), mode="bilinear", align_corners=False)[0, 0].numpy()
        tally.base["random_smooth"].append(location_scores(g.to_original(smooth, max_cells), mask, alphas))
    c = np.arange(g.size) + 0.5 - g.size / 2.0
    centre = -(c[:, None] ** 2 + c[None, :] ** 2)
    tally.base["centre"].append(location_scores(g.to_original(centre, max_cells), mask, alphas))


def _location_summary(
    tally: _Tally,
    per_image: Sequence[dict[str, Any]],
    n_with_boxes: int,
    alphas: Sequence[float],
    min_visible: float,
    n_random: int,
) -> dict[str, Any]:
    """The ``concept_location`` entry: definitions, box counts, the means over all maps, the baselines, and the
    means per concept and per direction."""
    rows, base = tally.rows, tally.base
    summary: dict[str, Any] = {
        "definition": (
            "CLM@a: fraction of concept maps (top concepts of each image) whose top a/12 of the visible pixels "
            "include any pixel of the annotated boxes; precision: fraction of those pixels inside the boxes; "
            "coverage: fraction of the boxes' pixels among them (a uniformly random map gives a/12)"
        ),
        "alphas": [float(a) for a in alphas],
        "visible_area": (
            "maps are read back into original pixels through the bundle's preprocessing; pixels the centre crop "
            f"cut away are not ranked; a box counts when at least {min_visible:.0%} of it is visible, and then only "
            "its visible part"
        ),
        "min_visible": min_visible,
        "n_images_with_boxes": n_with_boxes,
        "n_images_used": sum(1 for e in per_image if e.get("hits")),
        "boxes": tally.counts,
        "mean_box_area_fraction": round(float(np.mean(tally.area_fraction)), 4) if tally.area_fraction else None,
        **_mean(rows, alphas),
    }
    summary["baselines"] = {
        "uniform_random": {**_mean(base["uniform_random"], alphas), "what": "exact expectation, i.i.d. pixel values"},
        "random_smooth": {
            **_mean(base["random_smooth"], alphas),
            "what": f"{n_random} seeded noise maps per image at the maps' grid resolution, upsampled",
        },
        "centre": {**_mean(base["centre"], alphas), "what": "a map peaking at the centre of the model input"},
        "shuffled": {**_mean(base["shuffled"], alphas), "what": "the same concept rank's map of another image"},
    }
    summary["by_concept"] = {cid: _mean([r for r in rows if r["concept"] == cid], alphas)
                             for cid in sorted({r["concept"] for r in rows})}  # fmt: skip
    summary["by_direction"] = {
        d: _mean([r for r in rows if r["direction"] == d], alphas)
        for d in ("present", "absent")
        if any(r["direction"] == d for r in rows)
    }
    return summary
