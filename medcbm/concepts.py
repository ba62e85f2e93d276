# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Concept banks: the structure prior of a knowledge-prior concept bottleneck.

A concept bank is a YAML file::

    name: blood_wbc                      # free text identifier
    version: 1
    classes: [basophil, eosinophil, ...] # class names, as in the bundle metadata
    concepts:
      - id: segmented_nucleus            # [a-z0-9_]+, unique
        text: "a nucleus divided into two to five lobes joined by thin strands"
        group: nucleus                   # free text grouping (nucleus, border, ...)
        kind: attribute                  # finding | attribute | artifact
        source:
          citation: "Bain BJ. Blood Cells: A Practical Guide. 6th ed. Wiley; 2022."
          quote: "The nucleus of the mature neutrophil is segmented into two to five lobes ..."
    prior:                               # class -> {concept id: +1 | -1 | 0}; omitted pairs are 0
      neutrophil: {segmented_nucleus: 1, round_nucleus: -1}

``+1`` means the class should show the concept, ``-1`` that it should not, ``0`` unknown.
:func:`load_concept_bank` validates everything and names the offending entry on error.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

import numpy as np
import yaml

__all__ = ["Concept", "ConceptBank", "ConceptBankError", "load_concept_bank", "CONCEPT_KINDS"]

CONCEPT_KINDS = ("finding", "attribute", "artifact")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")


class ConceptBankError(ValueError):
    """A concept bank file or mapping is invalid; the message names the file and the entry."""


@dataclass(frozen=True)
class Concept:
    """One human-readable clinical concept with its provenance."""

    id: str
    text: str
    group: str
    kind: str
    citation: str
    quote: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text": self.text,
            "group": self.group,
            "kind": self.kind,
            "source": {"citation": self.citation, "quote": self.quote},
        }


