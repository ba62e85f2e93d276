# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""A loaded medcbm bundle as one typed object.

:class:`LoadedBundle` owns everything the four jobs (infer, train, adapt, audit) need from a bundle folder,
and checks that the parts belong together:

- ``network``: the :class:`~medcbm.networks.ConceptBottleneckClassifier` (encoder, grounding, edit, head);
- ``preprocessing``: a :class:`Preprocessing` built from the backbone's own open_clip config and the
  modality's channel mode, validated against the preprocessing the fit stored (a head is never fed
  features it was not fitted on), with ``format_version`` checked;
- ``bank``: the concept bank restricted to the concepts the network uses (ids, texts, provenance, prior);
- ``reference``: the :class:`SourceReference` set (held-out source validation features, concept scores
  and labels, and a sample of training features; no images) that the adaptation source guard, the
  site-shift alarm and the audit use;
- ``adaptation``: the test-time edit applied to the network, if any.

Nothing is patched onto the ``nn.Module``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .backbones import LOCAL_DIR, Backbone, load_backbone
from .concepts import ConceptBank, load_concept_bank
from .errors import BundleLoadError
from .io.atomic import atomic_write_bytes
from .grounding import ConceptGrounding, TextGrounding
from .head import KnowledgePriorHead
from .networks import CBM_FORMAT_VERSION, ConceptBottleneckClassifier, HeadArrays, read_cbm_state, save_cbm_state
from .transforms import CHANNEL_MODES, ClinicalImagePipeline
from .options import is_unset
from .reference_set import REFERENCE_FILE, SourceReference

if TYPE_CHECKING:  # types only: fitting and adaptation import this module's neighbours
    from .adaptation.spec import AdaptationSpec
    from .fitting import FittedCBM

__all__ = [
    "default_backbone_spec",
    "BundleLoadError",
    "Preprocessing",
    "SourceReference",
    "LoadedBundle",
    "build_network",
    "write_model_pt",
    "save_bundle_network",
    "CBM_FILE",
    "REFERENCE_FILE",
    "BACKBONE_DIR",
    "MODEL_PT",
]

logger = logging.getLogger(__name__)

CBM_FILE = "cbm.safetensors"
BACKBONE_DIR = "backbone"
MODEL_PT = "model.pt"


def default_backbone_spec(models_dir: str | Path) -> str:
    """The open_clip spec of the backbone a models folder carries (``local-dir:<models>/backbone``)."""
    return f"local-dir:{Path(models_dir) / BACKBONE_DIR}"


