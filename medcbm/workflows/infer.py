# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Inference job: images -> ``predictions.csv`` with the concepts that drove each prediction.

Contract (``docs/CONTRACT.md``): one row per input in input order; a bad file becomes an ``error`` row
naming the file and the reason, and the batch goes on. Rows stream into an append-only journal
(:mod:`medcbm.sinks`) and ``predictions.csv`` is assembled in input order and written atomically at the
end; a rerun into the same folder keeps finished rows whose file content, model, edit, preprocessing and
columns are unchanged. A second run into a folder in use is refused. Exit status: 0 when every row is
``ok``, 1 when some rows are errors (after all rows), 2 for a problem with the command itself (one line).

Under ``torch.distributed`` (``configs/multi_gpu_inference.yaml`` with ``torchrun``) each rank computes
its shard and rank 0 writes the same files a single process would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..site_shift import concept_shift_report
from ..bundle import LoadedBundle
from ..data import InputRecord
from ..engine import PredictionEngine, dist_rank_world, shard_indices
from ..predictions import format_top_concepts, prediction_columns, prediction_row, top_concepts
from ..sinks import OutputLock, RowJournal, iter_ordered, write_csv_atomic
from ..io.atomic import atomic_write_json as write_json_atomic
from .cli import check_output_dir
from .job import EXAMPLES_CSV, ImageJob, default_records, examples_csv

# prediction_columns, format_top_concepts, top_concepts, explain_row (medcbm.predictions) and EXAMPLES_CSV,
# examples_csv, default_records (.job) are re-exported here, where callers have always imported them from.
__all__ = [
    "InferenceRunner",
    "prediction_columns",
    "format_top_concepts",
    "top_concepts",
    "explain_row",
    "examples_csv",
    "default_records",
    "EXAMPLES_CSV",
]

logger = logging.getLogger(__name__)
explain_row = prediction_row  # the name this module has always exported