@dataclass
class ConceptBank:
    """Classes, concepts and the class-by-concept prior ``P`` (shape ``C x K``, values in {-1, 0, 1})."""

    classes: list[str]
    concepts: list[Concept]
    prior: np.ndarray
    name: str = "concept_bank"
    version: str = "1"
    path: str | None = field(default=None, compare=False)

    @property
    def concept_ids(self) -> list[str]:
        return [c.id for c in self.concepts]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.concepts]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    def class_index(self, label: str) -> int:
        """Index of ``label``, matched case-insensitively (``_`` and spaces are equivalent)."""
        key = _norm_label(label)
        for i, c in enumerate(self.classes):
            if _norm_label(c) == key:
                return i
        raise KeyError(f"unknown class {label!r}; expected one of {self.classes}")

    def concept(self, concept_id: str) -> Concept:
        for c in self.concepts:
            if c.id == concept_id:
                return c
        raise KeyError(f"unknown concept {concept_id!r}")

    def text_fingerprint(self) -> str:
        """Hash of the concept ids and texts: text embeddings computed for another value are stale."""
        payload = json.dumps([[c.id, c.text] for c in self.concepts], ensure_ascii=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def subset(self, concept_ids: Sequence[str]) -> "ConceptBank":
        """A bank with only ``concept_ids`` (in that order), e.g. after dropping ungroundable concepts."""
        index = {c: i for i, c in enumerate(self.concept_ids)}
        missing = [c for c in concept_ids if c not in index]
        if missing:
            raise KeyError(f"unknown concepts {missing}")
        cols = [index[c] for c in concept_ids]
        return ConceptBank(
            classes=list(self.classes),
            concepts=[self.concepts[i] for i in cols],
            prior=self.prior[:, cols].copy(),
            name=self.name,
            version=self.version,
            path=self.path,
        )

    def to_dict(self) -> dict[str, Any]:
        prior: dict[str, dict[str, int]] = {}
        for ci, cls in enumerate(self.classes):
            row = {k: int(v) for k, v in zip(self.concept_ids, self.prior[ci]) if v != 0}
            if row:
                prior[cls] = row
        return {
            "name": self.name,
            "version": self.version,
            "classes": list(self.classes),
            "concepts": [c.to_dict() for c in self.concepts],
            "prior": prior,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "<mapping>") -> "ConceptBank":
        """Validate a parsed concept bank; ``origin`` (usually the file path) prefixes every error."""
        if not isinstance(data, Mapping):
            _fail(origin, "top level must be a mapping with 'classes', 'concepts' and 'prior'")
        for key in ("classes", "concepts"):
            if key not in data:
                _fail(origin, f"missing required key '{key}'")
        classes = _parse_classes(data["classes"], origin)
        concepts = _parse_concepts(data["concepts"], origin)
        prior = _parse_prior(data.get("prior") or {}, classes, concepts, origin)
        return cls(
            classes=[str(c) for c in classes],
            concepts=concepts,
            prior=prior,
            name=str(data.get("name", "concept_bank")),
            version=str(data.get("version", "1")),
            path=None if origin == "<mapping>" else origin,
        )


def _fail(origin: str, msg: str) -> NoReturn:
    raise ConceptBankError(f"{origin}: {msg}")


def _parse_classes(classes: Any, origin: str) -> list[str]:
    """The ``classes`` entry, checked: a non-empty list of distinct, non-empty names.

    Args:
        classes: the raw ``classes`` value.
        origin: prefix of every error message.

    Returns:
        ``classes`` itself (names are compared through :func:`_norm_label`).

    Raises:
        ConceptBankError: for a missing, empty or duplicate class name.
    """
    if not isinstance(classes, list) or not classes:
        _fail(origin, "'classes' must be a non-empty list of class names")
    seen_classes: set[str] = set()
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c.strip():
            _fail(origin, f"classes[{i}] must be a non-empty string, got {c!r}")
        if _norm_label(c) in seen_classes:
            _fail(origin, f"duplicate class {c!r}")
        seen_classes.add(_norm_label(c))
    return classes


def _parse_concepts(raw_concepts: Any, origin: str) -> list[Concept]:
    """The ``concepts`` entry as :class:`Concept` objects, each checked in file order.

    Args:
        raw_concepts: the raw ``concepts`` value.
        origin: prefix of every error message.

    Returns:
        The concepts, in file order.

    Raises:
        ConceptBankError: for an empty list or the first invalid or duplicate concept.
    """
    if not isinstance(raw_concepts, list) or not raw_concepts:
        _fail(origin, "'concepts' must be a non-empty list")
    concepts: list[Concept] = []
    ids: set[str] = set()
    for i, rc in enumerate(raw_concepts):
        where = f"concepts[{i}]"
        if not isinstance(rc, Mapping):
            _fail(origin, f"{where} must be a mapping")
        cid = rc.get("id")
        if not isinstance(cid, str) or not _ID_RE.match(cid):
            _fail(origin, f"{where}: id {cid!r} must match [a-z0-9][a-z0-9_]*")
        if cid in ids:
            _fail(origin, f"duplicate concept id '{cid}'")
        ids.add(cid)
        concepts.append(_parse_concept(rc, cid, origin))
    return concepts


def _parse_concept(rc: Mapping[str, Any], cid: str, origin: str) -> Concept:
    """The concept entry ``rc`` whose id ``cid`` is already checked: text, group, kind and source.

    Args:
        rc: the raw concept mapping.
        cid: its (valid, unique) id.
        origin: prefix of every error message.

    Returns:
        The concept, with its strings stripped.

    Raises:
        ConceptBankError: for an empty text or group, an unknown kind or a missing citation.
    """
    where = f"concept '{cid}'"
    text = rc.get("text")
    if not isinstance(text, str) or not text.strip():
        _fail(origin, f"{where}: empty text")
    group = rc.get("group")
    if not isinstance(group, str) or not group.strip():
        _fail(origin, f"{where}: missing group")
    kind = rc.get("kind")
    if kind not in CONCEPT_KINDS:
        _fail(origin, f"{where}: kind {kind!r} must be one of {list(CONCEPT_KINDS)}")
    source = rc.get("source")
    if not isinstance(source, Mapping) or not str(source.get("citation", "")).strip():
        _fail(origin, f"{where}: source.citation is required")
    return Concept(
        id=cid,
        text=text.strip(),
        group=group.strip(),
        kind=kind,
        citation=str(source["citation"]).strip(),
        quote=str(source.get("quote", "") or "").strip(),
    )


def _parse_prior(raw_prior: Any, classes: list[str], concepts: list[Concept], origin: str) -> np.ndarray:
    """The ``prior`` entry as an int8 ``(C, K)`` matrix; pairs it omits are 0.

    Args:
        raw_prior: the raw ``prior`` value (``{}`` when absent).
        classes: the checked class names (matched through :func:`_norm_label`).
        concepts: the checked concepts.
        origin: prefix of every error message.

    Returns:
        The prior, values in {-1, 0, 1}.

    Raises:
        ConceptBankError: for an unknown class or concept, or a value other than +1, -1 or 0.
    """
    prior = np.zeros((len(classes), len(concepts)), dtype=np.int8)
    if not isinstance(raw_prior, Mapping):
        _fail(origin, "'prior' must map class -> {concept_id: +1 | -1 | 0}")
    cindex = {_norm_label(c): i for i, c in enumerate(classes)}
    kindex = {c.id: k for k, c in enumerate(concepts)}
    for cls_name, row in raw_prior.items():
        ci = cindex.get(_norm_label(str(cls_name)))
        if ci is None:
            _fail(origin, f"prior: unknown class {cls_name!r} (classes are {classes})")
        if not isinstance(row, Mapping):
            _fail(origin, f"prior[{cls_name}] must map concept_id -> +1 | -1 | 0")
        for cid, value in row.items():
            if cid not in kindex:
                _fail(origin, f"prior[{cls_name}]: unknown concept {cid!r}")
            if isinstance(value, bool) or value not in (-1, 0, 1):
                _fail(origin, f"prior[{cls_name}][{cid}]: value {value!r} must be +1, -1 or 0")
            prior[ci, kindex[cid]] = int(value)
    return prior


def load_concept_bank(path: str | Path) -> ConceptBank:
    """Load and validate a concept bank YAML file.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ConceptBankError: when the content is invalid; the message names the file and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept bank not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConceptBankError(f"{path}: not valid YAML ({e})") from e
    return ConceptBank.from_dict(data, origin=str(path))


def _norm_label(label: str) -> str:
    return re.sub(r"[\s_\-]+", "_", str(label).strip().lower())
