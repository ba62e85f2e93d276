# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Adaptation job: an unlabelled site sample and/or a few labelled images -> ``adaptation.json`` (CONTRACT.md).

With ``site_images`` (a folder or CSV of the site's own images, no labels), the job first fits a per-concept
calibration of the concept scores and a label-shift logit offset (:func:`~medcbm.adaptation.site.fit_site_adaptation`,
checks in :mod:`~medcbm.workflows.site_sample`); with a support CSV the labelled edit below is then searched on the
calibrated scores. Either input alone is enough.

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
from ..site_shift import concept_shift_report
from ..adaptation.site import SiteFit, fit_site_adaptation
from ..bundle import REFERENCE_FILE, LoadedBundle
from ..data import InputRecord, list_inputs
from ..engine import PredictionEngine
from ..errors import MedcbmUserError
from ..io.atomic import atomic_write_json
from ..io.errors import FileReasonError
from .cli import check_output_dir, cli_errors
from .job import BundleJob
from .site_sample import MIN_SITE_IMAGES, SiteSample, encode_site_sample, read_site_sample
from ..options import is_unset, optional

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
    """The ``configs/adapt.yaml`` job: site sample and/or support CSV -> ``adaptation.json`` (+ a report).

    Args:
        bundle_root: the bundle folder.
        output_dir: where ``adaptation.json`` goes.
        support: the support CSV (columns ``image``, ``label``); optional when ``site_images`` is given.
        models_dir: a models folder written by ``train.yaml`` (default ``<bundle_root>/models``).
        device, batch_size, num_workers: as for inference.
        cache_dir: optional feature cache folder (support images; the site sample is always read, so that its
            images are checked).
        gamma_max: largest gain factor; guard_tolerance: largest allowed source accuracy drop (0.005 = 0.5 points),
            for the edit and, separately, for the calibration.
        progress: show a progress bar.
        exit_on_error: CLI behaviour (a user error ends in one line and exit 2); ``False`` raises instead.
        bundle: an already loaded bundle (the loading arguments are then ignored); its current adaptation is
            ignored: the job always starts from the shipped network.
        site_images: a folder or CSV of unlabelled images of the site (calibration and label shift).
        min_site_images: fewest site images accepted.
        calibrate / label_shift: fit the concept calibration / the label-shift offset from the site sample.
        site_alarm_ratio: a site sample whose median image-feature shift score exceeds this many times the alarm's
            threshold (with 95 % of its images flagged) is refused as another modality.

    Example::

        spec = AdaptationRunner("bundles/blood_cbm", "adapt", "support.csv", site_images="site/",
                                exit_on_error=False).run()
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
        site_images: str | Path | None = None,
        min_site_images: int = MIN_SITE_IMAGES,
        calibrate: bool = True,
        label_shift: bool = True,
        site_alarm_ratio: float = 2.0,
    ) -> None:
        job = (bundle_root, output_dir, device, batch_size, num_workers, progress, exit_on_error, bundle)
        self._init_job(*job, models_dir=models_dir)
        self.support = optional(support)
        self.site_images = optional(site_images)
        self.min_site_images = int(min_site_images)
        self.calibrate = bool(calibrate)
        self.label_shift = bool(label_shift)
        self.site_alarm_ratio = float(site_alarm_ratio)
        self.cache_dir = cache_dir
        self.gamma_max = float(gamma_max)
        self.guard_tolerance = float(guard_tolerance)
        self.report: dict[str, Any] = {}

    def run(self) -> AdaptationSpec:
        """Fit and write the adaptation; returns the spec (CLI: exit 2 with one line on a user error)."""
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

    def _engine(self, bundle: LoadedBundle, desc: str, cache: bool = True) -> PredictionEngine:
        return PredictionEngine(
            bundle,
            device=self.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            cache_dir=self.cache_dir if cache else None,
            progress=self.progress,
            desc=desc,
        )

    def _features(self, bundle: LoadedBundle, support: SupportSet) -> tuple[np.ndarray, list[str], int | None]:
        """Support features in CSV order, their content hashes, and how many the site-shift alarm flags."""
        engine = self._engine(bundle, "support")
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

    def _raw_scores(self, bundle: LoadedBundle, feats: np.ndarray) -> np.ndarray:
        """Unadapted concept scores (float64) of features."""
        with torch.no_grad():
            f = torch.as_tensor(feats, dtype=torch.float32, device=self.device)
            return bundle.network.concept_scores_from_features(f, edited=False).double().cpu().numpy()

    def _fit_site(self, bundle: LoadedBundle, site: SiteSample) -> tuple[SiteFit, np.ndarray]:
        """Encode and check the site sample, then fit calibration and label shift; also returns its raw scores."""
        encode_site_sample(site, self._engine(bundle, "site sample", cache=False), self.site_alarm_ratio)
        scores = self._raw_scores(bundle, site.features)
        ref, net = bundle.reference, bundle.network
        fit = fit_site_adaptation(
            scores,
            ref.scores,
            ref.labels,
            net.head.weight.detach().double().cpu().numpy(),
            net.head.bias.detach().double().cpu().numpy(),
            ref.unlabelled_scores(net),
            bundle.class_names,
            bundle.concept_ids,
            calibrate=self.calibrate,
            label_shift=self.label_shift,
        )
        return fit, scores

    def _search(self, bundle: LoadedBundle, scores: np.ndarray, labels: np.ndarray, site: SiteFit | None):
        """The labelled edit search on (calibrated) support scores, guarded on the (calibrated) reference set."""
        net, ref = bundle.network, bundle.reference
        unlabelled = ref.unlabelled_scores(net)
        b = net.head.bias.detach().double().cpu().numpy()
        if site is not None:  # the edit is searched on top of the site calibration and offset, as it will run
            scores, unlabelled = site.calibrate(scores), site.calibrate(unlabelled)
            b = b + site.offset
        mus = getattr(net, "source_class_means", None)
        mus = mus.detach().double().cpu().numpy() if isinstance(mus, torch.Tensor) else None
        search = ConceptEditSearch(
            gamma_max=self.gamma_max,
            guard_tolerance=self.guard_tolerance,
            class_names=bundle.class_names,
            concept_ids=bundle.concept_ids,
        )
        ref_scores = site.calibrate(ref.scores) if site is not None else ref.scores
        return search.fit(
            scores,
            labels,
            net.head.weight.detach().double().cpu().numpy(),
            b,
            net.neutral.detach().double().cpu().numpy(),
            ref_scores,
            ref.labels,
            mus,
            unlabelled_reference_scores=unlabelled,
        )

    def _run(self) -> AdaptationSpec:
        t0 = time.perf_counter()
        bundle = self._load()
        if bundle.adaptation is not None:
            logger.info("the search starts from the unedited network: the adaptation loaded with the bundle is removed")
        bundle.set_adaptation(None)
        support = None
        if self.support is not None or self.site_images is None:
            support = read_support_set(self.support, bundle.class_names, bundle.name, bundle.root)
        site = read_site_sample(self.site_images, self.min_site_images) if self.site_images is not None else None
        out = check_output_dir(self.output_dir)
        for name in support.missing_classes if support else []:
            logger.warning(
                "class %r has no support image in %s: it is left unadapted and unchecked at this site",
                name,
                support.csv,
            )
        site_fit, site_scores = self._fit_site(bundle, site) if site is not None else (None, None)
        search, sup = None, None
        if support is not None:
            feats, hashes, flagged = self._features(bundle, support)
            sup = (self._raw_scores(bundle, feats), hashes, flagged)
            search = self._search(bundle, sup[0], support.labels, site_fit)
            spec = search.spec_
        else:
            spec = AdaptationSpec(
                method={
                    "name": "site calibration and label-shift correction from an unlabelled sample (no labelled edit)"
                }
            )
        self._complete(spec, bundle, support, sup, site, site_fit)
        self.report = self._report(
            bundle, support, sup, search, spec, site, site_fit, site_scores, time.perf_counter() - t0
        )
        atomic_write_json(out / REPORT_FILE, self.report)
        spec.write(out / ADAPTATION_FILE)  # last: the file exists only for a completed job
        self._log(spec, out)
        return spec

    def _complete(
        self,
        spec: AdaptationSpec,
        bundle: LoadedBundle,
        support: SupportSet | None,
        sup: tuple[np.ndarray, list[str], int | None] | None,
        site: SiteSample | None,
        site_fit: SiteFit | None,
    ) -> None:
        """Site parts, provenance and (with a site sample) the accuracies of the whole adaptation, on the network."""
        ref = bundle.reference
        spec.provenance = {
            "bundle": {"name": bundle.name, "version": bundle.version},
            "model_fingerprint": bundle.fingerprint(),
        }
        if support is not None:
            spec.provenance.update(
                {
                    "support_csv": Path(support.csv).name,
                    "support_csv_sha256": support.csv_sha256,
                    "support_images": {rec.image: h for rec, h in zip(support.records, sup[1])},
                    "k_per_class": dict(support.k_per_class),
                }
            )
        spec.provenance["reference_set"] = {
            "split": ref.split,
            "n": int(len(ref.labels)),
            "n_unlabelled_training_sample": int(len(ref.train_features)),
        }
        if site is None:
            spec.validate(bundle.concept_ids)
            return
        spec.provenance.update(site.provenance())
        spec.calibration, spec.label_shift = site_fit.calibration_dict(), site_fit.label_shift_dict()
        spec.warnings = list(spec.warnings) + site.warnings
        net = bundle.network
        spec.source_accuracy_before = round(ref.accuracy(net), 6)
        AdaptationSpec(calibration=spec.calibration).apply(net)
        after_calibration = round(ref.accuracy(net), 6)
        spec.apply(net)
        spec.source_accuracy_after = round(ref.accuracy(net), 6)
        if support is not None:
            spec.support_accuracy_after = self._accuracy(net, sup[0], support.labels)
            net.reset_edit()
            spec.support_accuracy_before = self._accuracy(net, sup[0], support.labels)
        net.reset_edit()
        spec.method["site_sample"] = {
            "calibrate": self.calibrate,
            "label_shift": self.label_shift,
            "n_site_images": len(site.records),
            "min_site_images": self.min_site_images,
            "rounds": site_fit.rounds,
            "source_accuracy_after_calibration": after_calibration,
            "note": "source accuracies: the reference set run through the whole adaptation as if it were the site "
            "(the label-shift offset moves source predictions by design; the calibration and the edit are guarded)",
        }
        spec.validate(bundle.concept_ids)

    def _accuracy(self, net: Any, raw: np.ndarray, y: np.ndarray) -> float:
        with torch.no_grad():
            s = torch.as_tensor(raw, dtype=torch.float32, device=net.head.weight.device)
            pred = net.logits_from_scores(net.apply_edit(s)).argmax(1).cpu().numpy()
        return round(float((pred == y).mean()), 6)

    def _log(self, spec: AdaptationSpec, out: Path) -> None:
        n_cal = len(spec.calibration.get("concepts", {}))
        logger.info(
            "wrote %s: %d concepts calibrated, label shift %s, %d masked, %d amplified; source reference accuracy "
            "%.4f -> %.4f",
            out / ADAPTATION_FILE,
            n_cal,
            "applied" if spec.label_shift.get("applied") else "off",
            len(spec.mask),
            len(spec.gain),
            spec.source_accuracy_before,
            spec.source_accuracy_after,
        )
        for w in spec.warnings:
            logger.warning("%s", w)

    def _report(
        self,
        bundle: LoadedBundle,
        support: SupportSet | None,
        sup: tuple[np.ndarray, list[str], int | None] | None,
        search: ConceptEditSearch | None,
        spec: AdaptationSpec,
        site: SiteSample | None,
        site_fit: SiteFit | None,
        site_scores: np.ndarray | None,
        seconds: float,
    ) -> dict[str, Any]:
        """Per-image predictions before/after, the leave-one-out table, site-shift figures of the inputs."""
        names = bundle.class_names
        report: dict[str, Any] = {
            "bundle": {"name": bundle.name, "version": bundle.version},
            "adaptation": str(self.output_dir / ADAPTATION_FILE),
            "edited_concepts": spec.edited_concepts,
            "calibrated_concepts": sorted(spec.calibration.get("concepts", {})),
            "label_shift_applied": bool(spec.label_shift.get("applied", False)),
        }
        if support is not None:
            net = bundle.network
            before = self._predict(net, None, sup[0])
            after = self._predict(net, spec, sup[0])
            images = [
                {"image": r.image, "label": names[y], "before": names[p0], "after": names[p1]}
                for r, y, p0, p1 in zip(support.records, support.labels, before, after)
            ]
            report["support"] = {"n": len(support.records), "k_per_class": support.k_per_class, "images": images}
            report["leave_one_out"] = search.loo_
            report["support_site_shift_flagged"] = sup[2]
            report["fit_seconds"] = round(search.fit_seconds_, 4)
        if site is not None:
            report["site_sample"] = {
                "source": site.source,
                "n": len(site.records),
                "image_alarm_flagged": site.alarm_flagged,
                "concept_shift": concept_shift_report(
                    bundle.reference.scores, site_scores, site_fit.calibrate(site_scores)
                ),
            }
        report["seconds"] = round(seconds, 2)
        return report

    def _predict(self, net: Any, spec: AdaptationSpec | None, raw: np.ndarray) -> np.ndarray:
        """Class indices of raw scores with ``spec`` applied on the network (``None``: shipped), then reset."""
        if spec is not None:
            spec.apply(net)
        try:
            with torch.no_grad():
                s = torch.as_tensor(raw, dtype=torch.float32, device=net.head.weight.device)
                return net.logits_from_scores(net.apply_edit(s)).argmax(1).cpu().numpy()
        finally:
            net.reset_edit()
