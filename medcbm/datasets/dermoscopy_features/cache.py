# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The CSV cache of measurements that :func:`.isic2017_manifest.isic2017_records` keeps.

One row per image, keyed by the SHA-256 of the image bytes and :data:`~.constants.MEASURE_VERSION`: a
changed file or a changed algorithm is measured again; a damaged row or file is ignored, never fatal.
The file is replaced atomically (:func:`medcbm.io.atomic.atomic_open`).
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .constants import MEASURE_KEYS, MEASURE_VERSION
from .thresholds import _truthy

#: File name of the cache inside the cache folder.
CACHE_FILE = "isic2017_abcd.csv"

#: What is cached of each :func:`.abcd.measure_abcd` result.
_CACHED_MEASURES = (*MEASURE_KEYS, "skin_lightness", "segmentation_ok")

_CACHE_FIELDS = ("sha256", "image_id", "measure_version", *_CACHED_MEASURES)


def _default_cache_dir() -> Path:
    """``~/.cache/medcbm``."""
    return Path(os.path.expanduser("~")) / ".cache" / "medcbm"


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The cached measurements of the current :data:`~.constants.MEASURE_VERSION`.

    Args:
        path: the cache file (absent: empty cache).

    Returns:
        image SHA-256 -> measures (floats and the bool ``segmentation_ok``). Rows of another version or
        with a missing or unreadable value are left out; an unreadable file gives an empty cache and a
        warning (attributed to the caller of :func:`.isic2017_manifest.isic2017_records`).
    """
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("measure_version") != MEASURE_VERSION or not row.get("sha256"):
                    continue
                try:
                    m: dict[str, Any] = {k: float(row[k]) for k in (*MEASURE_KEYS, "skin_lightness")}
                except (KeyError, TypeError, ValueError):
                    continue  # a damaged or older row: measure again
                m["segmentation_ok"] = _truthy(row.get("segmentation_ok"))
                out[row["sha256"]] = m
    except (OSError, csv.Error) as e:
        warnings.warn(f"ignoring unreadable measurement cache {path}: {e}", stacklevel=3)
        return {}
    return out


def _cache_rows(cache: Mapping[str, Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> Iterator[dict]:
    """The rows of the cache file, sorted by image hash.

    Args:
        cache: image SHA-256 -> cached measures (also of images not in ``records``).
        records: the manifest rows, which name the image of each hash (``""`` for hashes they lack).

    Yields:
        the measures with ``sha256``, ``image_id`` and ``measure_version``.
    """
    by_sha = {r["sha256"]: r for r in records}
    for sha in sorted(cache):
        yield {
            **cache[sha],
            "sha256": sha,
            "image_id": by_sha.get(sha, {}).get("image_id", ""),
            "measure_version": MEASURE_VERSION,
        }


def _write_cache(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace the cache file at ``path`` with ``rows`` atomically (``segmentation_ok`` written as 0 / 1).

    Args:
        path: the cache file (parent folders are created).
        rows: from :func:`_cache_rows`.
    """
    from medcbm.io.atomic import atomic_open  # lazy: medcbm.io loads MONAI's image readers

    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(_CACHE_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (int(bool(row[k])) if k == "segmentation_ok" else row[k]) for k in _CACHE_FIELDS})
