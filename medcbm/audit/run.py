# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The audit of a bundle on a list of images: ``(explanations, model_audit, cards, report_meta)``.

Steps, in order: every image is explained (:func:`medcbm.audit.explain.explain`); the readable ones feed the
model-level metrics (:mod:`medcbm.audit.metrics`); the first ``max_cards`` images and every image with boxes get
concept maps (:mod:`medcbm.audit.maps`), the first for the report's cards, the second checked against the boxes
(:mod:`medcbm.audit.location`). The job around it (options, bundle loading, writing the files) is
:mod:`medcbm.workflows.audit`.

Images are named by the path the user gave; no DICOM header value is read into any output or log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..bundle import LoadedBundle
from ..data import InputRecord
from ..engine import PredictionEngine
from ..predictions import concept_direction, concept_label
from . import metrics as M
from .explain import explain, parse_what_if, what_if_values
from .inputs import concept_labels_from_records, location_boxes_from_records
from .location import InputGeometry, LocationItem, location_audit
from .maps import ConceptMapper, denormalize, overlay
from .report import ImageCard

__all__ = ["AuditOptions", "audit_bundle", "summary_rows"]

logger = logging.getLogger(__name__)
Arrays = dict[int, dict[str, np.ndarray]]  # per readable record: edited and unedited scores, contributions


@dataclass(frozen=True)
class AuditOptions:
    """What the audit shows and checks (the ``audit.yaml`` options of the same names).

    Attributes:
        top_k: top concepts listed per image.
        max_cards, maps_per_image, map_method: the report's cards and their concept maps (``map_method``:
            ``auto`` or one of ``medcbm.audit.MAP_METHODS``).
        what_if: the user's intervention (see :func:`medcbm.audit.explain.parse_what_if`).
        location_concepts, min_box_visible: the location check (``0`` concepts: none; a box counts when that
            fraction of it survives the preprocessing's crop).
    """

    top_k: int = 5
    max_cards: int = 24
    maps_per_image: int = 3
    map_method: str = "auto"
    what_if: Any = None
    location_concepts: int = 3
    min_box_visible: float = 0.5

    def __post_init__(self) -> None:
        for name in ("top_k", "max_cards", "maps_per_image", "location_concepts"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "min_box_visible", float(self.min_box_visible))


def audit_bundle(
    bundle: LoadedBundle,
    records: Sequence[InputRecord],
    options: AuditOptions | None = None,
    source: str = "input",
    **engine_options: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[ImageCard], dict[str, Any]]:
    """Audit ``records`` with ``bundle``: ``(explanations, model_audit, cards, report_meta)``.

    The first ``max_cards`` readable images get a report card with ``maps_per_image`` concept maps. Records
    with boxes (a ``box`` column, see :func:`location_boxes_from_records`) get the maps of their top
    ``location_concepts`` concepts checked against the boxes (``concept_location``,
    :func:`medcbm.audit.location.location_audit`; a box counts when ``min_box_visible`` of it survives the
    preprocessing's crop).

    Args:
        bundle: the loaded bundle.
        records: the images (with ``label``, ``concept_<id>`` and ``box`` columns where given).
        options: what to show and check (:class:`AuditOptions`; its defaults when ``None``).
        source: the input's name, for error messages.
        engine_options: ``device``, ``batch_size``, ``num_workers``, ``progress`` (off by default) of the
            :class:`~medcbm.engine.PredictionEngine` that reads the images.

    Raises:
        InputListError: a bad ``what_if``, concept label or box cell (one line naming it).
    """
    o = options or AuditOptions()
    ids = bundle.concept_ids
    hi, lo, wi_rule = what_if_values(bundle)
    user_wi = parse_what_if(o.what_if, ids)
    labels, unused = concept_labels_from_records(records, ids, source)
    boxes = location_boxes_from_records(records, source)
    engine = PredictionEngine(bundle, **{"progress": False, **engine_options, "desc": "audit"})
    entries, arrays = _explain_records(bundle, records, engine, hi, lo, o.top_k, user_wi, labels)
    ok = sorted(arrays)
    audit, meta = _audit_header(bundle, len(records), len(ok), wi_rule)
    if not ok:
        W = bundle.head_arrays().weight
        audit.update(prior_agreement=M.prior_agreement(W, bundle.prior, bundle.class_names, ids))
        return entries, audit, [], meta
    _model_metrics(bundle, records, entries, arrays, ok, labels, unused, audit, meta)
    with_box = {i for i in ok if boxes is not None and boxes[i]} if o.location_concepts > 0 else set()
    mapper = _concept_mapper(bundle, o.map_method, o.max_cards > 0 or bool(with_box), audit, meta)
    plan = _MapPlan(set(ok[: o.max_cards]), with_box, o.maps_per_image, o.location_concepts)
    cards, loc_items = _cards_and_maps(bundle, records, entries, ok, boxes, plan, mapper)
    _location_results(loc_items, with_box, mapper, entries, audit, meta, o.min_box_visible)
    return entries, audit, cards, meta


