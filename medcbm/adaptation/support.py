# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The labelled support set of an adaptation: a CSV (``image``, ``label``) checked against the bundle's classes
before any image is read, with one-line reasons that name the CSV (and the sibling bundle a CSV was made for)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import InputRecord, list_inputs
from ..errors import MedcbmUserError, listing
from ..io.errors import FileReasonError
from ..io.files import regular_file_sha256
from ..options import is_unset

__all__ = ["SupportSet", "SupportSetError", "read_support_set"]


class SupportSetError(MedcbmUserError, ValueError):
    """The support set cannot be used; the message names the CSV and the reason."""


def _norm(label: str) -> str:
    return " ".join(label.strip().lower().replace("_", " ").split())


def _sibling_bundle_classes(bundle_root: Path) -> dict[str, tuple[str, ...]]:
    """Classes of the bundles installed next to this one, from their ``metadata.json`` (no table of names: a
    bundle's classes come from the bundle)."""
    out: dict[str, tuple[str, ...]] = {}
    try:
        siblings = sorted(p for p in bundle_root.resolve().parent.iterdir() if p.is_dir())
    except OSError:
        siblings = []
    for folder in siblings:
        meta = folder / "configs" / "metadata.json"
        try:
            data = json.loads(meta.read_text())
            chans = data["network_data_format"]["outputs"]["pred"]["channel_def"]
            out[folder.name] = tuple(str(chans[k]) for k in sorted(chans, key=int))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def _other_bundle(labels: set[str], own_name: str, own_classes: Sequence[str], bundle_root: Path) -> str | None:
    """The bundle whose classes include every (normalised) label, when it is not this one."""
    own = {_norm(c) for c in own_classes}
    for name, classes in _sibling_bundle_classes(bundle_root).items():
        theirs = {_norm(c) for c in classes}
        if name != own_name and theirs != own and labels <= theirs:
            return name
    return None


@dataclass
class SupportSet:
    """The labelled support images, checked against the bundle.

    Attributes:
        csv: the support CSV as given.
        records: one :class:`~medcbm.data.InputRecord` per row, in CSV order.
        labels: ``(n,)`` class indices in the bundle's class order.
        k_per_class: class name -> number of support images (0 for a missing class).
        missing_classes: bundle classes without a support image.
        csv_sha256: sha256 of the CSV file's bytes.
    """

    csv: str
    records: list[InputRecord]
    labels: np.ndarray
    k_per_class: dict[str, int]
    missing_classes: list[str]
    csv_sha256: str
    warnings: list[str] = field(default_factory=list)


def read_support_set(
    support: str | Path | None,
    class_names: Sequence[str],
    bundle_name: str = "this bundle",
    bundle_root: str | Path = ".",
) -> SupportSet:
    """List and check a support CSV (columns ``image``, ``label``) before any image is read.

    Args:
        support: the CSV path.
        class_names: the bundle's classes (labels are matched case-insensitively; ``_`` equals a space).
        bundle_name, bundle_root: for the messages, and to recognise a CSV made for a sibling bundle.

    Raises:
        SupportSetError: no CSV given, not a CSV, no rows (k = 0), no ``label`` column or an empty label,
            labels that are not the bundle's classes (saying which other bundle they belong to, if any),
            or the same image file on two rows. The message names the CSV and the reason.
    """
    if is_unset(support):
        raise SupportSetError(
            "no support set or site sample given: pass --support SUPPORT.csv (columns image,label: a few labelled "
            "images per class) and/or --site_images FOLDER_OR_CSV (unlabelled images of the site, 30 or more)"
        )
    given = str(support)
    path = Path(given).expanduser()
    if path.is_dir() or path.suffix.lower() != ".csv":
        raise SupportSetError(
            f"{given}: the support set must be a CSV file with columns image,label (a folder or image has no labels)"
        )
    try:
        records = list_inputs(path)
    except FileReasonError as e:
        if "no rows" in e.reason or "is empty" in e.reason:
            raise SupportSetError(
                f"{given}: the support set has no rows (k = 0); list at least one labelled image per class"
            ) from None
        raise SupportSetError(f"{given}: {e.reason}") from None
    unlabelled = [r.image for r in records if not r.label]
    if len(unlabelled) == len(records):
        raise SupportSetError(
            f"{given}: no labels; the support CSV needs a 'label' column with one of {list(class_names)}"
        )
    if unlabelled:
        raise SupportSetError(f"{given}: {len(unlabelled)} rows have no label: {listing(unlabelled)}")

    index = {_norm(c): i for i, c in enumerate(class_names)}
    unknown = sorted({r.label for r in records if _norm(r.label or "") not in index})
    if unknown:
        other = _other_bundle({_norm(u) for u in unknown}, bundle_name, class_names, Path(bundle_root))
        if other is not None and len(unknown) == len({r.label for r in records}):
            raise SupportSetError(
                f"{given}: this looks like a support set for {other} (its labels {listing(unknown)} are {other}'s "
                f"classes), not for {bundle_name}, whose classes are {list(class_names)}"
            )
        raise SupportSetError(
            f"{given}: labels not among {bundle_name}'s classes: {listing(unknown)} "
            f"(expected one of {list(class_names)}, matched case-insensitively)"
        )

    seen: dict[str, str] = {}
    dupes = []
    for r in records:
        key = str(r.path)
        if key in seen:
            dupes.append(f"{r.image} (same file as {seen[key]})" if seen[key] != r.image else r.image)
        else:
            seen[key] = r.image
    if dupes:
        raise SupportSetError(
            f"{given}: the same image is listed more than once: {listing(dupes)}; each support image must appear once"
        )

    labels = np.array([index[_norm(r.label or "")] for r in records], dtype=np.int64)
    counts = Counter(labels.tolist())
    k_per_class = {c: int(counts.get(i, 0)) for i, c in enumerate(class_names)}
    missing = [c for c, n in k_per_class.items() if n == 0]
    return SupportSet(given, records, labels, k_per_class, missing, regular_file_sha256(path))
