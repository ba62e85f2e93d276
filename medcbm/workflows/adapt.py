# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Adaptation job: a few labelled images from a new site -> ``adaptation.json`` (CONTRACT.md, METHODS.md §2).

The bundle's unedited concept scores of the support images go to
:class:`~medcbm.adaptation.ConceptEditSearch`, which masks mis-activated concepts and amplifies
under-activated ones (no back-propagation, no weight change) and keeps only edits that its **source guard**
admits on the bundle's source reference set. The support set is checked before anything is computed:
labels must be the bundle's classes, every row needs a label, an image appears once, every image must be
readable; otherwise the job stops with one line naming the CSV and the reason, and writes no file. A
class with no support image is allowed: it is logged and recorded in the file.

``adaptation.json`` is written last and atomically, so it exists only when the job completed.
``adaptation_report.json`` (written just before it) adds per-image predictions before/after the edit, the
leave-one-out table and the site-shift flags of the support images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..adaptation import AdaptationSpec, ConceptEditSearch
from ..bundle import REFERENCE_FILE, LoadedBundle
from ..data import InputRecord, list_inputs
from ..engine import PredictionEngine
from ..errors import MedcbmUserError
from ..io.atomic import atomic_write_json
from ..io.errors import FileReasonError
from .cli import check_output_dir, cli_errors
from .job import BundleJob

__all__ = [
    "AdaptationRunner",
    "SupportSet",
    "SupportSetError",
    "NoReferenceSetError",
    "read_support_set",
    "KNOWN_BUNDLE_CLASSES",
    "ADAPTATION_FILE",
    "REPORT_FILE",
]

logger = logging.getLogger(__name__)

ADAPTATION_FILE = "adaptation.json"
REPORT_FILE = "adaptation_report.json"

#: The shipped bundles' classes (CONTRACT.md), to recognise a support CSV meant for another bundle even
#: when that bundle is not installed next to this one.
KNOWN_BUNDLE_CLASSES: dict[str, tuple[str, ...]] = {
    "blood_cbm": ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"),
    "cxr_cbm": ("normal", "abnormal"),
    "derm_cbm": ("nevus", "melanoma", "seborrheic_keratosis"),
}
_LIST_MAX = 5  # items named in one error line before "... and N more"


class SupportSetError(MedcbmUserError, ValueError):
    """The support set cannot be used; the message names the CSV and the reason."""


class NoReferenceSetError(MedcbmUserError, FileNotFoundError):
    """The bundle carries no source reference set, so the source guard cannot check an edit."""