# ---------------------------------------------------------------------------------------------- per image
def _explain_records(
    bundle: LoadedBundle,
    records: Sequence[InputRecord],
    engine: PredictionEngine,
    hi: np.ndarray,
    lo: np.ndarray,
    top_k: int,
    user_wi: Mapping[int, str | float],
    labels: np.ndarray | None,
) -> tuple[list[dict[str, Any]], Arrays]:
    """One entry per record in input order (``error`` entries for unreadable ones), and the arrays of the readable
    ones that the model-level metrics need."""
    head = bundle.head_arrays()
    W, neutral = head.weight, head.neutral
    ids, classes = bundle.concept_ids, bundle.class_names
    entries: list[dict[str, Any] | None] = [None] * len(records)
    arrays: Arrays = {}
    for res in engine.iter_batches(records):
        for j, i in enumerate(res.ok):
            e = explain(records[i].image, res.scores[j], res.contributions[j], res.bias, W, neutral, ids, classes,
                        hi, lo, top_k, user_what_if=user_wi)  # fmt: skip
            _annotate(e, records[i], res, j, labels[i] if labels is not None else None, ids)
            entries[i] = e
            arrays[i] = {"scores": res.scores[j], "raw": res.scores_unedited[j], "contrib": res.contributions[j]}
        for i, reason in res.errors.items():
            logger.warning("error on input: %s", reason)
            entries[i] = {"image": records[i].image, "status": "error", "error": reason}
    done = [e if e is not None else {"image": r.image, "status": "error", "error": "not processed"}
            for e, r in zip(entries, records)]  # fmt: skip
    return done, arrays


def _annotate(
    e: dict[str, Any], record: InputRecord, res: Any, j: int, label_row: np.ndarray | None, ids: Sequence[str]
) -> None:
    """Add what the input and the engine know about the image to its entry: the given class and concept labels,
    the site-shift score; and check that the written contributions add up to the model's own logits."""
    if record.label:
        e["label"] = record.label
    if res.shift_score is not None:
        e["shift_score"] = round(float(res.shift_score[j]), 6)
        e["site_shift"] = bool(res.shift_flag[j])
    if label_row is not None:
        e["concept_labels"] = {k: int(label_row[ki]) for ki, k in enumerate(ids) if not np.isnan(label_row[ki])}
    logit_gap = float(np.max(np.abs(np.array(list(e["logits"].values())) - res.logits[j])))
    if logit_gap > 1e-3:
        logger.warning("%s: contributions + bias differ from the model's logits by %.2g", record.image, logit_gap)


