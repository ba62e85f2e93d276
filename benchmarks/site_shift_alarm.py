# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""How well the site-shift alarm separates the training site from other images. Prints JSON.

    python benchmarks/site_shift_alarm.py [--out benchmarks/results/site_shift_alarm.json]

For each bundle, through the prediction engine (the scores and flags ``predictions.csv`` carries):
- the fraction of the bundle's own held-out test images flagged (the false-alarm rate at the source site);
- for blood_cbm, the AUROC of ``shift_score`` between PBC test and ``bccd_wbc_dev`` (another laboratory) and
  the fraction of ``bccd_wbc_dev`` flagged;
- whether blank (black, white), noise and wrong-modality images (the other bundles' test images) are flagged.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common import BUNDLES, REPO

from medcbm.bundle import LoadedBundle
from medcbm.datasets.paths import shared_data_root
from medcbm.engine import PredictionEngine
from medcbm.metrics import auroc
from medcbm.datasets.bccd_wbc import bccd_wbc_dev_records
from medcbm.pretrain import dataset_records

FOREIGN_PER_BUNDLE = 20


def _test_images(bundle: str) -> list[str]:
    spec = BUNDLES[bundle]
    return [r["image"] for r in dataset_records(spec["dataset"], **spec["dataset_args"]) if r["split"] == "test"]


def _scores(engine: PredictionEngine, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    s, f = [], []
    for res in engine.iter_batches(paths):
        if res.ok:
            s.append(res.shift_score)
            flag = res.shift_flag.copy()
            f.append(flag)
    return np.concatenate(s), np.concatenate(f)


def _odd_images(folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = {
        "black": np.zeros((256, 256, 3), np.uint8),
        "white": np.full((256, 256, 3), 255, np.uint8),
        "uniform_noise": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "gaussian_noise": rng.normal(128, 40, (256, 256, 3)).clip(0, 255).astype(np.uint8),
    }
    paths = {}
    for name, arr in out.items():
        p = folder / f"{name}.png"
        Image.fromarray(arr).save(p)
        paths[name] = str(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if shared_data_root() is None:
        sys.exit("../shared/data not found (set MEDCBM_SHARED_DATA)")
    result: dict = {"bundles": {}}
    tests = {b: _test_images(b) for b in BUNDLES}
    with tempfile.TemporaryDirectory() as td:
        odd = _odd_images(Path(td))
        for name in BUNDLES:
            bundle = LoadedBundle.load(REPO / "bundles" / name)
            engine = PredictionEngine(bundle, batch_size=32, progress=False)
            if engine.shift_detector is None:
                result["bundles"][name] = {"available": False}
                continue
            src_s, src_f = _scores(engine, tests[name])
            entry: dict = {"source_test_n": len(src_s), "source_test_flagged": round(float(src_f.mean()), 4)}
            _, odd_f = _scores(engine, list(odd.values()))
            entry["odd_images_flagged"] = {k: bool(v) for k, v in zip(odd, odd_f)}
            for other in BUNDLES:
                if other != name:
                    _, f = _scores(engine, tests[other][:FOREIGN_PER_BUNDLE])
                    entry[f"wrong_modality_{other}_flagged"] = round(float(f.mean()), 4)
            if name == "blood_cbm":
                bccd = [r["image"] for r in bccd_wbc_dev_records()]
                t_s, t_f = _scores(engine, bccd)
                y = np.r_[np.zeros(len(src_s)), np.ones(len(t_s))]
                entry["bccd_wbc_dev"] = {
                    "n": len(t_s),
                    "flagged": round(float(t_f.mean()), 4),
                    "auroc_source_test_vs_bccd": round(float(auroc(y, np.r_[src_s, t_s])), 4),
                }
            result["bundles"][name] = entry
            print(json.dumps({name: entry}), file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
