# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The ISIC 2017 manifest: train / carved val / held-out test records with measured and expert concept labels.

:func:`isic2017_records` reads ``labels.csv``, drops byte-identical duplicates, carves the validation split,
measures every image once (:func:`.abcd.measure_abcd`, cached by :mod:`.cache`), fits the concept
thresholds on the carved training part (:mod:`.thresholds`) and attaches the expert structure labels of
:mod:`medcbm.datasets.isic2017_features`.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .abcd import measure_abcd
from .cache import _CACHED_MEASURES, CACHE_FILE, _cache_rows, _default_cache_dir, _read_cache, _write_cache
from .constants import ISIC2017_CLASSES
from .thresholds import _finite, abcd_concept_labels, fit_abcd_thresholds

__all__ = ["isic2017_records"]

# The package's logger (the name these messages had before the package was split into modules).
_log = logging.getLogger(__package__)


def _resolve_isic_root(root: str | os.PathLike | None) -> Path:
    """The ``isic2017_256`` folder: ``root`` itself or below it, default under the shared data root."""
    from medcbm.datasets.paths import resolve_dataset_dir  # lazy: keeps this module importable alone

    return resolve_dataset_dir(root, "isic2017_256")


def _load_rgb(path: Path) -> np.ndarray:
    """The image at ``path`` as a uint8 (H, W, 3) RGB array."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _attach_expert_labels(base: list[dict[str, Any]], data_root: Path, folder: str | os.PathLike | bool) -> None:
    """Add the expert structure concepts to each record (NaN where the table has no row)."""
    from medcbm.datasets.isic2017_features import (
        EXPERT_FEATURE_CONCEPTS,
        EXPERT_FEATURES_DIR,
        isic2017_expert_labels,
    )

    path = data_root.parent / EXPERT_FEATURES_DIR if folder is True else Path(folder)
    table: dict[str, dict[str, Any]] = {}
    if (path / "labels.csv").is_file():
        table = isic2017_expert_labels(path)
    elif folder is not True:
        raise FileNotFoundError(f"expert feature table not found: {path / 'labels.csv'}")
    else:
        _log.info("no %s next to %s: expert concepts left unlabelled", EXPERT_FEATURES_DIR, data_root)
    for b in base:
        row = table.get(b["image_id"])
        if row is not None and row["sha256"] != b["sha256"]:
            raise ValueError(
                f"{path / 'labels.csv'}: {b['image_id']} has image_sha256 {row['sha256']}, "
                f"but {b['image']} hashes to {b['sha256']}"
            )
        for concept in EXPERT_FEATURE_CONCEPTS.values():
            b[concept] = row[concept] if row is not None else float("nan")


def _carve_val(train_rows: Sequence[Mapping[str, Any]], val_fraction: float, seed: int) -> set[str]:
    """Image ids moved from the original train split to "val", stratified by class, deterministic."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    by_class: dict[str, list[str]] = {}
    for r in train_rows:
        by_class.setdefault(r["label"], []).append(r["image_id"])
    for cls in sorted(by_class):
        ids = sorted(by_class[cls])
        n_val = int(round(len(ids) * val_fraction))
        if val_fraction > 0 and len(ids) > 1:
            n_val = min(max(n_val, 1), len(ids) - 1)
        order = rng.permutation(len(ids))
        chosen.update(ids[i] for i in order[:n_val])
    return chosen