# ---------------------------------------------------------------------------------------------- model level
def _audit_header(
    bundle: LoadedBundle, n_images: int, n_ok: int, wi_rule: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The start of ``model_audit.json`` (bundle, counts, what-if rule, dropped concepts) and of the report's meta."""
    audit: dict[str, Any] = {
        "bundle": {"name": bundle.name, "version": bundle.version},
        "model": {k: v for k, v in bundle.info.items() if isinstance(v, (str, int, float, bool))},
        "n_images": n_images,
        "n_ok": n_ok,
        "n_errors": n_images - n_ok,
        "what_if_values": wi_rule,
    }
    meta: dict[str, Any] = {"n_ok": n_ok, "n_errors": n_images - n_ok, "warnings": [], "model": audit["model"]}
    dropped = bundle.fit_meta.get("dropped_concepts") or {}
    audit["dropped_concepts"] = dropped
    meta["dropped_concepts"] = dropped
    return audit, meta


def _class_index(bundle: LoadedBundle, label: str | None) -> int:
    if not label:
        return -1
    try:
        return bundle.bank.class_index(label)
    except KeyError:
        return -1


def _model_metrics(
    bundle: LoadedBundle,
    records: Sequence[InputRecord],
    entries: Sequence[dict[str, Any]],
    arrays: Arrays,
    ok: list[int],
    labels: np.ndarray | None,
    unused: list[str],
    audit: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    """The model-level metrics over the readable images, added to ``audit`` (and ``meta``) in the file's order."""
    head = bundle.head_arrays()
    ids, classes = bundle.concept_ids, bundle.class_names
    W, neutral = head.weight, head.neutral
    S = np.stack([arrays[i]["scores"] for i in ok]).astype(np.float64)
    R = np.stack([arrays[i]["raw"] for i in ok]).astype(np.float64)
    CT = np.stack([arrays[i]["contrib"] for i in ok]).astype(np.float64)
    pred = np.array([classes.index(entries[i]["prediction"]) for i in ok])
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
    with_labels = Lok is not None and (y >= 0).any()
    audit["global_importance"] = M.global_importance(
        W, bundle.prior, ids, classes, contributions=Cp, concept_labels=Lok if with_labels else None,
        class_labels=y if with_labels else None,
    )  # fmt: skip
    if Lok is not None:
        audit["concept_auroc"] = M.concept_auroc(R, Lok, ids)  # grounding quality: unedited scores
        audit["concept_existence"] = M.concept_existence(Cp, S, neutral, Lok)
        audit["concept_labels_not_in_model"] = unused
    else:
        audit["concept_auroc"] = None
        audit["concept_existence"] = None
    audit["concept_location"] = None  # set by _location_results when the input has boxes
    audit["deletion"] = M.deletion(S, W, head.bias + head.offset, neutral)  # with a site's label-shift offset


# ---------------------------------------------------------------------------------------------- concept maps
@dataclass(frozen=True)
class _MapPlan:
    """Which images get maps and how many: cards for ``carded``, the location check for ``with_box``."""

    carded: set[int]
    with_box: set[int]
    maps_per_image: int
    location_concepts: int


def _concept_mapper(
    bundle: LoadedBundle,
    map_method: str,
    wanted: bool,
    audit: dict[str, Any],
    meta: dict[str, Any],
) -> Any:
    """The concept mapper when maps are ``wanted`` and the network has an image encoder; ``None`` (with a report
    warning) when the method does not apply to this network."""
    net = bundle.network
    if not wanted or getattr(net, "encoder", None) is None:
        return None
    try:
        mapper = ConceptMapper(net, map_method)
    except ValueError as e:
        logger.warning("no concept maps: %s", e)
        meta["warnings"].append(f"no concept maps: {e}")
        return None
    meta["map_method"] = audit["map_method"] = mapper.method
    return mapper


def _card(e: dict[str, Any], record: InputRecord, neutral: np.ndarray, ids: Sequence[str]) -> ImageCard:
    """The report card of one explained image (its maps are added by :func:`_draw_maps`)."""
    pred = e["prediction"]
    return ImageCard(
        image=e["image"],
        prediction=pred,
        probability=e["probability"],
        label=record.label,
        contributions={
            concept_label(k, concept_direction(e["concept_scores"][k], neutral[ids.index(k)])): v
            for k, v in e["contributions"][pred].items()
        },
        bias=e["bias"][pred],
        what_if=e["what_if"],
        shift_score=e.get("shift_score"),
        shift_flag=e.get("site_shift"),
        n_effective=e["effective_concepts"]["n_95"],
    )


def _cards_and_maps(
    bundle: LoadedBundle,
    records: Sequence[InputRecord],
    entries: Sequence[dict[str, Any]],
    ok: list[int],
    boxes: list[list[tuple]] | None,
    plan: _MapPlan,
    mapper: Any,
) -> tuple[list[ImageCard], list[LocationItem]]:
    """The report's cards (with maps) and the location items of the images with boxes, in input order."""
    ids = bundle.concept_ids
    neutral = bundle.head_arrays().neutral
    pipeline = bundle.preprocessing.pipeline()
    cards: list[ImageCard] = []
    loc_items: list[LocationItem] = []
    for i in ok:
        if i not in plan.carded and i not in plan.with_box:
            continue
        e = entries[i]
        tops = e["top_concepts"][: plan.maps_per_image]
        loc_tops = e["top_concepts"][: plan.location_concepts] if i in plan.with_box else []
        card = _card(e, records[i], neutral, ids) if i in plan.carded else None
        if mapper is not None:
            try:
                image_boxes = list(boxes[i]) if loc_tops else []  # type: ignore[index]
                item = _draw_maps(bundle, pipeline, mapper, records[i], e, card, tops, loc_tops, image_boxes)
                if item is not None:
                    loc_items.append(item)
            except Exception as ex:  # a map must not stop the audit
                logger.warning("%s: no concept maps (%s)", e["image"], ex)
        if card is not None:
            cards.append(card)
    return cards, loc_items


def _draw_maps(
    bundle: LoadedBundle,
    pipeline: Any,
    mapper: Any,
    record: InputRecord,
    e: dict[str, Any],
    card: ImageCard | None,
    tops: Sequence[dict[str, Any]],
    loc_tops: Sequence[dict[str, Any]],
    image_boxes: list[tuple],
) -> LocationItem | None:
    """Read the image once, map the concepts the card and the location check need, fill the card (and the entry's
    ``maps``); return the image's location item (its maps of ``loc_tops`` with ``image_boxes``) when
    ``loc_tops`` asks for one."""
    net, pp, ids = bundle.network, bundle.preprocessing, bundle.concept_ids
    original = pipeline.channels(pipeline.loader(record.path))  # (3, H, W) as read
    x = pipeline.encoder_input(original)[None].to(next(net.parameters()).device)
    picture = denormalize(x[0], pp.mean, pp.std)
    wanted = list(dict.fromkeys(t["concept"] for t in [*(tops if card is not None else []), *loc_tops]))
    hm = mapper.maps(x, [ids.index(c) for c in wanted])[0].cpu().numpy() if wanted else []
    by_id = dict(zip(wanted, hm))
    if card is not None:
        _fill_card(card, e, picture, tops, by_id, mapper.method)
    if not loc_tops:
        return None
    return LocationItem(
        image=e["image"],
        geometry=InputGeometry.from_preprocessing(pp, int(original.shape[-2]), int(original.shape[-1])),
        boxes=image_boxes,
        maps=[(t["concept"], t["direction"], by_id[t["concept"]]) for t in loc_tops],
        grid_shape=mapper.grid_shape,
    )


def _fill_card(
    card: ImageCard,
    e: dict[str, Any],
    picture: np.ndarray,
    tops: Sequence[dict[str, Any]],
    by_id: Mapping[str, np.ndarray],
    method: str,
) -> None:
    """The card's picture and one overlay per top concept; the entry gets each map's peak (row, column in [0, 1])."""
    card.picture = picture
    peaks = {}
    for t in tops:
        m = by_id[t["concept"]]
        score = f"{t['direction']}: score {t['score']:.2f} (usual {t['neutral']:.2f})"
        card.maps.append((t["concept"], score, overlay(picture, m)))
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        peaks[t["concept"]] = [round(r / m.shape[0], 3), round(c / m.shape[1], 3)]
    e["maps"] = {"method": method, "peak_yx": peaks}


def _location_results(
    loc_items: list[LocationItem],
    with_box: set[int],
    mapper: Any,
    entries: Sequence[dict[str, Any]],
    audit: dict[str, Any],
    meta: dict[str, Any],
    min_box_visible: float,
) -> None:
    """The location check over the mapped images with boxes: ``concept_location`` in ``audit`` and ``meta``, and
    each such image's ``location`` in its entry."""
    if loc_items:
        loc, per_image = location_audit(loc_items, min_visible=min_box_visible)
        loc["map_method"] = mapper.method if mapper is not None else None
        audit["concept_location"] = meta["concept_location"] = loc
        by_image = {p["image"]: p for p in per_image}
        for i in with_box:
            p = by_image.get(entries[i]["image"])
            if p is not None:
                entries[i]["location"] = {k: v for k, v in p.items() if k != "image"}
    elif with_box:
        audit["concept_location"] = {"note": "boxes were given but no concept map could be computed"}


# ---------------------------------------------------------------------------------------------- the report's table
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
