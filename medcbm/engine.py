# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""One prediction engine for every job.

records -> MONAI ``Dataset``/``DataLoader`` (worker processes hash, read and preprocess) -> features
(through the feature cache) -> concept scores -> logits and contributions -> the caller's sinks.

Inference, training's feature extraction, adaptation and the audit all go through
:class:`PredictionEngine`; none of them has its own image loop. A file that cannot be read becomes an
error entry naming the file and the reason, never an exception, and a non-regular file (FIFO, device,
folder) is rejected from ``stat`` alone, so it never blocks the run. Under ``torch.distributed`` the
caller shards the record indices with :func:`shard_indices` (rank ``r`` of ``w`` takes ``r, r + w, ...``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.data import DataLoader, Dataset

from .bundle import LoadedBundle
from .data import InputRecord
from .features import ExtractionResult, FeatureCache
from .io.errors import FileReasonError
from .io.files import read_regular_file, regular_file_sha256, serving_bytes
from .progress import progress_enabled
from .options import is_unset

__all__ = [
    "FeatureExtractor",
    "PredictionEngine",
    "BatchResult",
    "shard_indices",
    "dist_rank_world",
    "content_sha256",
    "extract_features",
]

logger = logging.getLogger(__name__)


#: sha256 of a regular file's bytes; a folder, FIFO, device, broken link or link loop raises
#: :class:`~medcbm.io.errors.ImageReadError` naming the path, from ``stat`` alone (a FIFO is never opened).
content_sha256 = regular_file_sha256


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` under an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int | None = None, world: int | None = None, block: int = 1) -> list[int]:
    """The record indices of rank ``rank`` of ``world`` processes, in blocks of ``block`` consecutive inputs
    dealt round-robin (block ``j`` goes to rank ``j % world``).

    With ``block`` equal to the batch size every batch holds the same images as in a single process, so
    the encoder sees identical batches and the outputs are bit-identical to a one-process run.
    """
    if rank is None or world is None:
        rank, world = dist_rank_world()
    block = max(1, int(block))
    return [i for i in range(n) if (i // block) % world == rank]


def _reason(exc: BaseException, image: str, path: str) -> str:
    cause = exc
    # MONAI's Compose wraps reader errors in RuntimeError("applying transform ..."): report the cause.
    while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
        cause = cause.__cause__
    msg = str(cause) or type(cause).__name__
    if image not in msg and path not in msg:
        msg = f"{image}: {msg}"
    return msg.replace("\n", " ")


class _ReadForEncoder:
    """Worker-side step: read the file once and hash it, skip finished or cached inputs, else decode those
    bytes and preprocess them."""

    def __init__(self, pipeline: Any, cache: FeatureCache | None, done: Mapping[str, str] | None) -> None:
        self.pipeline = pipeline
        self.cache = cache
        self.done = dict(done or {})

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"index": item["index"]}
        image, path = item["image"], item["path"]
        try:
            data = read_regular_file(path)  # the one read: hashed here, decoded below
        except FileReasonError as e:
            out["error"] = _reason(e, image, path)
            return out
        sha = hashlib.sha256(data).hexdigest()
        out["sha256"] = sha
        if self.done.get(image) == sha:
            out["resumed"] = True
            return out
        if self.cache is not None:
            feature = self.cache.get(sha)
            if feature is not None:
                out["feature"] = feature
                return out
        try:
            with serving_bytes(path, data):
                self._decode(path, out)
        except Exception as e:  # the reader names the file and the reason
            out["error"] = _reason(e, image, path)
        return out

    def _decode(self, path: str, out: dict[str, Any]) -> None:
        steps = [getattr(self.pipeline, n, None) for n in ("loader", "channels", "encoder_input")]
        if all(steps):  # a ClinicalImagePipeline: keep the raw read for the modality check
            raw = steps[0](path)
            out["image"] = steps[2](steps[1](raw))
            out["quality"] = image_check(out["image"]) or modality_check(raw, steps[1].mode)
        else:
            out["image"] = self.pipeline(path)
            out["quality"] = image_check(out["image"])


#: An image whose encoder input has (normalised) standard deviation below this carries no contrast at all.
BLANK_STD = 0.02
#: Mean squared neighbour difference over twice the variance: ~1 for pixel-independent noise, and at most
#: ~0.25 on the real dermoscopy, X-ray and blood images staged for this project (smooth at encoder size).
NOISE_RATIO = 0.5


def image_check(x: torch.Tensor) -> str:
    """A reason when an encoder input is blank or noise-like, else ``""`` (scale-free, no model involved)."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    g = x.float().mean(0)
    sd = float(g.std())
    if sd < BLANK_STD:
        return "blank image (no contrast)"
    var = float(g.var())
    d = float(((g[:, 1:] - g[:, :-1]) ** 2).mean() + ((g[1:, :] - g[:-1, :]) ** 2).mean())
    if d / (4 * var) > NOISE_RATIO:
        return "noise-like image (no spatial structure)"
    return ""


#: Mean per-pixel channel spread (max - min over R, G, B in [0, 1]). X-ray files are exactly grey (0.0 on every
#: staged image); stained smears and dermoscopy are coloured (>= 0.02 on every staged image).
COLOUR_IN_GREY_MODALITY = 0.02
GREY_IN_COLOUR_MODALITY = 0.005


def colourfulness(img: torch.Tensor) -> float:
    """Mean channel spread of a ``(C, H, W)`` image in [0, 1] (0 for grey or single-channel images)."""
    t = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)  # MetaTensor ops are slow
    if t.ndim != 3 or t.shape[0] < 3:
        return 0.0
    step = max(1, max(t.shape[1], t.shape[2]) // 64)  # a strided 64-pixel grid is plenty for a mean
    a = np.asarray(t[:3, ::step, ::step].detach().cpu(), dtype=np.float32)  # numpy: torch reductions over
    return float(np.ptp(a, axis=0).mean())  # the channel axis of small strided views were ~1 ms each


def modality_check(raw: torch.Tensor, channel_mode: str) -> str:
    """A reason when a file's colour does not fit the modality (a colour photo for an X-ray bundle, a grey
    image for a dermoscopy or smear bundle), else ``""``."""
    c = colourfulness(raw)
    if channel_mode == "grey" and c > COLOUR_IN_GREY_MODALITY:
        return "colour image for a greyscale modality (wrong modality?)"
    if channel_mode == "rgb" and c < GREY_IN_COLOUR_MODALITY:
        return "greyscale image for a colour modality (wrong modality?)"
    return ""


def _list_collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


@dataclass
class BatchResult:
    """What the engine produced for one batch of records (arrays are numpy, rows in ``ok`` order).

    Attributes:
        ok: record indices with a result, in input order.
        errors: record index -> reason, for inputs that could not be read.
        resumed: record indices skipped because the caller marked them finished (same content).
        sha256: record index -> file content hash (for every readable file).
        features: ``(B, D)``; scores: ``(B, K)`` after the edit; scores_unedited: ``(B, K)``;
        logits, proba: ``(B, C)``; contributions: ``(B, C, K)`` (plus ``bias`` equals ``logits``);
        shift_score: ``(B,)`` site-shift score or ``None``; shift_flag: ``(B,)`` bool or ``None``.
    """

    ok: list[int]
    errors: dict[int, str] = field(default_factory=dict)
    resumed: list[int] = field(default_factory=list)
    sha256: dict[int, str] = field(default_factory=dict)
    features: np.ndarray | None = None
    scores: np.ndarray | None = None
    scores_unedited: np.ndarray | None = None
    logits: np.ndarray | None = None
    proba: np.ndarray | None = None
    contributions: np.ndarray | None = None
    bias: np.ndarray | None = None
    shift_score: np.ndarray | None = None
    shift_flag: np.ndarray | None = None
    quality: dict[int, str] = field(default_factory=dict)


class FeatureExtractor:
    """The image -> feature loop every job shares (a MONAI ``DataLoader`` feeding one encoder).

    Args:
        encoder: images ``(B, 3, H, W)`` -> L2-normalised features ``(B, D)``.
        pipeline: path -> preprocessed ``(3, H, W)`` tensor (raises naming the file on bad input).
        cache: optional :class:`~medcbm.features.FeatureCache` (read in the workers, written here).
        device, batch_size, num_workers, progress, desc: see :class:`PredictionEngine`.
    """

    def __init__(
        self,
        encoder: Any,
        pipeline: Any,
        cache: FeatureCache | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        num_workers: int = 0,
        progress: bool = True,
        desc: str = "medcbm",
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.encoder = encoder
        self.pipeline = pipeline
        self.cache = cache
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.progress = progress and progress_enabled()
        self.desc = desc
        self.stats: dict[str, Any] = {}

    def _loader(self, records: Sequence[Any], indices: Sequence[int], done: Mapping[str, str] | None):
        items = [{"index": i, "image": _image_of(records[i]), "path": os.fspath(_path_of(records[i]))} for i in indices]
        ds = Dataset(items, transform=_ReadForEncoder(self.pipeline, self.cache, done))
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_list_collate,
            persistent_workers=False,
        )

    @torch.no_grad()
    def iter_features(
        self,
        records: Sequence[Any],
        indices: Sequence[int] | None = None,
        done: Mapping[str, str] | None = None,
    ) -> Iterator[tuple[list[int], torch.Tensor | None, BatchResult]]:
        """Yield ``(ok_indices, features (B, D) or None, partial BatchResult)`` per batch, in input order.

        ``records`` are :class:`~medcbm.data.InputRecord` or paths; ``done`` maps an image (as given) to
        the content sha256 of a finished row: such inputs are hashed but not read (``resumed``).
        """
        indices = list(range(len(records))) if indices is None else list(indices)
        bar = _bar(len(indices), self.desc, self.progress)
        t0, n_read, n_cached = time.perf_counter(), 0, 0
        try:
            for items in self._loader(records, indices, done):
                res = BatchResult(ok=[])
                feats: dict[int, torch.Tensor] = {}
                to_encode = [it for it in items if "image" in it]
                if to_encode:
                    x = torch.stack([it["image"] for it in to_encode]).to(self.device)
                    f = self.encoder(x).float()
                    for it, row in zip(to_encode, f):
                        feats[it["index"]] = row
                        if self.cache is not None:
                            self.cache.put(it["sha256"], row.cpu())
                    n_read += len(to_encode)
                for it in items:
                    i = it["index"]
                    if "sha256" in it:
                        res.sha256[i] = it["sha256"]
                    if it.get("quality"):
                        res.quality[i] = it["quality"]
                    if "error" in it:
                        res.errors[i] = it["error"]
                    elif it.get("resumed"):
                        res.resumed.append(i)
                    elif "feature" in it:
                        feats[i] = it["feature"].to(self.device).float()
                        n_cached += 1
                res.ok = [it["index"] for it in items if it["index"] in feats]
                features = torch.stack([feats[i] for i in res.ok]) if res.ok else None
                if bar is not None:
                    bar.update(len(items))
                yield res.ok, features, res
        finally:
            if bar is not None:
                bar.close()
            dt = time.perf_counter() - t0
            self.stats = {
                "inputs": len(indices),
                "encoded": n_read,
                "from_cache": n_cached,
                "seconds": round(dt, 3),
                "images_per_second": round(len(indices) / dt, 2) if dt > 0 else None,
            }
            if bar is None and self.progress and len(indices) and dt > 2:
                logger.info(
                    "%s: %d images in %.1f s (%.1f img/s; %d from the feature cache)",
                    self.desc,
                    len(indices),
                    dt,
                    len(indices) / dt,
                    n_cached,
                )

    def extract(self, records: Sequence[Any], indices: Sequence[int] | None = None) -> ExtractionResult:
        """Features of every readable record, with a reason for each that is not."""
        rows: list[np.ndarray] = []
        ok: list[int] = []
        errors: dict[int, str] = {}
        hashes: dict[int, str] = {}
        for ok_i, features, res in self.iter_features(records, indices):
            errors.update(res.errors)
            hashes.update(res.sha256)
            if features is not None:
                rows.append(features.cpu().numpy())
                ok.extend(ok_i)
        feats = np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)
        return ExtractionResult(feats, ok, errors, hashes)


def _image_of(rec: Any) -> str:
    return rec.image if hasattr(rec, "image") else os.fspath(rec)


def _path_of(rec: Any) -> Any:
    return rec.path if hasattr(rec, "path") else rec


class PredictionEngine:
    """Runs a :class:`~medcbm.bundle.LoadedBundle` over image records.

    Args:
        bundle: the loaded bundle.
        device: torch device for the encoder and head.
        batch_size: images per encoder call.
        num_workers: DataLoader worker processes that hash, read and preprocess (0 = in this process).
        cache_dir: feature cache folder; ``None`` disables the cache (inference default: one pass, and the
            resume journal already keeps finished rows).
        progress: show a tqdm bar on stderr (also off when ``MEDCBM_PROGRESS=0``).
        desc: the bar's label.
    """

    def __init__(
        self,
        bundle: LoadedBundle,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        desc: str = "medcbm",
    ) -> None:
        self.bundle = bundle
        self.device = torch.device(device)
        cache = (
            FeatureCache(cache_dir, bundle.backbone.fingerprint, bundle.preprocessing.fingerprint())
            if cache_dir is not False and not is_unset(cache_dir)
            else None
        )
        bundle.network.to(self.device).eval()
        self.extractor = FeatureExtractor(
            bundle.network.features,
            bundle.preprocessing.pipeline(),
            cache,
            self.device,
            batch_size,
            num_workers,
            progress,
            desc,
        )
        self.shift_detector = _shift_detector(bundle)

    @property
    def stats(self) -> dict[str, Any]:
        return self.extractor.stats

    def iter_features(self, records, indices=None, done=None):
        """See :meth:`FeatureExtractor.iter_features`."""
        return self.extractor.iter_features(records, indices, done)

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """Concept scores (edited and not), logits, probabilities, contributions (and the site-shift score
        when the bundle carries a reference set) for ``(B, D)`` features."""
        net = self.bundle.network
        f = torch.as_tensor(features, dtype=torch.float32, device=self.device)
        raw = net.concept_scores_from_features(f, edited=False)
        scores = net.concept_scores_from_features(f, edited=True)
        logits = net.logits_from_scores(scores)
        out = {
            "scores_unedited": raw.cpu().numpy(),
            "scores": scores.cpu().numpy(),
            "logits": logits.cpu().numpy(),
            "proba": torch.softmax(logits, dim=1).cpu().numpy(),
            "contributions": net.contributions_from_scores(scores).cpu().numpy(),
            "bias": net.contribution_bias().cpu().numpy(),
        }
        if self.shift_detector is not None:
            fn = f.cpu().numpy()
            out["shift_score"] = np.asarray(self.shift_detector.score(fn), dtype=np.float64)
            out["shift_flag"] = out["shift_score"] > self.shift_detector.threshold_
        return out

    def iter_batches(
        self,
        records: Sequence[InputRecord],
        indices: Sequence[int] | None = None,
        done: Mapping[str, str] | None = None,
    ) -> Iterator[BatchResult]:
        """Full results per batch (see :class:`BatchResult`), in input order."""
        for ok, features, res in self.iter_features(records, indices, done):
            if features is not None:
                res.features = features.cpu().numpy()
                for key, value in self.predict_features(features).items():
                    setattr(res, key, value)
                if res.quality and res.shift_flag is not None:  # blank / noise inputs are flagged whatever the score
                    for j, i in enumerate(res.ok):
                        res.shift_flag[j] |= i in res.quality
            yield res

    def extract_features(
        self, records: Sequence[InputRecord], indices: Sequence[int] | None = None
    ) -> ExtractionResult:
        """Features of every readable record (what ``adapt`` and ``audit`` fit on)."""
        return self.extractor.extract(records, indices)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled or total < 1:
        return None
    from .progress import progress

    return progress(total=total, desc=desc, unit="img")


def _shift_detector(bundle: LoadedBundle) -> Any:
    ref = bundle.reference
    if ref is None:
        return None
    try:
        return ref.site_shift_detector()
    except Exception as e:  # a broken reference must not stop inference
        logger.warning("site-shift alarm disabled: %s", e)
        return None


def extract_features(
    paths: Sequence[str | Path],
    encoder: Callable[[torch.Tensor], torch.Tensor],
    load: Callable[[str | Path], torch.Tensor],
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> ExtractionResult:
    """Embed image files, reusing cached features; a bad file becomes an error, not an exception.

    A thin wrapper over :class:`FeatureExtractor` (the one image -> feature loop).

    Args:
        paths: image files.
        encoder: images ``(B, 3, H, W)`` -> features ``(B, D)``.
        load: one path -> preprocessed image tensor ``(3, H, W)`` (raises on unreadable input).
        cache: optional :class:`FeatureCache`.
    """
    extractor = FeatureExtractor(encoder, load, cache, device, batch_size, num_workers, progress, "features")
    return extractor.extract(list(paths))
