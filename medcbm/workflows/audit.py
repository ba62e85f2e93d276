# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Audit job: images -> ``report.html``, ``explanations.jsonl`` and ``model_audit.json`` (``configs/audit.yaml``).

The runner only reads the options, loads the bundle, picks the images and writes the files; the audit itself
lives in :mod:`medcbm.audit`: per-image explanations and what-ifs in :mod:`medcbm.audit.explain`, the
orchestration (:func:`audit_bundle`) in :mod:`medcbm.audit.run`, the input's concept labels and boxes in
:mod:`medcbm.audit.inputs`. Their public names are re-exported here, where callers have always imported them.

Images are named by the path the user gave; no DICOM header value is read into any output or log.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any


from ..audit.explain import WHAT_IF_ACTIONS, explain, what_if_values
from ..audit.inputs import concept_labels_from_records, location_boxes_from_records
from ..audit.report import write_report
from ..audit.run import AuditOptions, audit_bundle, summary_rows
from ..io.atomic import atomic_write_json, atomic_write_text
from .cli import check_output_dir
from .job import ImageJob

__all__ = [
    "AuditRunner",
    "audit_bundle",
    "concept_labels_from_records",
    "location_boxes_from_records",
    "what_if_values",
    "WHAT_IF_ACTIONS",
    "explain",
    "summary_rows",
]

logger = logging.getLogger(__name__)


class AuditRunner(ImageJob):
    """The ``configs/audit.yaml`` job: writes ``report.html``, ``explanations.jsonl``, ``model_audit.json``.

    Args:
        bundle_root, output_dir, input, modality, top_k: see :class:`~medcbm.workflows.job.ImageJob`
            (``input=None``: the bundle's example images).
        max_cards: images shown as cards (the rest in a table);
        maps_per_image: concept maps per card; map_method: ``auto`` or one of ``medcbm.audit.MAP_METHODS``.
        what_if: a user intervention applied to every image, ``{concept_id: off|present|absent|number}``.
        location_concepts: top concepts per image whose maps are checked against the input's ``box`` column;
        min_box_visible: fraction of a box that must survive the preprocessing's crop for it to count.
        job: the options every job has (loading, device, batching, progress, ``exit_on_error``, an already
            loaded ``bundle``): see :class:`~medcbm.workflows.job.BundleJob`.
    """

    def __init__(
        self,
        bundle_root: str | Path = ".",
        output_dir: str | Path = "audit",
        input: str | Path | None = None,
        *,
        max_cards: int = 24,
        maps_per_image: int = 3,
        map_method: str = "auto",
        what_if: Any = None,
        location_concepts: int = 3,
        min_box_visible: float = 0.5,
        **job: Any,
    ) -> None:
        super().__init__(bundle_root, output_dir, input, **job)
        self.options = AuditOptions(
            self.top_k, max_cards, maps_per_image, map_method, what_if, location_concepts, min_box_visible
        )
        self.summary: dict[str, Any] = {}

    def run(self) -> int:
        """Audit every input; returns the number of unreadable inputs (CLI: exit 1 if any, 2 on a bad command)."""
        return self._run_counting_errors(
            "could not be read", lambda: self.summary.get("n_images", "?"), str(self.output_dir / "explanations.jsonl")
        )

    def _run(self) -> int:
        t0 = time.perf_counter()
        check_output_dir(self.output_dir)
        bundle = self.load_bundle()
        records, source = self.input_records()
        entries, audit, cards, meta = audit_bundle(
            bundle,
            records,
            self.options,
            device=self.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            progress=self.progress,
            source=source or "examples",
        )
        audit["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_text(
            self.output_dir / "explanations.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        )
        atomic_write_json(self.output_dir / "model_audit.json", audit)
        write_report(
            self.output_dir / "report.html",
            audit,
            cards,
            summary_rows(entries),
            title=f"Concept audit — {bundle.name} {bundle.version}".strip(),
            meta=meta,
        )
        self.summary = {"n_images": audit["n_images"], "n_errors": audit["n_errors"]}
        logger.info(
            "audit of %d images written to %s (%d unreadable)", audit["n_images"], self.output_dir, audit["n_errors"]
        )
        return int(audit["n_errors"])
