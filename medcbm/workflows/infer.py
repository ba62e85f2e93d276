# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Inference job: images -> ``predictions.csv`` with the concepts that drove each prediction.

Contract (``docs/CONTRACT.md``): one row per input in input order; a bad file becomes an ``error`` row
naming the file and the reason, and the batch goes on; the CSV is rewritten atomically after every
batch, so an interrupted run leaves a valid file, and a rerun into the same folder keeps its finished
rows (when the model and edit are unchanged). Exit status is non-zero if any row is an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data import InputListError, InputRecord, list_inputs, make_sample_inputs
from ..networks import ConceptBottleneckClassifier

__all__ = ["InferenceRunner", "prediction_columns", "format_top_concepts", "atomic_write_text"]

logger = logging.getLogger(__name__)
STATE_FILE = ".medcbm_inference.json"


def prediction_columns(class_names: Sequence[str], concept_ids: Sequence[str] = ()) -> list[str]:
    """The contract's columns, then ``sample`` and one ``concept_<id>`` column per concept score (if any)."""
    return (
        ["image", "status", "error", "prediction", "probability"]
        + [f"prob_{c}" for c in class_names]
        + ["top_concepts", "sample"]
        + [f"concept_{k}" for k in concept_ids]
    )


def format_top_concepts(concept_ids: Sequence[str], contributions: np.ndarray, top_k: int = 5) -> str:
    """``id=value`` pairs of the ``top_k`` largest contributions, largest first, joined by ``;``."""
    order = np.argsort(-contributions, kind="stable")[:top_k]
    return ";".join(f"{concept_ids[k]}={contributions[k]:.4f}" for k in order)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class InferenceRunner:
    """Runs a concept bottleneck network over a folder or CSV of images and writes ``predictions.csv``.

    Args:
        network: from :func:`medcbm.workflows.load_bundle_network` (has ``pipeline``).
        output_dir: where ``predictions.csv`` goes.
        input: folder, CSV or image; ``None`` runs on generated samples of ``modality``.
        modality: ``dermoscopy``, ``cxr`` or ``blood`` (for the samples).
        device: torch device.
        batch_size: images per forward pass.
        top_k: concepts listed per row.
        concept_columns: add one ``concept_<id>`` column per concept with its score (after any edit; for
            probe grounding the calibrated probability that the concept or sign is present).
        exit_on_error: end the process with status 1 after writing all rows if any row is an error
            (what the bundle CLI wants); ``False`` returns the count instead.
    """

    def __init__(
        self,
        network: ConceptBottleneckClassifier,
        output_dir: str | Path,
        input: str | Path | None = None,
        modality: str = "blood",
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        top_k: int = 5,
        exit_on_error: bool = True,
        concept_columns: bool = True,
    ):
        self.network = network
        self.output_dir = Path(output_dir)
        self.input = input
        self.modality = modality
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.top_k = int(top_k)
        self.exit_on_error = exit_on_error
        self.concept_columns = concept_columns

    # ------------------------------------------------------------------ helpers
    def _records(self) -> tuple[list[InputRecord], bool]:
        if self.input in (None, "", "None"):
            paths = make_sample_inputs(self.modality, self.output_dir / "samples")
            logger.info("no --input given: running on %d generated %s samples", len(paths), self.modality)
            return [InputRecord(image=str(p), path=Path(p)) for p in paths], True
        return list_inputs(self.input), False

    def _run_fingerprint(self, columns: Sequence[str]) -> str:
        """Hash of the model, its edit and the output columns: rows written under another one are recomputed."""
        net = self.network
        h = hashlib.sha256(json.dumps(list(columns)).encode())
        h.update(getattr(net, "backbone_fingerprint", "").encode())
        for name, t in sorted(net.state_dict().items()):
            if not name.startswith("encoder."):
                h.update(name.encode())
                h.update(t.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()

    def _previous_rows(self, out_csv: Path, fingerprint: str) -> dict[str, dict[str, str]]:
        state_path = self.output_dir / STATE_FILE
        if not out_csv.is_file() or not state_path.is_file():
            return {}
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        if state.get("model") != fingerprint:
            logger.warning("%s was written by another model or edit: recomputing every row", out_csv)
            return {}
        with open(out_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return {r["image"]: r for r in rows if r.get("status") == "ok"}

    # ------------------------------------------------------------------ the job
    @torch.no_grad()
    def run(self) -> int:
        """Process every input; returns the number of error rows (or exits 1 when ``exit_on_error``)."""
        net = self.network.to(self.device).eval()
        out_csv = self.output_dir / "predictions.csv"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            records, is_sample = self._records()
        except InputListError as e:  # nothing to process: say why in one line, not a config traceback
            if not self.exit_on_error:
                raise
            print(f"medcbm: cannot read the input list: {e}", file=sys.stderr)
            sys.exit(2)
        columns = prediction_columns(net.targets, net.concepts if self.concept_columns else ())
        fingerprint = self._run_fingerprint(columns)
        previous = self._previous_rows(out_csv, fingerprint)
        atomic_write_text(
            self.output_dir / STATE_FILE,
            json.dumps({"model": fingerprint, "info": _jsonable(getattr(net, "model_info", {}))}, indent=2),
        )
        rows: list[dict[str, Any] | None] = [None] * len(records)
        todo: list[int] = []
        for i, rec in enumerate(records):
            if rec.image in previous:
                rows[i] = previous[rec.image]
            else:
                todo.append(i)
        if previous:
            logger.info("resuming: %d finished rows kept, %d to compute", len(records) - len(todo), len(todo))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            images, ok = [], []
            for i in batch:
                try:
                    images.append(net.pipeline(records[i].path))
                    ok.append(i)
                except Exception as e:  # the reader's message names the file and the reason
                    rows[i] = self._error_row(records[i], e, is_sample)
            if ok:
                x = torch.stack(images).to(self.device)
                scores = net.concept_scores(x)
                logits = net.head(scores)
                proba = torch.softmax(logits, dim=1).cpu().numpy()
                contrib = net.contributions_from_scores(scores).cpu().numpy()
                raw_scores = scores.cpu().numpy()
                for j, i in enumerate(ok):
                    rows[i] = self._ok_row(records[i], proba[j], contrib[j], raw_scores[j], is_sample)
            self._write(out_csv, columns, rows)
        if not todo:  # every row was resumed: the batches above wrote nothing in this run
            self._write(out_csv, columns, rows)
        n_err = sum(1 for r in rows if r is not None and r["status"] != "ok")
        logger.info("wrote %s: %d rows, %d errors", out_csv, len(rows), n_err)
        if n_err and self.exit_on_error:
            print(f"medcbm: {n_err} of {len(rows)} inputs failed; see the 'error' column of {out_csv}", file=sys.stderr)
            sys.exit(1)
        return n_err

    def _ok_row(
        self, rec: InputRecord, proba: np.ndarray, contrib: np.ndarray, scores: np.ndarray, is_sample: bool
    ) -> dict[str, Any]:
        net = self.network
        c = int(np.argmax(proba))
        row: dict[str, Any] = {
            "image": rec.image,
            "status": "ok",
            "error": "",
            "prediction": net.targets[c],
            "probability": f"{proba[c]:.6f}",
        }
        for name, p in zip(net.targets, proba):
            row[f"prob_{name}"] = f"{p:.6f}"
        row["top_concepts"] = format_top_concepts(net.concepts, contrib[c], self.top_k)
        row["sample"] = "true" if is_sample else "false"
        if self.concept_columns:
            row.update({f"concept_{k}": f"{v:.6f}" for k, v in zip(net.concepts, scores)})
        return row

    def _error_row(self, rec: InputRecord, exc: BaseException, is_sample: bool) -> dict[str, Any]:
        msg = str(exc)
        if rec.image not in msg and str(rec.path) not in msg:
            msg = f"{rec.image}: {msg}"
        logger.warning("error on input: %s", msg)
        return {
            "image": rec.image,
            "status": "error",
            "error": msg.replace("\n", " "),
            "sample": str(is_sample).lower(),
        }

    @staticmethod
    def _write(out_csv: Path, columns: list[str], rows: list[dict[str, Any] | None]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            if r is not None:
                writer.writerow({k: r.get(k, "") for k in columns})
        atomic_write_text(out_csv, buf.getvalue())


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in d.items()}
