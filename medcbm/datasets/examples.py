# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The real example images each bundle ships (``bundles/<b>/examples/``), chosen by a fixed rule.

Rule: from the dataset's held-out **test** split (never used for fitting or model selection), for each
class in the bundle's class order, the first :data:`PER_CLASS` images sorted by image id. Files are
copied byte for byte (their sha256 is the one in the dataset's ``labels.csv``) and renamed
``<class>_<n><suffix>``, so no source identifier appears in outputs. Rebuild with::

    python -m medcbm.datasets.examples [--root ../shared/data] [bundle ...]
"""

from __future__ import annotations

import argparse
import hashlib
import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_bytes, atomic_write_text
from .paths import read_labels_csv, resolve_dataset_dir

__all__ = ["ExampleSource", "EXAMPLE_SOURCES", "PER_CLASS", "select_examples", "write_examples"]

PER_CLASS = 2
_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ExampleSource:
    """Where a bundle's examples come from and how they are licensed.

    Attributes:
        dataset: folder under the shared data root.
        split: the held-out test split's name in ``labels.csv``.
        label_column: the class column; ``label_map`` turns its values into the bundle's class names.
        classes: the bundle's classes, in its order.
        licence: one line: licence and what it asks for.
        attribution: who made the data (and where it comes from).
        citation: the reference to cite.
        list_source_ids: name each source image in the LICENSE note (off where ids encode patient numbers).
    """

    dataset: str
    split: str
    label_column: str
    label_map: tuple[tuple[str, str], ...]
    classes: tuple[str, ...]
    licence: str
    attribution: str
    citation: str
    list_source_ids: bool = True


EXAMPLE_SOURCES: dict[str, ExampleSource] = {
    "blood_cbm": ExampleSource(
        dataset="pbc_wbcatt",
        split="test",
        label_column="label",
        label_map=tuple(
            (c.capitalize(), c) for c in ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
        ),
        classes=("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"),
        licence="CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); copied unchanged",
        attribution="PBC dataset (Hospital Clinic of Barcelona; Acevedo et al.), images as split by WBCAtt "
        "(Tsutsui et al.), via github.com/AuralinACC/Blood-Cell-Classification",
        citation="Acevedo A, Merino A, Alferez S, Molina A, Boldu L, Rodellar J. A dataset of microscopic "
        "peripheral blood cell images for development of automatic recognition systems. Data in Brief 30, "
        "105474 (2020). doi:10.1016/j.dib.2020.105474",
    ),
    "cxr_cbm": ExampleSource(
        dataset="nih_cxr14_nih1000_64px",
        split="test",
        label_column="label_abnormal",
        label_map=(("0", "normal"), ("1", "abnormal")),
        classes=("normal", "abnormal"),
        licence="NIH ChestX-ray14 terms: usage unrestricted, with a link to "
        "https://nihcc.app.box.com/v/ChestXray-NIHCC, acknowledgement of the NIH Clinical Center and the "
        "citation below; 64x64 PNG copied unchanged",
        attribution="NIH Clinical Center, ChestX-ray14 (64x64 copies from github.com/dinbe0527/kcr2019d1)",
        citation="Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale Chest X-ray "
        "Database and Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax Diseases. "
        "IEEE CVPR 2017, pp. 3462-3471",
        list_source_ids=False,  # NIH image indices begin with the dataset's patient number
    ),
    "derm_cbm": ExampleSource(
        dataset="isic2017_256",
        split="val",  # ISIC 2017's validation set is medcbm's held-out test split (medcbm.datasets.dermoscopy_features)
        label_column="diagnosis",
        label_map=(("nevus", "nevus"), ("melanoma", "melanoma"), ("seborrheic_keratosis", "seborrheic_keratosis")),
        classes=("nevus", "melanoma", "seborrheic_keratosis"),
        licence="CC-0 (https://creativecommons.org/publicdomain/zero/1.0/); 256x256 JPEG copied unchanged",
        attribution="International Skin Imaging Collaboration (ISIC) 2017 challenge, validation set "
        "(256x256 copies from github.com/walidbousseta/image_mining)",
        citation="Codella N, Gutman D, Celebi ME, et al. Skin Lesion Analysis Toward Melanoma Detection: A "
        "Challenge at the 2017 ISBI, Hosted by the International Skin Imaging Collaboration (ISIC). "
        "arXiv:1710.05006 (requested by ISIC, not required by CC-0)",
    ),
}


def select_examples(bundle: str, root: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The examples the rule picks for ``bundle``: per class, the first :data:`PER_CLASS` test images by id.

    Returns:
        Rows with ``image`` (the shipped file name), ``label``, ``sha256``, ``source`` (absolute source
        path), ``source_id`` (the dataset's image id) and ``split``; in class order.

    Raises:
        FileNotFoundError: the dataset is not in the shared data root.
        ValueError: a class has no test image.
    """
    spec = EXAMPLE_SOURCES[bundle]
    folder = resolve_dataset_dir(root, spec.dataset)
    mapping = dict(spec.label_map)
    rows = [r for r in read_labels_csv(folder) if r["split"].strip() == spec.split]
    out: list[dict[str, Any]] = []
    for cls in spec.classes:
        mine = sorted(
            (r for r in rows if mapping.get(r[spec.label_column].strip()) == cls), key=lambda r: r["image_id"]
        )
        if not mine:
            raise ValueError(f"{folder / 'labels.csv'}: no {spec.split} image of class {cls!r}")
        for n, r in enumerate(mine[:PER_CLASS], start=1):
            src = folder / r["file"]
            out.append(
                {
                    "image": f"{cls}_{n}{''.join(Path(r['file']).suffixes).lower()}",
                    "label": cls,
                    "sha256": r["sha256"],
                    "source": src,
                    "source_id": r["image_id"],
                    "split": spec.split,
                }
            )
    return out


def _licence_note(bundle: str, rows: list[dict[str, Any]]) -> str:
    spec = EXAMPLE_SOURCES[bundle]
    lines = [
        f"Example images of {bundle} ({len(rows)} files listed in examples.csv)",
        "",
        "These are real, de-identified images from a public dataset; they are NOT covered by the bundle's",
        "own LICENSE.",
        "",
        f"Source: {spec.attribution}",
        f"Licence: {spec.licence}",
        f"Citation: {spec.citation}",
        "",
        f"Selection (medcbm.datasets.examples): from the held-out test split ('{spec.split}' in the dataset's",
        f"labels.csv; never used for fitting or model selection), per class the first {PER_CLASS} images sorted",
        "by image id. Files are byte-identical to the source (sha256 in examples.csv) and renamed <class>_<n>.",
    ]
    if spec.list_source_ids:
        lines += ["", "Source image ids:"] + [f"  {r['image']}: {r['source_id']}" for r in rows]
    else:
        lines += ["", "Source image ids are not listed: they begin with the dataset's patient numbers; the sha256",
                  "in examples.csv identifies each file in the dataset's labels.csv."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_examples(
    bundle: str, out_dir: str | os.PathLike[str] | None = None, root: str | os.PathLike[str] | None = None
) -> Path:
    """Copy the selected examples into ``out_dir`` (default ``bundles/<bundle>/examples``) with
    ``examples.csv`` (``image``, ``label``, ``sha256``; paths relative to the CSV) and ``LICENSE``.

    Returns:
        The path of ``examples.csv``.
    """
    rows = select_examples(bundle, root)
    out = Path(out_dir) if out_dir is not None else _REPO / "bundles" / bundle / "examples"
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        data = Path(r["source"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != r["sha256"]:
            raise ValueError(f"{r['source']}: sha256 differs from the dataset's labels.csv; not copied")
        atomic_write_bytes(out / r["image"], data)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "label", "sha256"], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    for name, text in (("examples.csv", buf.getvalue()), ("LICENSE", _licence_note(bundle, rows))):
        atomic_write_text(out / name, text)
    return out / "examples.csv"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="*", default=sorted(EXAMPLE_SOURCES))
    ap.add_argument("--root", default=None, help="shared data root (default: MEDCBM_SHARED_DATA or ../shared/data)")
    args = ap.parse_args(argv)
    for b in args.bundles:
        print(write_examples(b, root=args.root))


if __name__ == "__main__":
    main()
