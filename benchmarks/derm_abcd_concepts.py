# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Sanity check of the measured ABCD concepts on ISIC 2017; prints JSON.

For each measured concept (``MEASURED_CONCEPTS``: the ABCD measures and the structure measures):
prevalence in the carved train split, the positive rate per class in train and in the held-out test
split (thresholds fitted on train only), whether the per-class rates agree with the derm concept bank's
prior (a +1 class should show the concept more often than a -1 class), and the AUC of the underlying
continuous measure for melanoma vs nevus and for seborrheic keratosis vs the other two classes.

Concepts whose prior has a +1 class but no -1 class (e.g. ``milia_like_cysts``: +1 for seborrheic
keratosis only) have no such check; for them ``prior_checks_vs_unspecified`` compares the +1 class with
each class of prior 0 (weaker: 0 means "not specific", not "absent"), counted separately in
``prior_agreement_vs_unspecified``.

Usage::

    python benchmarks/derm_abcd_concepts.py [--root DATA] [--cache-dir DIR] [--val-fraction 0.15] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from medcbm.concepts import load_concept_bank  # noqa: E402
from medcbm.metrics import auroc  # noqa: E402
from medcbm.datasets.dermoscopy_features import (  # noqa: E402
    ISIC2017_CLASSES,
    MEASURE_KEYS,
    MEASURED_CONCEPTS,
    isic2017_records,
)

__all__ = ["main", "summarise"]

BANK = REPO / "bundles" / "derm_cbm" / "configs" / "concepts.yaml"


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC of positives scoring above negatives (ties count half)."""
    return auroc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.concatenate([pos, neg]))


def _rate(records: Sequence[dict[str, Any]], cid: str) -> tuple[float, int]:
    vals = np.array([r[cid] for r in records], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    return (float(vals.mean()) if vals.size else float("nan")), int(vals.size)


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _mean(records: Sequence[dict[str, Any]], key: str) -> float:
    """Mean of the finite values of ``key`` (NaN marks a measure that could not be computed)."""
    vals = [float(r[key]) for r in records if _finite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def _r(x: float, nd: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def summarise(records: Sequence[dict[str, Any]], thresholds: dict[str, float]) -> dict[str, Any]:
    """The JSON summary for ``records`` from :func:`isic2017_records` (all splits)."""
    bank = load_concept_bank(BANK)
    by = {
        (s, c): [r for r in records if r["split"] == s and r["label"] == c]
        for s in ("train", "val", "test")
        for c in ISIC2017_CLASSES
    }
    train = [r for r in records if r["split"] == "train"]
    concepts: dict[str, Any] = {}
    agree = total = soft_agree = soft_total = 0
    for cid, key in MEASURED_CONCEPTS.items():
        rates = {c: _rate(by[("train", c)], cid)[0] for c in ISIC2017_CLASSES}
        rates_test = {c: _rate(by[("test", c)], cid)[0] for c in ISIC2017_CLASSES}
        k = bank.concept_ids.index(cid)
        prior = {c: int(bank.prior[bank.class_index(c), k]) for c in ISIC2017_CLASSES}
        checks = []
        for cp in ISIC2017_CLASSES:
            for cn in ISIC2017_CLASSES:
                if prior[cp] == 1 and prior[cn] == -1:
                    ok = rates[cp] > rates[cn]
                    checks.append({"more_in": cp, "than_in": cn, "ok": bool(ok)})
                    agree += int(ok)
                    total += 1
        soft = []
        if not checks and any(v == 1 for v in prior.values()):
            for cp in ISIC2017_CLASSES:
                for cn in ISIC2017_CLASSES:
                    if prior[cp] == 1 and prior[cn] == 0:
                        ok = rates[cp] > rates[cn]
                        soft.append({"more_in": cp, "than_in": cn, "ok": bool(ok)})
                        soft_agree += int(ok)
                        soft_total += 1
        train_values = {
            c: np.array([r[key] for r in by[("train", c)] if _finite(r[key])], dtype=np.float64)
            for c in ISIC2017_CLASSES
        }
        mel, nev, sk = train_values["melanoma"], train_values["nevus"], train_values["seborrheic_keratosis"]
        concepts[cid] = {
            "measure": key,
            "threshold": _r(thresholds[key], 4),
            "prevalence_train": _r(_rate(train, cid)[0]),
            "rate_train": {c: _r(v) for c, v in rates.items()},
            "rate_test": {c: _r(v) for c, v in rates_test.items()},
            "prior": prior,
            "prior_checks": checks,
            "prior_checks_vs_unspecified": soft,
            "auc_melanoma_vs_nevus_train": _r(_auc(mel, nev)),
            "auc_seborrheic_keratosis_vs_rest_train": _r(_auc(sk, np.concatenate([mel, nev]))),
        }
    means = {key: {c: _r(_mean(by[("train", c)], key), 4) for c in ISIC2017_CLASSES} for key in MEASURE_KEYS}
    counts = {s: {c: len(by[(s, c)]) for c in ISIC2017_CLASSES} for s in ("train", "val", "test")}
    seg_ok = float(np.mean([bool(r["segmentation_ok"]) for r in records]))
    return {
        "dataset": "isic2017_256",
        "counts": counts,
        "segmentation_ok_rate": _r(seg_ok),
        "prior_agreement": {"agree": agree, "total": total},
        "prior_agreement_vs_unspecified": {"agree": soft_agree, "total": soft_total},
        "concepts": concepts,
        "measure_means_train": means,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="shared data root or the isic2017_256 folder")
    ap.add_argument("--cache-dir", default=None, help="measurement cache folder (default ~/.cache/medcbm)")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    t0 = time.perf_counter()
    records, thresholds = isic2017_records(
        root=args.root,
        cache_dir=args.cache_dir,
        val_fraction=args.val_fraction,
        seed=args.seed,
        return_thresholds=True,
    )
    out = summarise(records, thresholds)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
