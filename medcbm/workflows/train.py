# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Re-fit job: a site's labelled CSVs -> a new ``models`` folder (grounding + knowledge-prior head).

The backbone stays frozen; features are cached per (backbone, preprocessing, file content), so a
second fit on the same images costs seconds. Concept-label columns (named by concept id, values
0/1, yes/no, true/false, empty = unknown) switch grounding to ``probe``; without them concepts are
grounded by text. Images that cannot be read are skipped and listed in ``fit_report.json``.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import torch

from ..backbones import LOCAL_DIR, load_backbone
from ..bundle import (
    BACKBONE_DIR,
    REFERENCE_FILE,
    default_backbone_spec,
    Preprocessing,
    SourceReference,
    save_bundle_network,
    write_model_pt,
)
from ..concept_labels import concept_labels_from_records
from ..concepts import ConceptBank, load_concept_bank
from ..data import InputListError, list_inputs
from ..engine import FeatureExtractor
from ..features import FeatureCache, default_cache_dir
from ..fitting import fit_cbm
from ..io.atomic import atomic_write_json
from .cli import cli_errors
from ..options import is_unset

__all__ = ["TrainingRunner", "run_training"]

#: training features kept in the reference set for the site-shift alarm (a deterministic sample)
MAX_REFERENCE_TRAIN = 2000

logger = logging.getLogger(__name__)


