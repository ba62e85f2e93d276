# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""PneumoniaMNIST (balanced subset, 28x28, CC BY 4.0) as extra training images for the X-ray backbone.

The arrays are written once as PNG files under a cache folder (atomically), so they flow through the
same readers as every other image. ``pneumonia`` maps to ``abnormal`` with the concept labels NIH's
``Pneumonia`` finding implies; ``normal`` has every concept absent.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .nih_cxr14 import finding_concepts
from .paths import resolve_dataset_dir

__all__ = ["pneumoniamnist_records"]


def pneumoniamnist_records(
    root: str | os.PathLike[str] | None = None,
    splits: Sequence[str] = ("train",),
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """Records (``image``, ``label``, ``split``, concept columns) of the staged PneumoniaMNIST subset."""
    folder = resolve_dataset_dir(root, "pneumoniamnist_balanced")
    arrays = np.load(folder / "pneumoniamnist_balanced.npz")
    out_dir = (
        Path(cache_dir or Path(os.environ.get("MEDCBM_CACHE", Path.home() / ".cache" / "medcbm"))) / "pneumoniamnist"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for split in splits:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].ravel()
        for i, (img, lab) in enumerate(zip(images, labels)):
            path = out_dir / f"{split}_{i:05d}.png"
            if not path.is_file():
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                tmp = path.with_suffix(".png.tmp")
                tmp.write_bytes(buf.getvalue())
                tmp.replace(path)
            pneumonia = bool(lab)
            records.append(
                {
                    "image": str(path),
                    "label": "abnormal" if pneumonia else "normal",
                    "split": split,
                    "dataset": "pneumoniamnist",
                    **finding_concepts(["Pneumonia"] if pneumonia else []),
                }
            )
    return records
