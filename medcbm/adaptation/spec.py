# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""``adaptation.json``: the typed, validated test-time edit of a bundle (CONTRACT.md, METHODS.md §2).

The edit is a concept mask (masked scores take the concept's neutral value) and a per-concept gain. Fitted on an
unlabelled site sample, the file may also hold a per-concept monotone ``calibration`` of the concept scores (applied
before the edit) and a ``label_shift`` logit offset (added to the logits); empty objects mean none. Everything else
in the file says why (``reasons``), what it did (accuracies before/after on the support
set and on the source reference set) and on what (``provenance``: bundle, support CSV / image hashes).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io.atomic import atomic_write_text

__all__ = ["AdaptationSpec", "AdaptationSpecError", "SPEC_FORMAT_VERSION"]

SPEC_FORMAT_VERSION = "1"
_ACCURACY_FIELDS = (
    "source_accuracy_before",
    "source_accuracy_after",
    "support_accuracy_before",
    "support_accuracy_after",
)


class AdaptationSpecError(ValueError):
    """An ``adaptation.json`` (or its dict) that does not follow the contract; the message names the file."""


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class AdaptationSpec:
    """A training-free concept edit plus its audit trail.

    Attributes:
        mask: concept ids whose score is replaced by the neutral (source-mean) value.
        gain: concept id -> finite factor >= 0 multiplying the concept score.
        reasons: concept id -> human-readable reason, one per edited concept.
        source_accuracy_before / source_accuracy_after: accuracy on the bundle's source reference set.
        support_accuracy_before / support_accuracy_after: (leave-one-out) accuracy on the support set.
        provenance: ``bundle`` {name, version}, ``support_csv_sha256``, ``support_images`` {image: sha256},
            ``k_per_class`` {class: count}, and anything else worth keeping (free-form beyond these).
        warnings: human-readable warnings (e.g. a class missing from the support set).
        missing_classes: bundle classes with no support image.
        method: the search's parameters (thresholds, gamma_max, guard tolerance, ...).
        calibration: ``{}`` or ``{"space": "logit" | "score", "concepts": {concept id: {"slope": > 0,
            "intercept": number, "reason": text, ...}}, ...}``: score ``u`` (its logit in ``logit`` space) becomes
            ``slope * u + intercept`` before the edit (:mod:`medcbm.adaptation.calibration`).
        label_shift: ``{}`` or ``{"applied": bool, "reason": text, "logit_offset": {class: number}, ...}``: when
            applied, the offsets are added to the logits (:mod:`medcbm.adaptation.label_shift`).
        format_version: version of this file format.
    """

    mask: list[str] = field(default_factory=list)
    gain: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    source_accuracy_before: float | None = None
    source_accuracy_after: float | None = None
    support_accuracy_before: float | None = None
    support_accuracy_after: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    missing_classes: list[str] = field(default_factory=list)
    method: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    label_shift: dict[str, Any] = field(default_factory=dict)
    format_version: str = SPEC_FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    @property
    def edited_concepts(self) -> list[str]:
        """Masked concepts, then amplified (gain != 1) ones, without repeats."""
        out = list(self.mask)
        out += [c for c, g in self.gain.items() if g != 1.0 and c not in out]
        return out

    def validate(self, concept_ids: Sequence[str] | None = None, source: str | None = None) -> "AdaptationSpec":
        """Check types and values; with ``concept_ids``, also that every id is one of the bundle's.

        Raises:
            AdaptationSpecError: naming ``source`` (a file path) and the reason.
        """
        w = _where(source)
        if not isinstance(self.mask, list) or not all(isinstance(c, str) for c in self.mask):
            raise AdaptationSpecError(f"{w}'mask' must be a list of concept ids (strings), got {self.mask!r}")
        if len(set(self.mask)) != len(self.mask):
            raise AdaptationSpecError(f"{w}'mask' lists a concept more than once: {self.mask}")
        if not isinstance(self.gain, dict):
            raise AdaptationSpecError(f"{w}'gain' must be an object concept_id -> factor, got {self.gain!r}")
        for cid, g in self.gain.items():
            if not isinstance(cid, str):
                raise AdaptationSpecError(f"{w}'gain' key {cid!r} is not a concept id string")
            if not _finite_number(g) or g < 0:
                raise AdaptationSpecError(f"{w}gain for concept {cid!r} must be a finite number >= 0, got {g!r}")
        both = sorted(set(self.mask) & set(self.gain))
        if both:
            raise AdaptationSpecError(f"{w}concepts {both} are both masked and amplified; an edit is one or the other")
        if not isinstance(self.reasons, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.reasons.items()
        ):
            raise AdaptationSpecError(f"{w}'reasons' must be an object concept_id -> text")
        for name in _ACCURACY_FIELDS:
            v = getattr(self, name)
            if v is not None and (not _finite_number(v) or not 0.0 <= v <= 1.0):
                raise AdaptationSpecError(f"{w}{name!r} must be a number in [0, 1] or null, got {v!r}")
        for name in ("provenance", "method"):
            if not isinstance(getattr(self, name), dict):
                raise AdaptationSpecError(f"{w}{name!r} must be an object")
        for name in ("warnings", "missing_classes"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise AdaptationSpecError(f"{w}{name!r} must be a list of strings")
        _check_calibration(self.calibration, w)
        _check_label_shift(self.label_shift, w)
        if concept_ids is not None:
            known = set(concept_ids)
            calibrated = set(self.calibration.get("concepts", {}))
            unknown = sorted({*self.mask, *self.gain, *self.reasons, *calibrated} - known)
            if unknown:
                raise AdaptationSpecError(
                    f"{w}unknown concept ids {unknown}; this bundle's concepts are {list(concept_ids)}"
                )
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (contract fields first)."""
        return {
            "format_version": self.format_version,
            "mask": list(self.mask),
            "gain": {k: float(v) for k, v in self.gain.items()},
            "reasons": dict(self.reasons),
            **{name: getattr(self, name) for name in _ACCURACY_FIELDS},
            "missing_classes": list(self.missing_classes),
            "warnings": list(self.warnings),
            "method": dict(self.method),
            "calibration": dict(self.calibration),
            "label_shift": dict(self.label_shift),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], concept_ids: Sequence[str] | None = None, source: str | None = None
    ) -> "AdaptationSpec":
        """Build and validate from a parsed ``adaptation.json``; unknown top-level keys are an error."""
        w = _where(source)
        if not isinstance(data, Mapping):
            raise AdaptationSpecError(f"{w}expected a JSON object, got {type(data).__name__}")
        allowed = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(data) - allowed)
        if extra:
            raise AdaptationSpecError(f"{w}unknown fields {extra}; allowed: {sorted(allowed)}")
        kwargs = dict(data)
        if "format_version" in kwargs:
            kwargs["format_version"] = str(kwargs["format_version"])
        gain = kwargs.get("gain", {})
        if isinstance(gain, dict):  # ints are valid factors; keep them as floats
            kwargs["gain"] = {k: float(v) if _finite_number(v) else v for k, v in gain.items()}
        spec = cls.__new__(cls)  # bypass __post_init__: validate below with the file name in the message
        for name, f in cls.__dataclass_fields__.items():
            if name in kwargs:
                value = kwargs[name]
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(spec, name, value)
        return spec.validate(concept_ids, source)

    @classmethod
    def read(cls, path: str | os.PathLike[str], concept_ids: Sequence[str] | None = None) -> "AdaptationSpec":
        """Read and validate ``adaptation.json``.

        Raises:
            FileNotFoundError: the file does not exist.
            AdaptationSpecError: bad JSON, wrong types, unknown concept ids, negative / non-finite gain.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"adaptation file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise AdaptationSpecError(f"{path}: cannot read ({e})") from None
        try:
            # NaN / Infinity are not JSON; refuse them rather than let them through as floats
            data = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            raise AdaptationSpecError(f"{path}: not valid JSON ({e})") from None
        except ValueError as e:
            raise AdaptationSpecError(f"{path}: {e}") from None
        return cls.from_dict(data, concept_ids, str(path))

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (:func:`medcbm.io.atomic.atomic_write_text`), JSON with indent 4."""
        self.validate()
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=4, allow_nan=False) + "\n"
        atomic_write_text(path, text)
        return path

    # ------------------------------------------------------------------ use
    def apply(self, network: Any) -> Any:
        """Set this adaptation on a :class:`~medcbm.networks.ConceptBottleneckClassifier`: the site calibration and
        label-shift offset (``network.set_site_calibration``; identity / zeros when the file has none), then the
        edit (``network.set_edit``)."""
        concepts = list(getattr(network, "concepts", []))
        self.validate(concepts or None)
        slope, intercept = [1.0] * len(concepts), [0.0] * len(concepts)
        for cid, m in self.calibration.get("concepts", {}).items():
            k = concepts.index(cid)
            slope[k], intercept[k] = float(m["slope"]), float(m["intercept"])
        offset = None
        if self.label_shift.get("applied"):
            table = self.label_shift["logit_offset"]
            missing = [c for c in network.targets if c not in table]
            if missing or set(table) - set(network.targets):
                raise AdaptationSpecError(
                    f"'label_shift.logit_offset' must name exactly this bundle's classes {list(network.targets)}, "
                    f"got {sorted(table)}"
                )
            offset = [float(table[c]) for c in network.targets]
        network.set_site_calibration(slope, intercept, self.calibration.get("space", "logit") == "logit", offset)
        return network.set_edit(list(self.mask), dict(self.gain))


def _check_calibration(cal: Any, w: str) -> None:
    """``calibration``: empty, or a space and per-concept monotone (slope > 0) affine maps, each with a reason."""
    if not isinstance(cal, dict):
        raise AdaptationSpecError(f"{w}'calibration' must be an object")
    if not cal:
        return
    if cal.get("space") not in ("logit", "score"):
        raise AdaptationSpecError(f"{w}'calibration.space' must be 'logit' or 'score', got {cal.get('space')!r}")
    concepts = cal.get("concepts", {})
    if not isinstance(concepts, dict):
        raise AdaptationSpecError(f"{w}'calibration.concepts' must be an object concept_id -> map")
    for cid, m in concepts.items():
        if not isinstance(m, dict) or not isinstance(m.get("reason"), str):
            raise AdaptationSpecError(f"{w}calibration of concept {cid!r} must be an object with a 'reason' text")
        slope, intercept = m.get("slope"), m.get("intercept")
        if not (_finite_number(slope) and slope > 0 and _finite_number(intercept)):
            raise AdaptationSpecError(
                f"{w}calibration of concept {cid!r} needs a finite slope > 0 (monotone) and a finite intercept, "
                f"got slope {slope!r}, intercept {intercept!r}"
            )


def _check_label_shift(ls: Any, w: str) -> None:
    """``label_shift``: empty, or ``applied`` with a reason and, when applied, finite per-class logit offsets."""
    if not isinstance(ls, dict):
        raise AdaptationSpecError(f"{w}'label_shift' must be an object")
    if not ls:
        return
    if not isinstance(ls.get("applied"), bool) or not isinstance(ls.get("reason"), str):
        raise AdaptationSpecError(f"{w}'label_shift' needs 'applied' (true/false) and a 'reason' text")
    if ls["applied"]:
        table = ls.get("logit_offset")
        if not isinstance(table, dict) or not table or not all(_finite_number(v) for v in table.values()):
            raise AdaptationSpecError(f"{w}'label_shift.logit_offset' must map every class to a finite number")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")