class TrainingRunner:
    """Fit grounding and head from ``train`` / ``val`` CSVs into ``output_dir``.

    Args:
        concepts_file: the bundle's concept bank.
        train, val: CSVs with ``image``, ``label`` and optional concept-label columns. ``val`` selects
            hyper-parameters and flags concepts that are no better than chance; keep a test split apart.
        output_dir: the new models folder (``cbm.safetensors``, ``fit_report.json``, ``backbone/``).
        models_dir: the bundle's models folder, whose backbone is the default.
        backbone: open_clip spec overriding the backbone (e.g. ``hf-hub:yyupenn/whylesionclip``).
        channel_mode: ``rgb`` or ``grey``.
        grounding: ``auto`` (probe when concept labels exist), ``probe`` or ``text``.
        prior_strength: candidate weights of the knowledge prior, chosen on ``val``.
        prior_tolerance: take the strongest prior within this much validation balanced accuracy of the best.
        cache_dir: feature cache folder (default ``~/.cache/medcbm/features``).
        trained_on: a description of the data, recorded in the fitted model.
        drop_ungroundable: drop concepts whose grounding is no better than chance on ``val``.
        examples_csv: the bundle's shipped example images with labels. Training on exactly that file is a
            smoke fit (``val`` defaults to it too); ``fit_report.json`` then says the models are not for use.
        exit_on_error: on bad input end the process with status 2 and a one-line reason (the bundle CLI);
            ``False`` raises instead (the Python API).
    """

    def __init__(
        self,
        concepts_file: str | Path,
        train: str | Path | None,
        val: str | Path | None,
        output_dir: str | Path,
        models_dir: str | Path,
        backbone: str | None = None,
        pretrained: str | None = None,
        channel_mode: str = "rgb",
        grounding: str = "auto",
        prior_strength: Sequence[float] = (0.0, 0.01, 0.1, 1.0),
        prior_tolerance: float = 0.0,
        cache_dir: str | Path | None = None,
        batch_size: int = 32,
        trained_on: str = "",
        drop_ungroundable: bool = True,
        exit_on_error: bool = True,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        max_epochs: int = 1,
        examples_csv: str | Path | None = None,
    ):
        self.concepts_file = concepts_file
        self.train, self.val = (None if is_unset(v) else Path(v) for v in (train, val))
        self.output_dir = Path(output_dir)
        self.models_dir = Path(models_dir)
        self.backbone = backbone
        self.pretrained = pretrained
        self.channel_mode = channel_mode
        self.grounding = grounding
        self.prior_strength = list(prior_strength)
        self.prior_tolerance = float(prior_tolerance)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size = batch_size
        self.trained_on = trained_on
        self.drop_ungroundable = drop_ungroundable
        self.exit_on_error = exit_on_error
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        if int(max_epochs) != 1:
            raise ValueError("max_epochs must be 1: features are extracted once and the fits are convex")
        self.max_epochs = 1
        self.examples_csv = None if is_unset(examples_csv) else Path(examples_csv)

    @property
    def smoke_fit(self) -> bool:
        """Whether the training data are the bundle's own example images (a check that training runs)."""
        return (
            self.train is not None
            and self.examples_csv is not None
            and self.examples_csv.is_file()
            and self.train.resolve() == self.examples_csv.resolve()
        )

    @classmethod
    def from_options(cls, train: Any, options: dict[str, Any], max_epochs: int = 1) -> "TrainingRunner":
        """Build from the bundle config's ``job`` mapping (``configs/train.yaml``) and a train CSV."""
        import inspect

        known = set(inspect.signature(cls.__init__).parameters) - {"self", "train", "max_epochs"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        train = None if isinstance(train, dict) or hasattr(train, "keys") else train
        return cls(train=train, max_epochs=max_epochs, **dict(options))

    def _split(self, csv_path: Path, bank: ConceptBank, extractor: FeatureExtractor) -> dict[str, Any]:
        records = list_inputs(csv_path)
        labels = []
        for i, r in enumerate(records):
            if r.label is None:
                raise ValueError(f"{csv_path} row {i + 2}: missing label for {r.image}")
            try:
                labels.append(bank.class_index(r.label))
            except KeyError as e:
                raise ValueError(f"{csv_path} row {i + 2}: {e.args[0]}") from None
        concepts, _ = concept_labels_from_records(records, bank.concept_ids, str(csv_path))
        res = extractor.extract(records)
        errors = {records[i].image: msg for i, msg in res.errors.items()}
        for msg in errors.values():
            logger.warning("skipping unreadable image: %s", msg)
        y = np.asarray(labels)[res.ok]
        return {
            "features": res.features,
            "y": y,
            "concepts": None if concepts is None else concepts[res.ok],
            "errors": errors,
            "n": len(records),
        }

    def run(self) -> dict[str, Any]:
        """Fit and write the models folder; bad CSVs end the process with a one-line reason (status 2)."""
        try:
            with cli_errors(exit=self.exit_on_error):
                return self._run()
        except (InputListError, ValueError) as e:
            if not self.exit_on_error:
                raise
            print(f"medcbm: cannot fit: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)

    def _run(self) -> dict[str, Any]:
        if self.val is None and self.smoke_fit:
            self.val = self.train
            logger.warning("smoke fit on the bundle's example images (%s): the models are not for use", self.train)
        if self.train is None or self.val is None:
            raise ValueError("train.yaml needs --train TRAIN.csv and --val VAL.csv (columns image, label)")
        t0 = time.time()
        bank = load_concept_bank(self.concepts_file)
        spec = self.backbone or default_backbone_spec(self.models_dir)
        bk = load_backbone(spec, pretrained=self.pretrained)
        bk.model.to(self.device)
        preprocessing = Preprocessing.from_backbone(bk, self.channel_mode)
        cache = FeatureCache(self.cache_dir, bk.fingerprint, preprocessing.fingerprint())
        encoder = bk.image_encoder().to(self.device).eval()
        extractor = FeatureExtractor(
            encoder, preprocessing.pipeline(), cache, self.device, self.batch_size, self.num_workers, True, "features"
        )
        tr = self._split(self.train, bank, extractor)
        va = self._split(self.val, bank, extractor)
        bk.model.to("cpu")
        text_embeddings = bk.encode_texts(bank.texts)
        fitted = fit_cbm(
            bank,
            tr["features"],
            tr["y"],
            va["features"],
            va["y"],
            tr["concepts"],
            va["concepts"],
            mode=self.grounding,
            text_embeddings=text_embeddings,
            prior_strength=self.prior_strength,
            prior_tolerance=self.prior_tolerance,
            drop_ungroundable=self.drop_ungroundable,
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if spec.startswith(LOCAL_DIR):  # a models folder must stand alone: carry a local backbone along
            src, dst = Path(spec[len(LOCAL_DIR) :]), self.output_dir / BACKBONE_DIR
            if src.resolve() != dst.resolve():
                shutil.copytree(src, dst, dirs_exist_ok=True)
        keep = [bank.concept_ids.index(c) for c in fitted.bank.concept_ids]
        summary = {
            "trained_on": ("smoke fit, not for use: " if self.smoke_fit else "")
            + (self.trained_on or f"{self.train.name} / {self.val.name}"),
            "n_train": int(len(tr["y"])),
            "n_val": int(len(va["y"])),
        }
        save_bundle_network(
            self.output_dir, fitted, bk, preprocessing, text_embeddings=text_embeddings[keep], summary=summary
        )
        self._save_reference(fitted, bk, preprocessing, tr, va)
        write_model_pt(self.output_dir.parent, self.output_dir, concepts_file=self.concepts_file)
        report = {
            **summary,
            "backbone": spec if not spec.startswith("local-dir:") else "bundle backbone (local-dir)",
            "grounding": fitted.grounding.mode,
            "concepts_kept": fitted.bank.concept_ids,
            "concepts_dropped": fitted.dropped,
            "grounding_report": [r.to_dict() for r in fitted.report],
            "head_selection": fitted.head.selection_,
            "val_metrics": fitted.val_metrics,
            "unreadable_images": {**tr["errors"], **va["errors"]},
            "indistinguishable_concepts": getattr(fitted, "indistinguishable", []),
            "warnings": getattr(fitted, "warnings", []),
            "feature_cache": {"hits": cache.hits, "misses": cache.misses},
            "seconds": round(time.time() - t0, 1),
        }
        if self.smoke_fit:
            report["smoke_fit"] = (
                f"fitted on the bundle's {len(tr['y'])} example images only, to check that training runs: "
                "not a model to use"
            )
        atomic_write_json(self.output_dir / "fit_report.json", report)
        logger.info("wrote %s (validation %s)", self.output_dir, fitted.val_metrics)
        return report

    def _save_reference(self, fitted: Any, bk: Any, preprocessing: Preprocessing, tr: dict, va: dict) -> None:
        """The source reference set: validation features, unedited concept scores and labels, and a
        deterministic sample of training features (no images)."""
        with torch.no_grad():
            scores = fitted.grounding(torch.as_tensor(va["features"], dtype=torch.float32)).numpy()
        rng = np.random.default_rng(0)
        n_tr = len(tr["features"])
        pick = np.sort(rng.choice(n_tr, size=min(n_tr, MAX_REFERENCE_TRAIN), replace=False))
        train_features = tr["features"][pick]
        SourceReference(
            features=va["features"],
            scores=scores,
            labels=np.asarray(va["y"], dtype=np.int64),
            train_features=train_features,
            split=f"validation: {self.val.name}",
            concept_ids=fitted.bank.concept_ids,
            class_names=fitted.bank.classes,
            backbone_fingerprint=bk.fingerprint,
            preprocessing_fingerprint=preprocessing.fingerprint(),
            shift_tensors=_shift_tensors(train_features),
        ).save(self.output_dir / REFERENCE_FILE)


def _shift_tensors(train_features: np.ndarray) -> dict[str, Any]:
    """The site-shift detector fitted once at training time (inference then only loads it)."""
    from ..site_shift import SiteShiftDetector

    if len(train_features) < SiteShiftDetector().min_reference_size:
        logger.warning("too few training images (%d) for the site-shift alarm; it is left out", len(train_features))
        return {}
    return SiteShiftDetector().fit(train_features).to_tensors()


def run_training(train: Any, options: dict[str, Any]) -> dict[str, Any]:
    """What ``configs/train.yaml`` runs.

    ``train`` is the config's ``train`` entry: the CSV path given with ``--train TRAIN.csv`` (the contract),
    or, without it, MONAI's train-workflow section whose ``trainer`` then reports the missing argument.
    """
    if isinstance(train, dict) or hasattr(train, "keys"):
        return train["trainer"].run()
    return TrainingRunner.from_options(train, options).run()