def _read_isic_labels(data_root: Path) -> list[dict[str, Any]]:
    """One record per row of ``data_root/labels.csv``, with the image hashed.

    The dataset's own ``val`` split becomes ``"test"`` (held out); every other image starts as ``"train"``.
    All rows are checked before any image is read, so a bad table fails fast.

    Args:
        data_root: the ``isic2017_256`` folder.

    Returns:
        records with ``image`` (absolute path), ``label``, ``split``, ``image_id``, ``dataset``, ``age``,
        ``sex`` and ``sha256``, in the table's order.

    Raises:
        ValueError: an unknown diagnosis or split.
        FileNotFoundError: a listed image is missing.
    """
    from medcbm.datasets.paths import sha256_file

    with open(data_root / "labels.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    base: list[dict[str, Any]] = []
    for r in rows:
        label = str(r["diagnosis"]).strip()
        if label not in ISIC2017_CLASSES:
            raise ValueError(f"{data_root / 'labels.csv'}: unknown diagnosis {label!r} for {r.get('image_id')}")
        orig = str(r["split"]).strip()
        if orig not in ("train", "val"):
            raise ValueError(f"{data_root / 'labels.csv'}: unknown split {orig!r} for {r.get('image_id')}")
        path = (data_root / r["file"]).resolve()
        base.append(
            {
                "image": str(path),
                "label": label,
                "split": "test" if orig == "val" else "train",
                "image_id": r["image_id"],
                "dataset": "isic2017_256",
                "age": float(r["age_approximate"]) if _finite(r.get("age_approximate")) else float("nan"),
                "sex": (r.get("sex") or "").strip() or "unknown",
            }
        )
    for b in base:
        if not Path(b["image"]).is_file():
            raise FileNotFoundError(f"image listed in labels.csv is missing: {b['image']}")
        b["sha256"] = sha256_file(b["image"])
    return base


def _drop_byte_identical(base: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop train images byte-identical to a test image (it would leak) or to another train image.

    Args:
        base: records with ``split``, ``image_id`` and ``sha256``.

    Returns:
        the kept records, test first, then by image id (test images are never dropped).
    """
    test_sha = {b["sha256"] for b in base if b["split"] == "test"}
    seen: set[str] = set()
    kept: list[dict[str, Any]] = []
    for b in sorted(base, key=lambda b: (b["split"] != "test", b["image_id"])):
        if b["split"] != "test" and (b["sha256"] in test_sha or b["sha256"] in seen):
            _log.info("dropping %s (%s): byte-identical to an image already kept", b["image_id"], b["split"])
            continue
        seen.add(b["sha256"])
        kept.append(b)
    return kept


def _measure_uncached(base: Sequence[dict[str, Any]], cache: dict[str, dict[str, Any]], cache_path: Path) -> None:
    """Add the measures to each record, measuring only images the cache lacks; rewrite the cache if any.

    Args:
        base: the records (updated in place with the measures of :func:`.abcd.measure_abcd`).
        cache: image SHA-256 -> cached measures, from :func:`.cache._read_cache` (updated in place).
        cache_path: the cache file, rewritten atomically when an image was measured.
    """
    new = 0
    t0 = time.perf_counter()
    for b in base:
        sha = b["sha256"]
        if sha not in cache:
            m = measure_abcd(_load_rgb(Path(b["image"])))
            cache[sha] = {k: m[k] for k in _CACHED_MEASURES}
            new += 1
            if new % 250 == 0:  # a first run measures ~2,000 images: show progress
                _log.info("measured %d images (%.1f s)", new, time.perf_counter() - t0)
        b.update(cache[sha])
    if new:
        _log.info("measured %d images in %.1f s; caching in %s", new, time.perf_counter() - t0, cache_path)
        _write_cache(cache_path, _cache_rows(cache, base))


def isic2017_records(
    root: str | os.PathLike | None = None,
    splits: Sequence[str] | str = ("train", "val", "test"),
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    return_thresholds: bool = False,
    expert_features: str | os.PathLike | bool = True,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], dict[str, float]]:
    """The ISIC 2017 manifest with measured ABCD features, measured and expert concept labels.

    Splits: the dataset's own ``val`` split (150 images) is the held-out ``"test"`` split here; ``"val"``
    (for model selection) is carved out of the original ``train`` split, stratified by class and
    deterministic in ``seed``; the rest is ``"train"``. Concept thresholds are fitted on the carved
    ``"train"`` part only, whatever ``splits`` asks for. A train image byte-identical to a test image
    (ISIC 2017 has one: ISIC_0012970 = ISIC_0012127) or to another train image is dropped.

    Measurements of all images are cached in ``cache_dir/isic2017_abcd.csv`` (default
    ``~/.cache/medcbm``), keyed by the SHA-256 of the image bytes and :data:`MEASURE_VERSION`, so a
    changed file or algorithm is re-measured; the cache is written atomically.

    Args:
        root: the folder holding ``labels.csv`` (or its parent); default
            ``medcbm.datasets.paths.shared_data_root() / "isic2017_256"``.
        splits: which of ``"train"``, ``"val"``, ``"test"`` to return.
        cache_dir: folder of the measurement cache.
        val_fraction: fraction of each class of the original train split moved to ``"val"``.
        seed: seed of the stratified carve.
        return_thresholds: also return the fitted thresholds.
        expert_features: the ``isic2017_features`` folder of expert structure labels
            (:mod:`medcbm.datasets.isic2017_features`); ``True`` looks for it next to the image folder
            (absent: the expert concepts are NaN for every image), ``False`` leaves them out.

    Returns:
        One dict per image, sorted by split then image id: ``image`` (absolute path), ``label`` (class
        name), ``split``, ``image_id``, ``sha256``, ``dataset``, ``age``, ``sex``, the measures of
        :func:`measure_abcd` and the concept labels of :data:`MEASURED_CONCEPTS` (NaN when the
        segmentation failed), and the expert concepts of
        :data:`~medcbm.datasets.isic2017_features.EXPERT_FEATURE_CONCEPTS` (NaN for images the expert
        table does not cover); with ``return_thresholds`` a ``(records, thresholds)`` tuple.

    Raises:
        ValueError: an expert label's image hash differs from the image's (names both files).
    """
    from medcbm.datasets.paths import check_splits

    wanted = check_splits(splits, ("train", "val", "test"))
    data_root = _resolve_isic_root(root)
    base = _drop_byte_identical(_read_isic_labels(data_root))
    val_ids = _carve_val([b for b in base if b["split"] == "train"], val_fraction, seed)
    for b in base:
        if b["image_id"] in val_ids:
            b["split"] = "val"

    cache_path = (Path(cache_dir) if cache_dir is not None else _default_cache_dir()) / CACHE_FILE
    cache = _read_cache(cache_path)  # called from here so that its warning names our caller
    _measure_uncached(base, cache, cache_path)
    thresholds = fit_abcd_thresholds([b for b in base if b["split"] == "train"])  # never val / test
    for b in base:
        b.update(abcd_concept_labels(b, thresholds))
    if expert_features is not False:
        _attach_expert_labels(base, data_root, expert_features)
    order = {"train": 0, "val": 1, "test": 2}
    out = sorted((b for b in base if b["split"] in wanted), key=lambda b: (order[b["split"]], b["image_id"]))
    return (out, thresholds) if return_thresholds else out
