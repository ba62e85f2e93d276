# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Shared pieces of the benchmark scripts: cached features of a bundle backbone over a staged dataset, the
bundle runner's command line, ``NAME=DIR`` options and generated doc blocks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from medcbm.backbones import load_backbone  # noqa: E402
from medcbm.concepts import load_concept_bank  # noqa: E402
from medcbm.engine import extract_features  # noqa: E402
from medcbm.features import FeatureCache, default_cache_dir  # noqa: E402
from medcbm.pretrain import dataset_records, records_to_arrays  # noqa: E402
from medcbm.bundle import Preprocessing  # noqa: E402

#: Per bundle: the dataset of its train / val / test splits, more training images (``extra_train``: their
#: train split, as the bundle's fit used them), the held-out test set when it is another dataset
#: (``test``), and further held-out sets reported beside it (``extra_tests``); each set is
#: ``(dataset_records name, kwargs)``.
BUNDLES = {
    "blood_cbm": {"dataset": "pbc_wbcatt", "dataset_args": {"include_extra": True}, "channel_mode": "rgb"},
    "cxr_cbm": {
        "dataset": "nih_cxr14_256",
        "dataset_args": {},
        "channel_mode": "grey",
        "extra_train": [("nih_cxr14", {"splits": ["train"]})],
        "extra_tests": {"nih_cxr14_64px_test": ("nih_cxr14", {"splits": ["test"]})},
    },
    "derm_cbm": {
        "dataset": "isic2017",
        "dataset_args": {},
        "channel_mode": "rgb",
        "test": ("isic2017_test", {}),
        "extra_tests": {"isic2017_official_val": ("isic2017", {"splits": ["test"]})},
    },
}


def bundle_records(bundle: str) -> dict[str, list[dict]]:
    """Records per split (``train``, ``val``, ``test``) and per extra test set of a bundle's evaluation."""
    spec = BUNDLES[bundle]
    records = dataset_records(spec["dataset"], **spec["dataset_args"])
    out = {s: [r for r in records if r["split"] == s] for s in ("train", "val", "test")}
    for name, kwargs in spec.get("extra_train", []):
        out["train"] += [r for r in dataset_records(name, **kwargs) if r["split"] == "train"]
    if "test" in spec:
        out["test"] = dataset_records(spec["test"][0], **spec["test"][1])
    seen = {r["patient_id"] for r in out["train"] + out["val"] if r.get("patient_id")}
    for key, (name, kwargs) in spec.get("extra_tests", {}).items():
        # another dataset's test split may hold patients of this training data (NIH 64 px vs 256 px): drop them
        out[key] = [r for r in dataset_records(name, **kwargs) if r.get("patient_id") not in seen]
    return out


def bundle_split_features(bundle: str, backbone: str | None = None, cache_dir: str | None = None) -> dict:
    """Features, class indices and concept labels per split for a bundle's dataset and backbone."""
    spec = BUNDLES[bundle]
    bank = load_concept_bank(REPO / "bundles" / bundle / "configs" / "concepts.yaml")
    bk = load_backbone(backbone or f"local-dir:{REPO / 'bundles' / bundle / 'models' / 'backbone'}")
    # the backbone's own preprocessing config (size, normalisation, resize mode), as the bundle uses it
    pipe = Preprocessing.from_backbone(bk, spec["channel_mode"]).pipeline()
    cache = FeatureCache(cache_dir or default_cache_dir(), bk.fingerprint, pipe.fingerprint())
    out = {"bank": bank, "backbone": bk, "splits": {}}
    for split, recs in bundle_records(bundle).items():
        res = extract_features([r["image"] for r in recs], bk.image_encoder(), pipe, cache)
        if res.errors:
            raise RuntimeError(f"unreadable images in {bundle}/{split}: {res.errors}")
        y, c = records_to_arrays(recs, bank)
        out["splits"][split] = {"X": res.features, "y": y, "C": c, "records": recs}
    out["cache"] = {"hits": cache.hits, "misses": cache.misses}
    return out


def merge_results(path: str | Path, results: dict) -> dict:
    """Write ``results`` (one entry per bundle) into the JSON file at ``path``, keeping the bundles already there."""
    import json

    path = Path(path)
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(results)
    merged = {b: merged[b] for b in sorted(merged)}
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def nan_safe(x):
    if isinstance(x, dict):
        return {k: nan_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if np.isnan(x) else round(float(x), 4)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_doc_block(doc: Path, begin: str, end: str, block: str, check: bool) -> int:
    """Replace the ``begin``...``end`` block of ``doc`` with ``block`` (which carries both markers); with
    ``check``, write nothing and return 1 if the block is out of date."""
    text = doc.read_text()
    start = text.index(begin)
    stop = text.index(end, start) + len(end)
    new = text[:start] + block + text[stop:]
    if check:
        return 0 if new == text else 1
    doc.write_text(new)
    return 0


def bundle_run_command(bundle: str, config: str, *args: str) -> list[str]:
    """``python -m monai.bundle run`` for ``bundles/<bundle>/configs/<config>`` (run from the repository root)."""
    b = f"bundles/{bundle}"
    return [
        sys.executable, "-m", "monai.bundle", "run", "--bundle_root", b,
        "--config_file", f"{b}/configs/{config}", "--meta_file", f"{b}/configs/metadata.json", *args,
    ]  # fmt: skip


def name_dir_pairs(items: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` command-line values as ``{name: Path(dir)}``; exits with the bad value otherwise."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"expected NAME=DIR, got {item!r}")
        out[name] = Path(path)
    return out
