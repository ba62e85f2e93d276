# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Write a staged dataset as the bundle CSVs (``image``, ``label``, one 0/1 column per concept).

    python -m medcbm.datasets.export --dataset pbc_wbcatt --include-extra --out /tmp/blood_csv
    python -m medcbm.datasets.export --dataset nih_cxr14_256 --add-train nih_cxr14 --out /tmp/cxr_csv

writes ``train.csv``, ``val.csv`` and ``test.csv``; the train and val files feed ``configs/train.yaml``,
the test file the held-out evaluation.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path
from typing import Sequence

from ..concepts import load_concept_bank
from . import dataset_records

__all__ = ["write_split_csvs", "DATASET_BUNDLES"]

DATASET_BUNDLES = {
    "pbc_wbcatt": "blood_cbm",
    "nih_cxr14": "cxr_cbm",
    "nih_cxr14_256": "cxr_cbm",
    "isic2017": "derm_cbm",
}


def write_split_csvs(records: Sequence[dict], concept_ids: Sequence[str], out_dir: str | Path) -> dict[str, int]:
    """One CSV per split in ``records``; returns rows per split."""
    from ..io.atomic import atomic_write_text

    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    for split in sorted({r["split"] for r in records}):
        rows = [r for r in records if r["split"] == split]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image", "label", *concept_ids])
        for r in rows:
            vals = []
            for cid in concept_ids:
                v = r.get(cid)
                vals.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else int(v))
            w.writerow([r["image"], r["label"], *vals])
        atomic_write_text(out_dir / f"{split}.csv", buf.getvalue())
        counts[split] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(DATASET_BUNDLES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--include-extra", action="store_true", help="pbc_wbcatt: add pbc_wbcatt_extra to train")
    parser.add_argument(
        "--add-train",
        action="append",
        default=[],
        choices=sorted(DATASET_BUNDLES),
        help="add this dataset's train split",
    )
    args = parser.parse_args(argv)
    kwargs = {"include_extra": True} if args.include_extra else {}
    records = dataset_records(args.dataset, **kwargs)
    for extra in args.add_train:
        records += dataset_records(extra, splits=["train"])
    repo = Path(__file__).resolve().parents[2]
    bank = load_concept_bank(repo / "bundles" / DATASET_BUNDLES[args.dataset] / "configs" / "concepts.yaml")
    print(write_split_csvs(records, bank.concept_ids, args.out))


if __name__ == "__main__":
    main()