class InferenceRunner(ImageJob):
    """Runs a bundle over a folder or CSV of images and writes ``predictions.csv`` and ``run_summary.json``.

    Args:
        bundle_root, output_dir, input, modality, top_k: see :class:`~medcbm.workflows.job.ImageJob`
            (``input=None``: the bundle's example images).
        concept_columns: one ``concept_<id>`` column per concept score (after any edit).
        cache_dir: optional feature cache folder.
        job: the options every job has (loading, device, batching, progress, ``exit_on_error``, an already
            loaded ``bundle``): see :class:`~medcbm.workflows.job.BundleJob`.
    """

    def __init__(
        self,
        bundle_root: str | Path = ".",
        output_dir: str | Path = "eval",
        input: str | Path | None = None,
        *,
        concept_columns: bool = True,
        cache_dir: str | Path | None = None,
        **job: Any,
    ) -> None:
        super().__init__(bundle_root, output_dir, input, **job)
        self.concept_columns = bool(concept_columns)
        self.cache_dir = cache_dir
        self.summary: dict[str, Any] = {}

    # ------------------------------------------------------------------ the job
    def run(self) -> int:
        """Process every input; returns the number of error rows (CLI: exits 1 if any, 2 on a bad command)."""
        where = f"the 'error' column of {self.output_dir / 'predictions.csv'}"
        return self._run_counting_errors("failed", lambda: self.summary.get("rows", "?"), where)

    def _records(self) -> tuple[list[InputRecord], bool]:
        recs, source = self.input_records()
        if source is None:
            where = (
                "example images shipped with the bundle"
                if examples_csv(self.bundle_root).is_file()
                else ("generated sample images")
            )
            logger.info("no --input given: running on %d %s", len(recs), where)
        return recs, source is None

    def _run(self) -> int:
        rank, world = dist_rank_world()
        lock = None
        if rank == 0:
            check_output_dir(self.output_dir)
            lock = OutputLock(self.output_dir)
        lock_error = None
        if lock is not None:
            try:
                lock.acquire()
            except Exception as e:
                lock_error = e
        if world > 1:
            msg = [str(lock_error) if lock_error else ""]
            torch.distributed.broadcast_object_list(msg, src=0)
            if msg[0]:
                lock_error = lock_error or RuntimeError(msg[0])
        if lock_error is not None:
            raise lock_error
        try:
            return self._run_locked(rank, world)
        finally:
            if lock is not None:
                lock.release()

    def _run_locked(self, rank: int, world: int) -> int:
        t0 = time.perf_counter()
        bundle = self.load_bundle()
        records, is_sample = self._records()
        columns = prediction_columns(bundle.class_names, bundle.concept_ids if self.concept_columns else ())
        fp = hashlib.sha256(json.dumps([bundle.fingerprint(), columns, self.top_k]).encode()).hexdigest()
        journal = RowJournal(self.output_dir, fp, rank)
        if rank == 0:
            journal.open()
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            journal.open()
        done = journal.done()
        if done and rank == 0:
            logger.info("resuming: %d finished rows of an earlier run are kept if their files are unchanged", len(done))
        engine = PredictionEngine(
            bundle,
            device=self.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            cache_dir=self.cache_dir,
            progress=self.progress and rank == 0,
            desc="inference",
        )
        mine = shard_indices(len(records), rank, world, block=self.batch_size)
        raw_scores: list[np.ndarray] = []  # unadapted concept scores of this run's rows, for the concept-shift figure
        try:
            for res in engine.iter_batches(records, mine, done):
                if res.scores_unedited is not None:
                    raw_scores.append(res.scores_unedited)
                for j, i in enumerate(res.ok):
                    row = prediction_row(bundle, j, res, self.top_k, self.concept_columns)
                    journal.append(records[i].image, res.sha256.get(i), row)
                for i, reason in res.errors.items():
                    logger.warning("error on input: %s", reason)
                    journal.append(records[i].image, res.sha256.get(i), {"status": "error", "error": reason})
                journal.flush()
        finally:
            journal.close()
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            return 0
        seconds = time.perf_counter() - t0
        return self._finish(bundle, records, columns, journal, is_sample, engine, seconds, raw_scores)

    def _finish(
        self,
        bundle: LoadedBundle,
        records: list[InputRecord],
        columns: list[str],
        journal: RowJournal,
        is_sample: bool,
        engine: PredictionEngine,
        seconds: float,
        raw_scores: Sequence[np.ndarray] = (),
    ) -> int:
        entries = journal.read()
        rows: dict[str, dict[str, Any]] = {}
        for rec in records:
            e = entries.get(rec.image)
            row = {"image": rec.image, **(e["row"] if e else {"status": "error", "error": "not processed"})}
            row["sample"] = "true" if is_sample else "false"
            row["label"] = rec.label or ""
            rows[rec.image] = row
        n = write_csv_atomic(
            self.output_dir / "predictions.csv", columns, iter_ordered([r.image for r in records], rows)
        )
        n_err = sum(1 for r in records if rows[r.image]["status"] != "ok")
        flagged = sum(1 for r in records if rows[r.image].get("site_shift") == "true")
        n_ok = n - n_err
        summary: dict[str, Any] = {
            "bundle": {"name": bundle.name, "version": bundle.version},
            "model": bundle.info,
            "rows": n,
            "ok": n_ok,
            "errors": n_err,
            "examples": is_sample,
            "site_shift": {
                "available": engine.shift_detector is not None,
                "flagged": flagged,
                "fraction_flagged": round(flagged / n_ok, 4) if n_ok else None,
            },
            "throughput": engine.stats,
            "seconds": round(seconds, 2),
        }
        if engine.shift_detector is not None and n_ok and flagged / n_ok > 0.25:
            summary["site_shift"]["message"] = (
                f"{flagged} of {n_ok} images look unlike the training site of {bundle.name}; predictions may be "
                "unreliable here. Consider adapting the bundle with configs/adapt.yaml on a few labelled local images."
            )
            logger.warning("%s", summary["site_shift"]["message"])
        concept_space = _calibrated_shift(bundle, raw_scores)
        if concept_space:
            summary["site_shift"]["concept_space"] = concept_space
            logger.info("%s", concept_space["message"])
        write_json_atomic(self.output_dir / "run_summary.json", summary)
        self.summary = summary
        logger.info(
            "wrote %s: %d rows, %d errors, %d flagged as site-shifted (%.1f s)",
            self.output_dir / "predictions.csv",
            n,
            n_err,
            flagged,
            seconds,
        )
        return n_err


def _calibrated_shift(bundle: LoadedBundle, raw_scores: Sequence[np.ndarray]) -> dict[str, Any]:
    """With an adaptation that calibrates concept scores: the run's concept-score shift against the source reference
    set before and after the calibration (a folder figure; no prediction depends on it). Else ``{}``."""
    spec = bundle.adaptation
    if spec is None or not getattr(spec, "calibration", None) or bundle.reference is None or not len(raw_scores):
        return {}
    raw = np.concatenate(list(raw_scores))
    if len(raw) == 0:
        return {}
    net = bundle.network
    with torch.no_grad():
        calibrated = net.calibrate(torch.as_tensor(raw, dtype=torch.float32, device=net.head.weight.device))
    out = concept_shift_report(bundle.reference.scores, raw, calibrated.cpu().numpy())
    out["adaptation"] = bundle.info.get("adaptation", "")
    return out
