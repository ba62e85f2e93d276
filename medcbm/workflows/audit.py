# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Audit job: images -> ``report.html``, ``explanations.jsonl`` and ``model_audit.json`` (``configs/audit.yaml``).

Per image: prediction, probabilities, concept scores, every concept's contribution to every class plus the
bias (summing to the logits), the top concepts with their direction, a what-if (a top concept switched off,
set present or absent, and the user's own intervention), the site-shift score when the bundle has one.
Model level: see :mod:`medcbm.audit.metrics`. An input CSV may carry concept labels as ``concept_<id>``
columns (1 present, 0 absent, empty unknown) next to ``label``; every label given is used.

Images are named by the path the user gave; no DICOM header value is read into any output or log.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..audit import metrics as M
from ..audit.location import InputGeometry, LocationItem, location_audit, parse_boxes
from ..audit.maps import ConceptMapper, denormalize, overlay
from ..audit.report import ImageCard, write_report
from ..bundle import LoadedBundle
from ..data import InputListError, InputRecord, list_inputs
from ..engine import PredictionEngine
from ..io.atomic import atomic_write_json, atomic_write_text
from .cli import check_output_dir
from .job import BundleJob
from .infer import default_records, top_concepts

__all__ = [
    "AuditRunner",
    "audit_bundle",
    "concept_labels_from_records",
    "location_boxes_from_records",
    "what_if_values",
    "WHAT_IF_ACTIONS",
]

logger = logging.getLogger(__name__)
WHAT_IF_ACTIONS = ("off", "present", "absent")
_TRUE, _FALSE = {"1", "1.0", "true", "yes", "present"}, {"0", "0.0", "false", "no", "absent"}


# ---------------------------------------------------------------------------------------------- inputs
def concept_labels_from_records(
    records: Sequence[InputRecord], concept_ids: Sequence[str], source: str = "input"
) -> tuple[np.ndarray | None, list[str]]:
    """``(N, K)`` labels (1/0/NaN) from ``concept_<id>`` columns, and the labelled ids the model lacks.

    Raises:
        InputListError: a cell is not 1, 0 or empty (names the row and column).
    """
    cols = sorted({k for r in records for k in r.extra if k.lower().startswith("concept_")})
    if not cols:
        return None, []
    index = {c: i for i, c in enumerate(concept_ids)}
    L = np.full((len(records), len(concept_ids)), np.nan)
    unused = sorted({c[len("concept_") :] for c in cols if c[len("concept_") :] not in index})
    for n, rec in enumerate(records):
        for col in cols:
            cid = col[len("concept_") :]
            raw = str(rec.extra.get(col, "") or "").strip().lower()
            if raw == "" or raw in ("nan", "na", "unknown"):
                continue
            if raw in _TRUE:
                v = 1.0
            elif raw in _FALSE:
                v = 0.0
            else:
                raise InputListError(source, f"row {n + 2}, column {col}: {raw!r} is not 1, 0 or empty")
            if cid in index:
                L[n, index[cid]] = v
    return L, unused


def location_boxes_from_records(records: Sequence[InputRecord], source: str = "input") -> list[list[tuple]] | None:
    """Boxes per record from a ``box`` column (``"x0 y0 x1 y1"`` in original pixels, several separated by ``;``),
    or ``None`` when the input has no such column.

    Raises:
        InputListError: a malformed cell (names the row, the column and the reason).
    """
    col = next((k for r in records for k in r.extra if k.strip().lower() == "box"), None)
    if col is None:
        return None
    out: list[list[tuple]] = []
    for n, rec in enumerate(records):
        try:
            out.append(parse_boxes(rec.extra.get(col)))
        except ValueError as e:
            raise InputListError(source, f"row {n + 2}, column {col}: {e}") from None
    return out


def what_if_values(bundle: LoadedBundle) -> tuple[np.ndarray, np.ndarray, str]:
    """Per concept the score meaning *present* and *absent* (``hi``, ``lo``) and how they were chosen.

    With a source reference set: its 95th and 5th percentiles; else for probe grounding (probabilities)
    1 and 0; else the neutral value plus/minus 2 (text scores are standardised on the reference).
    """
    net = bundle.network
    neutral = net.neutral.detach().cpu().numpy().astype(np.float64)
    ref = bundle.reference
    if ref is not None and len(ref.scores):
        s = np.asarray(ref.scores, dtype=np.float64)
        return np.percentile(s, 95, axis=0), np.percentile(s, 5, axis=0), "source reference 95th / 5th percentile"
    if getattr(net.grounding, "mode", "") == "probe":
        return np.ones_like(neutral), np.zeros_like(neutral), "probability 1 / 0"
    return neutral + 2.0, neutral - 2.0, "neutral ± 2 (standardised scores)"


def _parse_what_if(spec: Any, concept_ids: Sequence[str]) -> dict[int, str | float]:
    """``{concept_id: off | present | absent | number}`` (a mapping or ``"id=action,id=action"``)."""
    if spec in (None, "", "None", {}):
        return {}
    if isinstance(spec, str):
        try:
            spec = dict(part.split("=", 1) for part in spec.split(",") if part.strip())
        except ValueError:
            raise InputListError("what_if", f"{spec!r}: expected concept_id=off|present|absent[,...]") from None
    if not isinstance(spec, Mapping):
        raise InputListError("what_if", f"expected a mapping concept_id -> off|present|absent|number, got {spec!r}")
    out: dict[int, str | float] = {}
    for cid, action in spec.items():
        cid = str(cid).strip()
        if cid not in concept_ids:
            raise InputListError("what_if", f"unknown concept {cid!r}; this model has {list(concept_ids)}")
        a = str(action).strip().lower()
        if a in WHAT_IF_ACTIONS:
            out[list(concept_ids).index(cid)] = a
        else:
            try:
                out[list(concept_ids).index(cid)] = float(a)
            except ValueError:
                raise InputListError("what_if", f"{cid}: {action!r} is not off, present, absent or a number") from None
    return out


# ---------------------------------------------------------------------------------------------- per image
def _softmax(z: np.ndarray) -> np.ndarray:
    return M.softmax(z[None])[0]


def _label(cid: str, direction: str) -> str:
    return f"not {cid}" if direction == "absent" else cid


def explain(
    image: str,
    scores: np.ndarray,
    contributions: np.ndarray,
    bias: np.ndarray,
    weight: np.ndarray,
    neutral: np.ndarray,
    concept_ids: Sequence[str],
    class_names: Sequence[str],
    hi: np.ndarray,
    lo: np.ndarray,
    top_k: int = 5,
    n_what_if: int = 3,
    user_what_if: Mapping[int, str | float] | None = None,
) -> dict[str, Any]:
    """One ``explanations.jsonl`` entry from one image's arrays (edited scores, ``(C, K)`` contributions).

    ``logits[c]`` is ``math.fsum`` of the written contributions of class ``c`` and its bias, so the written
    numbers add up exactly (the model's float32 logits agree to ~1e-6).
    """
    contrib = {
        c: {k: float(contributions[ci, ki]) for ki, k in enumerate(concept_ids)} for ci, c in enumerate(class_names)
    }
    bias_d = {c: float(bias[ci]) for ci, c in enumerate(class_names)}
    logits = np.array([math.fsum(list(contrib[c].values()) + [bias_d[c]]) for c in class_names])
    proba = _softmax(logits)
    pred = int(np.argmax(logits))
    tops = top_concepts(concept_ids, contributions[pred], scores, neutral, top_k)
    n95, exp_h = M.effective_concept_counts(contributions[pred][None], 0.95)

    def scenario(change: str, s: np.ndarray) -> dict[str, Any]:
        p = _softmax(s.astype(np.float64) @ weight.T.astype(np.float64) + (bias - weight @ neutral))
        j = int(np.argmax(p))
        return {
            "change": change,
            "prediction": class_names[j],
            "probability": round(float(p[j]), 6),
            "p_original": round(float(p[pred]), 6),
        }

    what_if = []
    base = scores.astype(np.float64)
    for cid, direction, _ in tops[:n_what_if]:
        k = list(concept_ids).index(cid)
        for action, value in (("off", neutral[k]), ("present", hi[k]), ("absent", lo[k])):
            s = base.copy()
            s[k] = value
            what_if.append({"concept": cid, "action": action, **scenario(f"{cid}: {action}", s)})
    if user_what_if:
        s = base.copy()
        desc = []
        for k, action in user_what_if.items():
            value = {"off": neutral[k], "present": hi[k], "absent": lo[k]}.get(action, action)  # type: ignore[arg-type]
            s[k] = float(value)
            desc.append(f"{concept_ids[k]}: {action}")
        what_if.append({"concept": None, "action": "user", **scenario("; ".join(desc), s)})
    return {
        "image": image,
        "status": "ok",
        "prediction": class_names[pred],
        "probability": round(float(proba[pred]), 6),
        "probabilities": {c: float(p) for c, p in zip(class_names, proba)},
        "logits": {c: float(v) for c, v in zip(class_names, logits)},
        "bias": bias_d,
        "concept_scores": {k: float(v) for k, v in zip(concept_ids, scores)},
        "contributions": contrib,
        "top_concepts": [
            {
                "concept": cid,
                "label": _label(cid, d),
                "direction": d,
                "contribution": v,
                "score": float(scores[list(concept_ids).index(cid)]),
                "neutral": float(neutral[list(concept_ids).index(cid)]),
            }
            for cid, d, v in tops
        ],
        "what_if": what_if,
        "effective_concepts": {"n_95": int(n95[0]), "exp_entropy": round(float(exp_h[0]), 4)},
    }


# ---------------------------------------------------------------------------------------------- the audit
def audit_bundle(
    bundle: LoadedBundle,
    records: Sequence[InputRecord],
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    num_workers: int = 0,
    top_k: int = 5,
    max_cards: int = 24,
    maps_per_image: int = 3,
    map_method: str = "auto",
    what_if: Any = None,
    progress: bool = False,
    source: str = "input",
    location_concepts: int = 3,
    min_box_visible: float = 0.5,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[ImageCard], dict[str, Any]]:
    """Audit ``records`` with ``bundle``: ``(explanations, model_audit, cards, report_meta)``.

    The first ``max_cards`` readable images get a report card with ``maps_per_image`` concept maps. Records
    with boxes (a ``box`` column, see :func:`location_boxes_from_records`) get the maps of their top
    ``location_concepts`` concepts checked against the boxes (``concept_location``,
    :func:`medcbm.audit.location.location_audit`; a box counts when ``min_box_visible`` of it survives the
    preprocessing's crop).
    """
    net = bundle.network
    ids, classes = bundle.concept_ids, bundle.class_names
    W = net.head.weight.detach().cpu().numpy().astype(np.float64)
    neutral = net.neutral.detach().cpu().numpy().astype(np.float64)
    hi, lo, wi_rule = what_if_values(bundle)
    user_wi = _parse_what_if(what_if, ids)
    labels, unused = concept_labels_from_records(records, ids, source)
    boxes = location_boxes_from_records(records, source)
    engine = PredictionEngine(
        bundle, device=device, batch_size=batch_size, num_workers=num_workers, progress=progress, desc="audit"
    )
    entries: list[dict[str, Any] | None] = [None] * len(records)
    arrays: dict[int, dict[str, np.ndarray]] = {}
    for res in engine.iter_batches(records):
        for j, i in enumerate(res.ok):
            e = explain(
                records[i].image,
                res.scores[j],
                res.contributions[j],
                res.bias,
                W,
                neutral,
                ids,
                classes,
                hi,
                lo,
                top_k,
                user_what_if=user_wi,
            )
            if records[i].label:
                e["label"] = records[i].label
            if res.shift_score is not None:
                e["shift_score"] = round(float(res.shift_score[j]), 6)
                e["site_shift"] = bool(res.shift_flag[j])
            if labels is not None:
                e["concept_labels"] = {k: int(labels[i, ki]) for ki, k in enumerate(ids) if not np.isnan(labels[i, ki])}
            logit_gap = float(np.max(np.abs(np.array(list(e["logits"].values())) - res.logits[j])))
            if logit_gap > 1e-3:
                logger.warning(
                    "%s: contributions + bias differ from the model's logits by %.2g", records[i].image, logit_gap
                )
            entries[i] = e
            arrays[i] = {"scores": res.scores[j], "raw": res.scores_unedited[j], "contrib": res.contributions[j]}
        for i, reason in res.errors.items():
            logger.warning("error on input: %s", reason)
            entries[i] = {"image": records[i].image, "status": "error", "error": reason}
    for i, e in enumerate(entries):
        if e is None:
            entries[i] = {"image": records[i].image, "status": "error", "error": "not processed"}
    ok = sorted(arrays)
    n_err = len(records) - len(ok)
    audit: dict[str, Any] = {
        "bundle": {"name": bundle.name, "version": bundle.version},
        "model": {k: v for k, v in bundle.info.items() if isinstance(v, (str, int, float, bool))},
        "n_images": len(records),
        "n_ok": len(ok),
        "n_errors": n_err,
        "what_if_values": wi_rule,
    }
    meta: dict[str, Any] = {"n_ok": len(ok), "n_errors": n_err, "warnings": [], "model": audit["model"]}
    dropped = bundle.fit_meta.get("dropped_concepts") or {}
    audit["dropped_concepts"] = dropped
    meta["dropped_concepts"] = dropped
    if not ok:
        audit.update(prior_agreement=M.prior_agreement(W, bundle.prior, classes, ids))
        return entries, audit, [], meta  # type: ignore[return-value]
    S = np.stack([arrays[i]["scores"] for i in ok]).astype(np.float64)
    R = np.stack([arrays[i]["raw"] for i in ok]).astype(np.float64)
    CT = np.stack([arrays[i]["contrib"] for i in ok]).astype(np.float64)
    pred = np.array([classes.index(entries[i]["prediction"]) for i in ok])  # type: ignore[index]
    Cp = CT[np.arange(len(ok)), pred]  # contributions to the predicted class
    y = np.array([_class_index(bundle, records[i].label) for i in ok])
    if (y >= 0).any():
        audit["accuracy"] = round(float((pred[y >= 0] == y[y >= 0]).mean()), 4)
        audit["n_labelled"] = int((y >= 0).sum())
        meta["accuracy"] = audit["accuracy"]
    audit["prior_agreement"] = M.prior_agreement(W, bundle.prior, classes, ids)
    audit["effective_concepts"] = M.effective_concepts(Cp)
    if audit["effective_concepts"]["warning"]:
        meta["warnings"].append(audit["effective_concepts"]["warning"])
    Lok = labels[ok] if labels is not None else None
    audit["global_importance"] = M.global_importance(
        W,
        bundle.prior,
        ids,
        classes,
        contributions=Cp,
        concept_labels=Lok if Lok is not None and (y >= 0).any() else None,
        class_labels=y if Lok is not None and (y >= 0).any() else None,
    )
    if Lok is not None:
        audit["concept_auroc"] = M.concept_auroc(R, Lok, ids)  # grounding quality: unedited scores
        audit["concept_existence"] = M.concept_existence(Cp, S, neutral, Lok)
        audit["concept_labels_not_in_model"] = unused
    else:
        audit["concept_auroc"] = None
        audit["concept_existence"] = None
    audit["concept_location"] = None  # set below when the input has boxes
    bias = (net.head.bias + net.class_offset).detach().cpu().numpy()  # with a site's label-shift offset
    audit["deletion"] = M.deletion(S, W, bias, neutral)
    # cards with concept maps, and the maps checked against boxes
    cards: list[ImageCard] = []
    mapper = None
    with_box = {i for i in ok if boxes is not None and boxes[i]} if location_concepts > 0 else set()
    if (max_cards > 0 or with_box) and getattr(net, "encoder", None) is not None:
        try:
            mapper = ConceptMapper(net, map_method)
            meta["map_method"] = audit["map_method"] = mapper.method
        except ValueError as e:
            logger.warning("no concept maps: %s", e)
            meta["warnings"].append(f"no concept maps: {e}")
    pipeline = bundle.preprocessing.pipeline()
    pp = bundle.preprocessing
    carded = set(ok[:max_cards])
    loc_items: list[LocationItem] = []
    for i in ok:
        if i not in carded and i not in with_box:
            continue
        e = entries[i]
        assert e is not None
        tops = e["top_concepts"][:maps_per_image]
        loc_tops = e["top_concepts"][:location_concepts] if i in with_box else []
        card = (
            None
            if i not in carded
            else ImageCard(
                image=e["image"],
                prediction=e["prediction"],
                probability=e["probability"],
                label=records[i].label,
                contributions={
                    _label(k, "present" if e["concept_scores"][k] >= neutral[ids.index(k)] else "absent"): v
                    for k, v in e["contributions"][e["prediction"]].items()
                },
                bias=e["bias"][e["prediction"]],
                what_if=e["what_if"],
                shift_score=e.get("shift_score"),
                shift_flag=e.get("site_shift"),
                n_effective=e["effective_concepts"]["n_95"],
            )
        )
        if mapper is not None:
            try:
                original = pipeline.channels(pipeline.loader(records[i].path))  # (3, H, W) as read
                x = pipeline.encoder_input(original)[None].to(next(net.parameters()).device)
                picture = denormalize(x[0], pp.mean, pp.std)
                wanted = list(dict.fromkeys(t["concept"] for t in [*(tops if card is not None else []), *loc_tops]))
                hm = mapper.maps(x, [ids.index(c) for c in wanted])[0].cpu().numpy() if wanted else []
                by_id = dict(zip(wanted, hm))
                if card is not None:
                    card.picture = picture
                    peaks = {}
                    for t in tops:
                        m = by_id[t["concept"]]
                        card.maps.append(
                            (
                                t["concept"],
                                f"{t['direction']}: score {t['score']:.2f} (usual {t['neutral']:.2f})",
                                overlay(picture, m),
                            )
                        )
                        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
                        peaks[t["concept"]] = [round(r / m.shape[0], 3), round(c / m.shape[1], 3)]
                    e["maps"] = {"method": mapper.method, "peak_yx": peaks}
                if loc_tops:
                    geometry = InputGeometry.from_preprocessing(pp, int(original.shape[-2]), int(original.shape[-1]))
                    loc_items.append(
                        LocationItem(
                            image=e["image"],
                            geometry=geometry,
                            boxes=list(boxes[i]),  # type: ignore[index]
                            maps=[(t["concept"], t["direction"], by_id[t["concept"]]) for t in loc_tops],
                            grid_shape=mapper.grid_shape,
                        )
                    )
            except Exception as ex:  # a map must not stop the audit
                logger.warning("%s: no concept maps (%s)", e["image"], ex)
        if card is not None:
            cards.append(card)
    if loc_items:
        loc, per_image = location_audit(loc_items, min_visible=min_box_visible)
        loc["map_method"] = mapper.method if mapper is not None else None
        audit["concept_location"] = meta["concept_location"] = loc
        by_image = {p["image"]: p for p in per_image}
        for i in with_box:
            p = by_image.get(entries[i]["image"])  # type: ignore[index]
            if p is not None:
                entries[i]["location"] = {k: v for k, v in p.items() if k != "image"}  # type: ignore[index]
    elif with_box:
        audit["concept_location"] = {"note": "boxes were given but no concept map could be computed"}
    return entries, audit, cards, meta  # type: ignore[return-value]


def _class_index(bundle: LoadedBundle, label: str | None) -> int:
    if not label:
        return -1
    try:
        return bundle.bank.class_index(label)
    except KeyError:
        return -1


def summary_rows(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's table: one short row per input."""
    rows = []
    for e in entries:
        if e.get("status") != "ok":
            rows.append({"image": e["image"], "status": "error", "error": e.get("error", "")})
            continue
        rows.append(
            {
                "image": e["image"],
                "status": "ok",
                "prediction": e["prediction"],
                "probability": e["probability"],
                "label": e.get("label"),
                "top": [t["label"] for t in e["top_concepts"][:3]],
            }
        )
    return rows


class AuditRunner(BundleJob):
    """The ``configs/audit.yaml`` job: writes ``report.html``, ``explanations.jsonl``, ``model_audit.json``.

    Args:
        bundle_root, output_dir, input: as for inference (``input=None``: the bundle's example images).
        models_dir, backbone, pretrained, adaptation, channel_mode: see :meth:`LoadedBundle.load`.
        device, batch_size, num_workers: as for inference.
        top_k: top concepts listed per image; max_cards: images shown as cards (the rest in a table);
        maps_per_image: concept maps per card; map_method: ``auto`` or one of ``medcbm.audit.MAP_METHODS``.
        what_if: a user intervention applied to every image, ``{concept_id: off|present|absent|number}``.
        location_concepts: top concepts per image whose maps are checked against the input's ``box`` column;
        min_box_visible: fraction of a box that must survive the preprocessing's crop for it to count.
        exit_on_error: CLI behaviour (exit 1 after writing everything if an input failed; exit 2 with one
            line on a bad command); ``False`` returns the error count instead.
        bundle: an already loaded bundle.
    """

    def __init__(
        self,
        bundle_root: str | Path = ".",
        output_dir: str | Path = "audit",
        input: str | Path | None = None,
        models_dir: str | Path | None = None,
        backbone: str | None = None,
        pretrained: str | None = None,
        adaptation: str | Path | None = None,
        channel_mode: str | None = None,
        modality: str = "blood",
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        num_workers: int = 0,
        top_k: int = 5,
        max_cards: int = 24,
        maps_per_image: int = 3,
        map_method: str = "auto",
        what_if: Any = None,
        location_concepts: int = 3,
        min_box_visible: float = 0.5,
        progress: bool = True,
        exit_on_error: bool = True,
        bundle: LoadedBundle | None = None,
    ) -> None:
        job = (bundle_root, output_dir, device, batch_size, num_workers, progress, exit_on_error, bundle)
        self._init_job(*job, models_dir=models_dir, backbone=backbone, pretrained=pretrained, adaptation=adaptation,
                       channel_mode=channel_mode)  # fmt: skip
        self.input = None if input in (None, "", "None") else input
        self.modality = modality
        self.top_k, self.max_cards, self.maps_per_image = int(top_k), int(max_cards), int(maps_per_image)
        self.map_method = map_method
        self.what_if = what_if
        self.location_concepts, self.min_box_visible = int(location_concepts), float(min_box_visible)
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
        if self.input is None:
            records = default_records(self.bundle_root, self.modality, self.output_dir)
            source = "examples"
        else:
            records, source = list_inputs(self.input), str(self.input)
        entries, audit, cards, meta = audit_bundle(
            bundle,
            records,
            self.device,
            self.batch_size,
            self.num_workers,
            self.top_k,
            self.max_cards,
            self.maps_per_image,
            self.map_method,
            self.what_if,
            self.progress,
            source,
            location_concepts=self.location_concepts,
            min_box_visible=self.min_box_visible,
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