def _norm(label: str) -> str:
    return " ".join(label.strip().lower().replace("_", " ").split())


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_MAX])
    return shown + (f" ... and {len(items) - _LIST_MAX} more" if len(items) > _LIST_MAX else "")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sibling_bundle_classes(bundle_root: Path) -> dict[str, tuple[str, ...]]:
    """Classes of the bundles installed next to this one (from their ``metadata.json``), then the shipped ones."""
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
    for name, classes in KNOWN_BUNDLE_CLASSES.items():
        out.setdefault(name, classes)
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
    if support in (None, "", "None"):
        raise SupportSetError(
            "no support set given: pass --support SUPPORT.csv (columns image,label: a few labelled images per class)"
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
        raise SupportSetError(f"{given}: {len(unlabelled)} rows have no label: {_listing(unlabelled)}")

    index = {_norm(c): i for i, c in enumerate(class_names)}
    unknown = sorted({r.label for r in records if _norm(r.label or "") not in index})
    if unknown:
        other = _other_bundle({_norm(u) for u in unknown}, bundle_name, class_names, Path(bundle_root))
        if other is not None and len(unknown) == len({r.label for r in records}):
            raise SupportSetError(
                f"{given}: this looks like a support set for {other} (its labels {_listing(unknown)} are {other}'s "
                f"classes), not for {bundle_name}, whose classes are {list(class_names)}"
            )
        raise SupportSetError(
            f"{given}: labels not among {bundle_name}'s classes: {_listing(unknown)} "
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
            f"{given}: the same image is listed more than once: {_listing(dupes)}; each support image must appear once"
        )

    labels = np.array([index[_norm(r.label or "")] for r in records], dtype=np.int64)
    counts = Counter(labels.tolist())
    k_per_class = {c: int(counts.get(i, 0)) for i, c in enumerate(class_names)}
    missing = [c for c, n in k_per_class.items() if n == 0]
    return SupportSet(given, records, labels, k_per_class, missing, _sha256_file(path))


class AdaptationRunner(BundleJob):
    """The ``configs/adapt.yaml`` job: support CSV -> ``adaptation.json`` (and ``adaptation_report.json``).

    Args:
        bundle_root: the bundle folder.
        output_dir: where ``adaptation.json`` goes.
        support: the support CSV (columns ``image``, ``label``).
        models_dir: a models folder written by ``train.yaml`` (default ``<bundle_root>/models``).
        device, batch_size, num_workers: as for inference.
        cache_dir: optional feature cache folder.
        gamma_max: largest gain factor; guard_tolerance: largest allowed source accuracy drop (0.005 = 0.5 points).
        progress: show a progress bar.
        exit_on_error: CLI behaviour (a user error ends in one line and exit 2); ``False`` raises instead.
        bundle: an already loaded bundle (the loading arguments are then ignored); its current edit is
            ignored: the search always starts from the unedited network.

    Example::

        spec = AdaptationRunner("bundles/blood_cbm", "adapt", "support.csv", exit_on_error=False).run()
        InferenceRunner("bundles/blood_cbm", "out", "images/", adaptation="adapt/adaptation.json").run()
    """

    def __init__(
        self,
        bundle_root: str | Path = ".",
        output_dir: str | Path = "adapt",
        support: str | Path | None = None,
        models_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str | Path | None = None,
        gamma_max: float = 3.0,
        guard_tolerance: float = 0.005,
        progress: bool = True,
        exit_on_error: bool = True,
        bundle: LoadedBundle | None = None,
    ) -> None:
        job = (bundle_root, output_dir, device, batch_size, num_workers, progress, exit_on_error, bundle)
        self._init_job(*job, models_dir=models_dir)
        self.support = support
        self.cache_dir = cache_dir
        self.gamma_max = float(gamma_max)
        self.guard_tolerance = float(guard_tolerance)
        self.report: dict[str, Any] = {}

    def run(self) -> AdaptationSpec:
        """Search and write the edit; returns the spec (CLI: exit 2 with one line on a user error)."""
        with cli_errors(exit=self.exit_on_error):
            return self._run()

    # ------------------------------------------------------------------ steps
    def _load(self) -> LoadedBundle:
        bundle = self.load_bundle()
        if bundle.info.get("fit") != "trained":
            raise NoReferenceSetError(
                f"{bundle.models_dir}: {bundle.name} is not fitted for its backbone (zero-shot head); adapt a "
                "bundle fitted with configs/train.yaml"
            )
        if bundle.reference is None:
            raise NoReferenceSetError(
                f"{bundle.models_dir / REFERENCE_FILE}: {bundle.name} carries no source reference set, so the source "
                "guard cannot check an edit; re-fit the bundle with configs/train.yaml (it writes one) and adapt again"
            )
        return bundle

    def _features(self, bundle: LoadedBundle, support: SupportSet) -> tuple[np.ndarray, list[str], int | None]:
        """Support features in CSV order, their content hashes, and how many the site-shift alarm flags."""
        engine = PredictionEngine(
            bundle,
            device=self.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            cache_dir=self.cache_dir,
            progress=self.progress,
            desc="support",
        )
        res = engine.extract_features(support.records)
        if res.errors:
            reasons = [res.errors[i] for i in sorted(res.errors)]
            raise SupportSetError(
                f"{support.csv}: {len(reasons)} of {len(support.records)} support images cannot be read: "
                f"{_listing(reasons)}; fix or remove these rows"
            )
        hashes = [res.content_sha256[i] for i in range(len(support.records))]
        first: dict[str, str] = {}
        same = []
        for rec, h in zip(support.records, hashes):
            if h in first:
                same.append(f"{rec.image} (identical content to {first[h]})")
            else:
                first[h] = rec.image
        if same:
            raise SupportSetError(
                f"{support.csv}: the same image is listed more than once: {_listing(same)}; "
                "each support image must appear once"
            )
        order = np.argsort(np.asarray(res.ok))  # rows back in CSV order
        feats = np.asarray(res.features)[order]
        flagged = int(np.sum(engine.shift_detector.flag(feats))) if engine.shift_detector is not None else None
        return feats, hashes, flagged

    def _run(self) -> AdaptationSpec:
        t0 = time.perf_counter()
        bundle = self._load()
        if bundle.adaptation is not None:
            logger.info("the search starts from the unedited network: the edit loaded with the bundle is removed")
        bundle.set_adaptation(None)
        support = read_support_set(self.support, bundle.class_names, bundle.name, bundle.root)
        out = check_output_dir(self.output_dir)
        for name in support.missing_classes:
            logger.warning(
                "class %r has no support image in %s: it is left unadapted and unchecked at this site",
                name,
                support.csv,
            )
        feats, hashes, flagged = self._features(bundle, support)
        net = bundle.network
        with torch.no_grad():
            f = torch.as_tensor(feats, dtype=torch.float32, device=self.device)
            scores = net.concept_scores_from_features(f, edited=False).double().cpu().numpy()
        ref = bundle.reference
        unlabelled = ref.unlabelled_scores(net)
        W = net.head.weight.detach().double().cpu().numpy()
        b = net.head.bias.detach().double().cpu().numpy()
        neutral = net.neutral.detach().double().cpu().numpy()
        mus = getattr(net, "source_class_means", None)
        mus = mus.detach().double().cpu().numpy() if isinstance(mus, torch.Tensor) else None
        search = ConceptEditSearch(
            gamma_max=self.gamma_max,
            guard_tolerance=self.guard_tolerance,
            class_names=bundle.class_names,
            concept_ids=bundle.concept_ids,
        ).fit(
            scores, support.labels, W, b, neutral, ref.scores, ref.labels, mus, unlabelled_reference_scores=unlabelled
        )
        spec = search.spec_
        spec.provenance = {
            "bundle": {"name": bundle.name, "version": bundle.version},
            "model_fingerprint": bundle.fingerprint(),
            "support_csv": Path(support.csv).name,
            "support_csv_sha256": support.csv_sha256,
            "support_images": {rec.image: h for rec, h in zip(support.records, hashes)},
            "k_per_class": dict(support.k_per_class),
            "reference_set": {
                "split": ref.split,
                "n": int(len(ref.labels)),
                "n_unlabelled_training_sample": int(len(unlabelled)),
            },
        }
        spec.validate(bundle.concept_ids)
        self.report = self._report(bundle, support, scores, search, spec, flagged, time.perf_counter() - t0)
        atomic_write_json(out / REPORT_FILE, self.report)
        spec.write(out / ADAPTATION_FILE)  # last: the file exists only for a completed job
        logger.info(
            "wrote %s: %d masked, %d amplified; source reference accuracy %.4f -> %.4f; support accuracy %.4f -> %.4f",
            out / ADAPTATION_FILE,
            len(spec.mask),
            len(spec.gain),
            spec.source_accuracy_before,
            spec.source_accuracy_after,
            spec.support_accuracy_before,
            spec.support_accuracy_after,
        )
        for w in spec.warnings:
            logger.warning("%s", w)
        return spec

    def _report(
        self,
        bundle: LoadedBundle,
        support: SupportSet,
        scores: np.ndarray,
        search: ConceptEditSearch,
        spec: AdaptationSpec,
        flagged: int | None,
        seconds: float,
    ) -> dict[str, Any]:
        """Per-image predictions before/after, the leave-one-out table, site-shift flags of the support."""
        names = bundle.class_names
        W = bundle.network.head.weight.detach().double().cpu().numpy()
        b = bundle.network.head.bias.detach().double().cpu().numpy()
        before = (scores @ W.T + b).argmax(1)
        after = search.predict(scores)
        images = [
            {"image": r.image, "label": names[y], "before": names[p0], "after": names[p1]}
            for r, y, p0, p1 in zip(support.records, support.labels, before, after)
        ]
        return {
            "bundle": {"name": bundle.name, "version": bundle.version},
            "adaptation": str(self.output_dir / ADAPTATION_FILE),
            "edited_concepts": spec.edited_concepts,
            "support": {"n": len(support.records), "k_per_class": support.k_per_class, "images": images},
            "leave_one_out": search.loo_,
            "support_site_shift_flagged": flagged,
            "fit_seconds": round(search.fit_seconds_, 4),
            "seconds": round(seconds, 2),
        }