# ---------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes encoder input: data, not code (as open_clip's ``PreprocessCfg``).

    Args:
        channel_mode: ``rgb`` or ``grey`` (X-ray: read as grey, repeated to three channels).
        image_size: encoder input side length.
        mean, std: per-channel normalisation.
        resize_mode: ``shortest`` (resize the short side, centre-crop), ``longest`` (resize the long side,
            pad to square: the whole object stays in view) or ``squash``.
        interpolation: resampling filter name.
    """

    channel_mode: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.channel_mode not in CHANNEL_MODES:
            raise ValueError(f"channel_mode must be one of {CHANNEL_MODES}, got {self.channel_mode!r}")

    @classmethod
    def from_backbone(cls, backbone: Backbone, channel_mode: str) -> "Preprocessing":
        """Read size, mean, std, resize mode and interpolation from the backbone's open_clip config."""
        pp = dict(getattr(backbone.model.visual, "preprocess_cfg", {}) or {})
        return cls(
            channel_mode=channel_mode,
            image_size=int(backbone.image_size),
            mean=tuple(float(v) for v in backbone.mean),
            std=tuple(float(v) for v in backbone.std),
            resize_mode=str(pp.get("resize_mode", "shortest")),
            interpolation=str(pp.get("interpolation", "bicubic")),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            channel_mode=str(d["channel_mode"]),
            image_size=int(d["image_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize_mode=str(d.get("resize_mode", "shortest")),
            interpolation=str(d.get("interpolation", "bicubic")),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def pipeline(self) -> ClinicalImagePipeline:
        """The path -> ``(3, S, S)`` tensor transform."""
        extra: dict[str, Any] = {}
        if self.resize_mode != "shortest" or self.interpolation != "bicubic":
            extra = {"resize_mode": self.resize_mode, "interpolation": self.interpolation}
        return ClinicalImagePipeline(self.channel_mode, self.image_size, self.mean, self.std, **extra)

    def fingerprint(self) -> str:
        """sha256 of the full preprocessing (reader version included): the feature cache key."""
        return self.pipeline().fingerprint()

    def mismatch(self, stored: dict[str, Any]) -> list[str]:
        """Fields that differ from a stored preprocessing dict (empty when they agree)."""
        mine = self.to_dict()
        out = []
        for key, value in mine.items():
            if key not in stored:
                if key in ("resize_mode", "interpolation") and value == Preprocessing.__dataclass_fields__[key].default:
                    continue  # written before these fields existed, with the defaults
                out.append(f"{key} (fit: missing, now: {value})")
                continue
            other = stored[key]
            if isinstance(value, list):
                same = len(value) == len(other) and np.allclose(value, other, rtol=0, atol=1e-7)
            else:
                same = value == other
            if not same:
                out.append(f"{key} (fit: {other}, now: {value})")
        return out


# ---------------------------------------------------------------------------------------------- the bundle
def _read_metadata(root: Path) -> dict[str, Any]:
    meta_path = root / "configs" / "metadata.json"
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleLoadError(f"{meta_path}: cannot read the bundle metadata ({e})") from e


@dataclass
class LoadedBundle:
    """A bundle ready to run. Build it with :meth:`load`; see the module docstring for the parts."""

    name: str
    version: str
    root: Path
    models_dir: Path
    network: ConceptBottleneckClassifier
    backbone: Backbone
    preprocessing: Preprocessing
    bank: ConceptBank
    reference: SourceReference | None = None
    info: dict[str, Any] = field(default_factory=dict)
    adaptation: AdaptationSpec | None = None  # the applied adaptation, if any
    fit_meta: dict[str, Any] = field(default_factory=dict)
    source_class_means: np.ndarray | None = None  # (C, K) mean source score per class, from the fit

    def head_arrays(self) -> HeadArrays:
        """The network's head, edit and offset as numpy arrays (:class:`~medcbm.networks.HeadArrays`)."""
        return self.network.head_arrays()

    # -------------------------------------------------------------- views
    @property
    def class_names(self) -> list[str]:
        return list(self.network.targets)

    @property
    def concept_ids(self) -> list[str]:
        return list(self.network.concepts)

    @property
    def prior(self) -> np.ndarray:
        """``(C, K)`` knowledge prior over the network's concepts, values in {-1, 0, 1}."""
        return self.bank.prior

    def fingerprint(self) -> str:
        """Identity of what a prediction depends on: backbone, preprocessing, fitted parts and the edit."""
        h = hashlib.sha256()
        h.update(self.backbone.fingerprint.encode())
        h.update(self.preprocessing.fingerprint().encode())
        for name, t in sorted(self.network.state_dict().items()):
            if not name.startswith("encoder."):
                h.update(name.encode())
                h.update(t.detach().cpu().float().numpy().tobytes())
        for name, t in sorted(self.network.site_adaptation_tensors().items()):  # empty for the shipped network
            h.update(name.encode())
            h.update(t.float().numpy().tobytes())
        h.update(json.dumps([self.concept_ids, self.class_names]).encode())
        return h.hexdigest()

    def to(self, device: str | torch.device) -> "LoadedBundle":
        self.network.to(device)
        return self

    # -------------------------------------------------------------- adaptation
    def set_adaptation(self, adaptation: Any) -> "LoadedBundle":
        """Apply a test-time edit: an ``AdaptationSpec``, a path to ``adaptation.json``, or ``None`` to reset."""
        if is_unset(adaptation):
            self.network.reset_edit()
            self.adaptation = None
            self.info.pop("adaptation", None)
            return self
        spec = adaptation
        if isinstance(adaptation, (str, Path)):
            spec = _read_adaptation(Path(adaptation), self.concept_ids)
            self.info["adaptation"] = str(adaptation)
        bundle_name = (getattr(spec, "provenance", {}) or {}).get("bundle")
        if isinstance(bundle_name, dict):
            bundle_name = bundle_name.get("name")
        if bundle_name and bundle_name != self.name:
            raise BundleLoadError(
                f"{adaptation}: this adaptation was made for bundle {bundle_name!r}, not {self.name!r}"
            )
        made_for = (getattr(spec, "provenance", {}) or {}).get("model_fingerprint")
        if made_for:
            self.network.reset_edit()
            if made_for != self.fingerprint():
                raise BundleLoadError(
                    f"{adaptation}: made for another fit of {self.name} (the model changed since); "
                    "run configs/adapt.yaml again on your support images"
                )
        spec.apply(self.network)  # edit, site calibration and label-shift offset, or only what the file holds
        self.adaptation = spec
        return self

    # -------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        bundle_root: str | Path,
        models_dir: str | Path | None = None,
        backbone: str | None = None,
        pretrained: str | None = None,
        adaptation: Any = None,
        channel_mode: str | None = None,
        concepts_file: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> "LoadedBundle":
        """Load a bundle folder.

        Args:
            bundle_root: the bundle folder (``configs/``, ``models/``).
            models_dir: a models folder written by ``train.yaml`` (default ``<bundle_root>/models``).
            backbone: open_clip spec overriding the fitted backbone; the stored fit is then stale and the
                network falls back to zero-shot text grounding with a prior-only head (logged).
            pretrained: open_clip pretrained tag or file for a plain model-name backbone.
            adaptation: ``adaptation.json`` path or an ``AdaptationSpec`` to apply.
            channel_mode: ``rgb``/``grey``; by default the one the fit stored (required for zero-shot).
            concepts_file: the concept bank (default ``<bundle_root>/configs/concepts.yaml``).

        Raises:
            BundleLoadError: missing folder, files of another format version, a preprocessing that differs
                from the fit's, concepts or classes that do not match the bank.
        """
        root = Path(bundle_root)
        models = root / "models" if is_unset(models_dir) else Path(models_dir)
        if not models.is_dir():
            raise BundleLoadError(f"models folder not found: {models}")
        meta = _read_metadata(root)
        bank_path = Path(concepts_file) if concepts_file else root / "configs" / "concepts.yaml"
        bank = load_concept_bank(bank_path)
        cbm_path = models / CBM_FILE
        tensors, fit_meta = _read_fit_state(cbm_path)
        spec, pretrained = _backbone_spec(backbone, pretrained, fit_meta, models)
        bk = load_backbone(spec, pretrained=pretrained, device="cpu")
        stored_pp = fit_meta.get("preprocessing") or {}
        pp = Preprocessing.from_backbone(bk, _channel_mode(channel_mode, stored_pp, meta, root, cbm_path))
        info: dict[str, Any] = {
            "backbone": spec if not spec.startswith(LOCAL_DIR) else "local-dir",
            "models_dir": str(models),
        }
        fitted = tensors is not None and fit_meta.get("backbone_fingerprint") == bk.fingerprint
        if fitted:
            _check_preprocessing(pp, stored_pp, cbm_path)
            net, sub = _network_from_state(bk, bank, tensors, fit_meta, cbm_path)
            info.update(fit="trained", grounding=fit_meta["grounding_mode"], trained_on=fit_meta.get("trained_on", ""))
        else:
            if tensors is not None:  # a fit exists but belongs to another backbone
                logger.warning(
                    "%s was fitted on another backbone than %s: grounding concepts zero-shot by text with a "
                    "prior-only head. Re-fit on your data with configs/train.yaml for calibrated predictions.",
                    cbm_path,
                    spec,
                )
            net, sub = _zero_shot_network(bk, bank), bank
            info.update(fit="zero-shot prior head", grounding="text")
        reference = _matching_reference(models / REFERENCE_FILE, net, bk) if fitted else None
        bundle = cls(
            name=root.resolve().name,
            version=str(meta.get("version", "")),
            root=root,
            models_dir=models,
            network=net.eval(),
            backbone=bk,
            preprocessing=pp,
            bank=sub,
            reference=reference,
            info=info,
            fit_meta=fit_meta,
            source_class_means=_source_class_means(tensors) if fitted else None,
        )
        if not is_unset(adaptation):
            bundle.set_adaptation(adaptation)
        bundle.to(device)
        return bundle


def save_bundle_network(
    models_dir: str | Path,
    fitted: FittedCBM,
    backbone: Backbone,
    preprocessing: Preprocessing,
    text_embeddings: torch.Tensor | None = None,
    summary: dict[str, Any] | None = None,
) -> Path:
    """Write ``models_dir/cbm.safetensors`` for ``fitted`` on ``backbone`` (whose weights are not copied): the
    writer of what :func:`_read_fit_state` and :meth:`LoadedBundle.load` read."""
    net = ConceptBottleneckClassifier.from_head(
        None, fitted.grounding, fitted.head, fitted.bank.concept_ids, fitted.bank.classes, fitted.neutral
    )
    meta = {
        "backbone_spec": backbone.spec if not backbone.spec.startswith(LOCAL_DIR) else "local-dir",
        "backbone_pretrained": backbone.pretrained,
        "backbone_fingerprint": backbone.fingerprint,
        "concept_text_fingerprint": fitted.bank.text_fingerprint(),
        "preprocessing": preprocessing.to_dict(),
        "prior_strength": fitted.head.prior_strength_,
        "dropped_concepts": fitted.dropped,
        "grounding_report": [r.to_dict() for r in fitted.report],
        "val_metrics": fitted.val_metrics,
    }
    if summary:
        meta.update(summary)
    extra = {"source_class_means": torch.as_tensor(np.asarray(fitted.source_class_means, dtype=np.float32))}
    return save_cbm_state(Path(models_dir) / CBM_FILE, net, meta, text_embeddings=text_embeddings, extra_tensors=extra)


def _read_fit_state(cbm_path: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The fitted tensors and metadata in ``cbm_path``; ``(None, {})`` when there is no fit.

    Raises:
        BundleLoadError: when the file has another format version than this medcbm reads.
    """
    state = read_cbm_state(cbm_path) if cbm_path.is_file() else None
    fit_meta = dict(state[1]) if state else {}
    if state is not None and str(fit_meta.get("format_version")) != CBM_FORMAT_VERSION:
        raise BundleLoadError(
            f"{cbm_path}: format version {fit_meta.get('format_version')!r}, this medcbm reads "
            f"{CBM_FORMAT_VERSION!r}; re-fit with configs/train.yaml or use a matching medcbm"
        )
    return (state[0] if state is not None else None), fit_meta


def _backbone_spec(
    backbone: str | None, pretrained: str | None, fit_meta: dict[str, Any], models: Path
) -> tuple[str, str | None]:
    """The open_clip spec and pretrained tag to load: the override, else the fitted one, else ``models/backbone``.

    Args:
        backbone: the caller's backbone override (``None``, ``""`` or ``"None"`` for none).
        pretrained: the caller's pretrained tag or file.
        fit_meta: the fit's metadata (``{}`` without a fit).
        models: the models folder.

    Returns:
        ``(spec, pretrained)``; a stored hub backbone brings its own pretrained tag unless one is given.
    """
    stored_spec = fit_meta.get("backbone_spec")
    if not is_unset(backbone):
        spec = str(backbone)
    elif stored_spec and stored_spec != "local-dir":
        spec, pretrained = stored_spec, pretrained or fit_meta.get("backbone_pretrained")
    else:
        spec = f"{LOCAL_DIR}{models / BACKBONE_DIR}"
    return spec, pretrained


def _channel_mode(
    channel_mode: str | None, stored_pp: dict[str, Any], meta: dict[str, Any], root: Path, cbm_path: Path
) -> str:
    """The channel mode to read images with: the caller's, else the fit's, else the bundle metadata's.

    Raises:
        BundleLoadError: when none is known, or the caller's differs from the one the fit used.
    """
    mode = channel_mode or stored_pp.get("channel_mode") or meta.get("medcbm", {}).get("channel_mode")
    if not mode:
        raise BundleLoadError(f"{root}: no channel mode stored in {cbm_path} and none given (rgb or grey)")
    if channel_mode and stored_pp.get("channel_mode") and channel_mode != stored_pp["channel_mode"]:
        raise BundleLoadError(
            f"channel_mode {channel_mode!r} differs from the {stored_pp['channel_mode']!r} the fit in {cbm_path} "
            "used; drop the override or re-fit"
        )
    return mode


def _check_preprocessing(pp: Preprocessing, stored_pp: dict[str, Any], cbm_path: Path) -> None:
    """Refuse a fit whose stored preprocessing differs from what this backbone's config gives.

    Raises:
        BundleLoadError: naming every field that differs.
    """
    bad = pp.mismatch(stored_pp)
    if bad:
        raise BundleLoadError(
            f"{cbm_path} was fitted with another preprocessing than this backbone's config gives: "
            + "; ".join(bad)
            + ". Re-fit with configs/train.yaml."
        )


def _matching_reference(ref_path: Path, net: ConceptBottleneckClassifier, bk: Backbone) -> SourceReference | None:
    """The source reference set in ``ref_path`` if it exists and belongs to this fit (concepts and backbone)."""
    if not ref_path.is_file():
        return None
    reference = SourceReference.load(ref_path)
    if reference.concept_ids != net.concepts or reference.backbone_fingerprint != bk.fingerprint:
        logger.warning("%s does not match this fit (concepts or backbone); ignoring it", ref_path)
        return None
    return reference


def _read_adaptation(path: Path, concept_ids: Sequence[str]) -> Any:
    from .adaptation.spec import AdaptationSpec

    try:
        return AdaptationSpec.read(path, concept_ids=list(concept_ids))
    except FileNotFoundError:
        raise BundleLoadError(f"adaptation file not found: {path}") from None
    except ValueError as e:
        raise BundleLoadError(str(e)) from None


def _source_class_means(tensors: dict[str, torch.Tensor]) -> np.ndarray | None:
    """The fit's ``(C, K)`` per-class source means (the edit search's reference levels), when stored."""
    means = tensors.get("extra.source_class_means")
    return None if means is None else means.double().numpy()


def _zero_shot_network(bk: Backbone, bank: ConceptBank) -> ConceptBottleneckClassifier:
    grounding = TextGrounding(bk.encode_texts(bank.texts))
    head = KnowledgePriorHead.from_prior(bank.prior, scale=1.0)
    return ConceptBottleneckClassifier.from_head(bk.image_encoder(), grounding, head, bank.concept_ids, bank.classes)


def _network_from_state(
    bk: Backbone, bank: ConceptBank, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path
) -> tuple[ConceptBottleneckClassifier, ConceptBank]:
    ids = list(meta["concept_ids"])
    unknown = [c for c in ids if c not in bank.concept_ids]
    if unknown:
        raise BundleLoadError(
            f"{path} uses concepts {unknown} that are not in the concept bank {bank.path}; re-fit the model"
        )
    if [c.lower() for c in meta["class_names"]] != [c.lower() for c in bank.classes]:
        raise BundleLoadError(f"{path} predicts {meta['class_names']} but the concept bank has {bank.classes}")
    sub = bank.subset(ids)
    g_tensors = {k[len("grounding.") :]: v for k, v in tensors.items() if k.startswith("grounding.")}
    grounding = ConceptGrounding.from_tensors(meta["grounding_mode"], g_tensors)
    if isinstance(grounding, TextGrounding) and meta.get("concept_text_fingerprint") != sub.text_fingerprint():
        logger.warning("concept texts changed since %s was fitted: recomputing their text embeddings", path)
        grounding.text_embeddings.copy_(bk.encode_texts(sub.texts))
    net = ConceptBottleneckClassifier(
        bk.image_encoder(),
        grounding,
        tensors["head.weight"],
        tensors["head.bias"],
        ids,
        bank.classes,
        tensors.get("neutral"),
    )
    return net, sub


def build_network(
    bundle_root: str | Path,
    models_dir: str | Path | None = None,
    backbone: str | None = None,
    pretrained: str | None = None,
    adaptation: Any = None,
) -> ConceptBottleneckClassifier:
    """The bundle's ``network_def``: the fitted network alone (for MONAI's ``verify_net_in_out`` and
    ``ckpt_export``); the jobs use :meth:`LoadedBundle.load`."""
    return LoadedBundle.load(bundle_root, models_dir, backbone, pretrained, adaptation).network


def write_model_pt(
    bundle_root: str | Path, models_dir: str | Path | None = None, concepts_file: str | Path | None = None
) -> Path:
    """Write ``models/model.pt``: the network's state dict (float16 floats, loadable with
    ``torch.load(weights_only=True)``), the file MONAI's model-zoo checks and ``ckpt_export`` read.

    The bundle's source of truth stays ``models/backbone`` + ``models/cbm.safetensors``; ``model.pt`` is
    derived from them (``tests/test_zoo_conformance.py`` checks that they agree).
    """
    models = Path(models_dir) if models_dir else Path(bundle_root) / "models"
    net = LoadedBundle.load(bundle_root, models_dir=models, concepts_file=concepts_file).network
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in net.state_dict().items()
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(models / MODEL_PT, buf.getvalue())


if __name__ == "__main__":  # python -m medcbm.bundle write-model-pt bundles/<name> [MODELS]
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "write-model-pt":
        print("usage: python -m medcbm.bundle write-model-pt BUNDLE_ROOT [MODELS_DIR]", file=sys.stderr)
        sys.exit(2)
    print(write_model_pt(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
