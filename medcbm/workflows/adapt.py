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

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adaptation import AdaptationSpec, ConceptEditSearch, ReferenceScores
from ..site_shift import concept_shift_report
from ..adaptation.site import SiteFit, fit_site_adaptation
from ..adaptation.support import SupportSet, SupportSetError, read_support_set
from ..bundle import REFERENCE_FILE, LoadedBundle
from ..networks import HeadArrays
from ..engine import PredictionEngine
from ..errors import MedcbmUserError, listing
from ..io.atomic import atomic_write_json
from .cli import check_output_dir, cli_errors
from .job import BundleJob
from .site_sample import MIN_SITE_IMAGES, SiteSample, encode_site_sample, read_site_sample
from ..options import optional

__all__ = [
    "AdaptationRunner",
    "SupportSet",
    "SupportSetError",
    "NoReferenceSetError",
    "read_support_set",
    "ADAPTATION_FILE",
    "REPORT_FILE",
]

logger = logging.getLogger(__name__)

ADAPTATION_FILE = "adaptation.json"
REPORT_FILE = "adaptation_report.json"


class NoReferenceSetError(MedcbmUserError, FileNotFoundError):
    """The bundle carries no source reference set, so the source guard cannot check an edit."""


class AdaptationRunner(BundleJob):
    """The ``configs/adapt.yaml`` job: site sample and/or support CSV -> ``adaptation.json`` (+ a report).

    Args:
        bundle_root: the bundle folder.
        output_dir: where ``adaptation.json`` goes.
        support: the support CSV (columns ``image``, ``label``); optional when ``site_images`` is given.
        cache_dir: optional feature cache folder (support images; the site sample is always read, so that its
            images are checked).
        gamma_max: largest gain factor; guard_tolerance: largest allowed source accuracy drop (0.005 = 0.5 points),
            for the edit and, separately, for the calibration.
        job: the options every job has (see :class:`~medcbm.workflows.job.BundleJob`); an ``adaptation`` (given,
            or loaded with a given ``bundle``) is removed first: the job always starts from the shipped network.
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
        *,
        site_images: str | Path | None = None,
        cache_dir: str | Path | None = None,
        gamma_max: float = 3.0,
        guard_tolerance: float = 0.005,
        min_site_images: int = MIN_SITE_IMAGES,
        calibrate: bool = True,
        label_shift: bool = True,
        site_alarm_ratio: float = 2.0,
        **job: Any,
    ) -> None:
        super().__init__(bundle_root, output_dir, **job)
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
                f"{listing(reasons)}; fix or remove these rows"
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
                f"{support.csv}: the same image is listed more than once: {listing(same)}; "
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

    def _fit_site(
        self, bundle: LoadedBundle, site: SiteSample, reference: ReferenceScores, head: HeadArrays
    ) -> tuple[SiteFit, np.ndarray]:
        """Encode and check the site sample, then fit calibration and label shift; also returns its raw scores."""
        encode_site_sample(site, self._engine(bundle, "site sample", cache=False), self.site_alarm_ratio)
        scores = self._raw_scores(bundle, site.features)
        fit = fit_site_adaptation(
            scores,
            reference,
            head,
            bundle.class_names,
            bundle.concept_ids,
            calibrate=self.calibrate,
            label_shift=self.label_shift,
        )
        return fit, scores

    def _search(
        self,
        bundle: LoadedBundle,
        scores: np.ndarray,
        labels: np.ndarray,
        site: SiteFit | None,
        reference: ReferenceScores,
        head: HeadArrays,
    ) -> ConceptEditSearch:
        """The labelled edit search on (calibrated) support scores, guarded on the (calibrated) reference set."""
        if site is not None:  # the edit is searched on top of the site calibration and offset, as it will run
            scores, reference = site.calibrate(scores), reference.mapped(site.calibrate)
            head = head.with_offset(site.offset)
        search = ConceptEditSearch(
            gamma_max=self.gamma_max,
            guard_tolerance=self.guard_tolerance,
            class_names=bundle.class_names,
            concept_ids=bundle.concept_ids,
        )
        return search.fit(scores, labels, head, reference, bundle.source_class_means)

    def _run(self) -> AdaptationSpec:
        t0 = time.perf_counter()
        bundle = self._load()
        if bundle.adaptation is not None:
            logger.info("the search starts from the unedited network: the adaptation loaded with the bundle is removed")
        bundle.set_adaptation(None)
        reference, head = ReferenceScores.of_bundle(bundle), bundle.head_arrays()  # scored once for both fits
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
        site_fit, site_scores = self._fit_site(bundle, site, reference, head) if site is not None else (None, None)
        search, sup = None, None
        if support is not None:
            feats, hashes, flagged = self._features(bundle, support)
            sup = (self._raw_scores(bundle, feats), hashes, flagged)
            search = self._search(bundle, sup[0], support.labels, site_fit, reference, head)
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
