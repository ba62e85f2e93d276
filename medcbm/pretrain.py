# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Train a bundle's small default backbone (an open_clip CLIP) from a recipe, on CPU.

Reproducible command (from the repository root, with ``../shared/data`` beside it)::

    python -m medcbm.pretrain --recipe configs/pretrain/blood.yaml --out bundles/blood_cbm/models/backbone

The image tower is trained from scratch on the recipe's ``train`` split with two signals taken from
the data's own annotations: class cross-entropy through an auxiliary linear layer (discarded) and
concept presence through the *text tower*: ``sigmoid(s * cos(image, text(concept)) + b_k)`` against the
concept labels. The text tower thus learns to embed the concept bank's sentences, which is what the
``text`` grounding mode reads.

Site robustness: training images are read once at ``train.load_size`` (default twice the encoder size)
and every batch goes through :class:`medcbm.augment.SiteShiftAugment` with the recipe's
``train.augment`` block (stain / colour, object size and off-centre framing, blur, resolution, JPEG,
illumination), which resizes to the encoder size as inference does. Selection: each epoch is scored
on the ``val`` split as inference sees it *and* on a fixed, seeded site-shifted copy of it
(``train.val_shift``, default the ``augment`` block, drawn once); ``train.clean_fraction`` of each batch
is left unaugmented (BatchNorm statistics then also see clean images); the epoch kept maximises the mean of
the two balanced accuracies. The test split is never read. Output: an open_clip ``local-dir:`` folder
whose ``preprocess_cfg.resize_mode`` is the recipe's ``preprocess.resize_mode`` (default ``shortest``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .augment import SiteShiftAugment, resize_batch
from .backbones import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, save_local_dir
from .concepts import ConceptBank, load_concept_bank
from .datasets import dataset_records
from .io.atomic import atomic_write_json
from .metrics import auroc, balanced_accuracy

__all__ = ["pretrain_backbone", "load_recipe", "dataset_records", "records_to_arrays", "load_unit_images"]

logger = logging.getLogger("medcbm.pretrain")


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    recipe = yaml.safe_load(path.read_text())
    for key in ("dataset", "concepts", "channel_mode", "model_cfg", "train"):
        if key not in recipe:
            raise ValueError(f"{path}: recipe is missing '{key}'")
    return recipe


def records_to_arrays(records: list[dict], bank: ConceptBank) -> tuple[np.ndarray, np.ndarray]:
    """Class indices ``(N,)`` and concept labels ``(N, K)`` (NaN where not annotated)."""
    y = np.array([bank.class_index(r["label"]) for r in records], dtype=np.int64)
    c = np.full((len(records), bank.num_concepts), np.nan, dtype=np.float32)
    for i, r in enumerate(records):
        for k, cid in enumerate(bank.concept_ids):
            v = r.get(cid)
            if v is not None and v != "" and not (isinstance(v, float) and math.isnan(v)):
                c[i, k] = float(v)
    return y, c


def _pipeline(channel_mode: str, size: int, mean: Any, std: Any, resize_mode: str) -> Callable:
    """The inference pipeline; ``resize_mode`` is passed on when ``ClinicalImagePipeline`` supports it."""
    import inspect

    from .transforms import ClinicalImagePipeline

    if "resize_mode" in inspect.signature(ClinicalImagePipeline.__init__).parameters:
        return ClinicalImagePipeline(channel_mode, size, mean, std, resize_mode=resize_mode)
    if resize_mode != "shortest":
        logger.warning("ClinicalImagePipeline has no resize_mode yet: reading with 'shortest', not %r", resize_mode)
    return ClinicalImagePipeline(channel_mode, size, mean, std)


def load_unit_images(paths: list[str], channel_mode: str, size: int, resize_mode: str = "shortest") -> torch.Tensor:
    """Images as uint8 ``(N, 3, size, size)`` (the [0, 1] image times 255), read as at inference."""
    pipe = _pipeline(channel_mode, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize_mode)
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, p in enumerate(paths):
        out[i] = (pipe(p).clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    return out


def _normalise(x: torch.Tensor, mean: Any = OPENAI_CLIP_MEAN, std: Any = OPENAI_CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _init_imagenet_trunk(model: torch.nn.Module, model_cfg: dict[str, Any]) -> dict[str, str]:
    """Load ImageNet weights into a timm image tower (``vision_cfg.timm_model_name``); returns provenance."""
    from .imagenet_trunks import load_into

    name = model_cfg["vision_cfg"].get("timm_model_name")
    if not name:
        raise ValueError("train.init_trunk: imagenet needs a timm image tower (vision_cfg.timm_model_name)")
    return {"imagenet": name, "sha256": load_into(model.visual.trunk, name)}


def _optimizer(model: torch.nn.Module, extra: list[torch.nn.Parameter], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW; a pretrained trunk trains at ``train.trunk_lr_scale`` times the learning rate (default 1)."""
    lr = float(cfg.get("lr", 2e-3))
    trunk = getattr(model.visual, "trunk", None)
    trunk_ids = {id(p) for p in trunk.parameters()} if trunk is not None else set()
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in trunk_ids] + extra, "lr": lr},
        {
            "params": [p for p in model.parameters() if id(p) in trunk_ids],
            "lr": lr * float(cfg.get("trunk_lr_scale", 1.0)),
        },
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=float(cfg.get("weight_decay", 0.05)))


def _init_weights(model: torch.nn.Module, folder: str | Path) -> dict[str, str]:
    """Load a ``local-dir:`` backbone's weights into ``model`` (strict); returns its provenance."""
    from safetensors.torch import load_file

    from .datasets.paths import sha256_file

    path = Path(folder).expanduser() / "open_clip_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} not found (build it with the base recipe first)")
    state = load_file(str(path))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"init_from: {path} does not match the recipe's model_cfg ({str(e).splitlines()[0]})"
        ) from None
    cfg_path = path.parent / "open_clip_config.json"
    name = (
        json.loads(cfg_path.read_text()).get("medcbm_pretraining", {}).get("recipe", "") if cfg_path.is_file() else ""
    )
    return {"folder": str(Path(folder)), "recipe": name, "sha256": sha256_file(path)}


def _embed(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([F.normalize(model.encode_image(x[i : i + batch]), dim=-1) for i in range(0, len(x), batch)])


@dataclass
class _TrainData:
    """The images and labels of one training run, and the settings they were read with."""

    train: list[dict]  # training records
    val: list[dict]  # validation records
    u_tr: torch.Tensor  # uint8 (N, 3, load_size, load_size) training images
    x_va: torch.Tensor  # normalised validation images, as inference reads them
    x_vs: torch.Tensor  # normalised validation images after one fixed, seeded site shift
    y_tr: np.ndarray
    c_tr: np.ndarray
    y_va: np.ndarray
    c_va: np.ndarray
    augment: Callable[[torch.Tensor], torch.Tensor]  # a [0, 1] training batch -> a normalised encoder batch
    augment_cfg: dict[str, Any]
    load_size: int
    resize_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class _Heads:
    """What trains beside the model and is discarded: the auxiliary class head and the concept logit terms."""

    aux: torch.nn.Linear
    concept_bias: torch.nn.Parameter  # (K,) per-concept bias b_k
    log_scale: torch.nn.Parameter  # log of the cosine scale s

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.aux.parameters()) + [self.concept_bias, self.log_scale]


def _records(recipe: dict[str, Any], limit: int | None) -> tuple[list[dict], list[dict]]:
    """The recipe's train and val records (plus ``extra_train``), cut to ``limit`` training images if given."""
    records = dataset_records(recipe["dataset"], **recipe.get("dataset_args", {}))
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    for extra in recipe.get("extra_train", []):  # more training images from other datasets (never val/test)
        train += dataset_records(extra["dataset"], **extra.get("dataset_args", {}))
    if limit:
        train, val = train[:limit], val[: max(limit // 4, 10)]
    return train, val


def _augmenter(
    site: SiteShiftAugment,
    gen: torch.Generator,
    clean_fraction: float,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training augmentation: ``site`` on every image but a random ``clean_fraction`` read as at inference."""

    def augmenter(u: torch.Tensor) -> torch.Tensor:
        x = site(u)
        if clean_fraction > 0:  # some images as inference reads them: BatchNorm statistics also see clean data
            keep = torch.rand(len(u), generator=gen) < clean_fraction
            if keep.any():
                x[keep] = resize_batch(u[keep], size)
        return _normalise(x, mean, std)

    return augmenter


def _load_data(
    recipe: dict[str, Any], bank: ConceptBank, limit: int | None, seed: int, gen: torch.Generator
) -> _TrainData:
    """Read the run's images and labels and build its augmentation (the module docstring's recipe keys).

    Args:
        recipe: the loaded recipe.
        bank: its concept bank (class and concept columns).
        limit: use only this many training images.
        seed: the run's seed (the site shift of the validation copy uses ``seed + 1``).
        gen: the run's generator, drawn from by the augmentation's clean fraction.
    """
    cfg = recipe["train"]
    train, val = _records(recipe, limit)
    size = int(recipe["model_cfg"]["vision_cfg"]["image_size"])
    load_size = int(cfg.get("load_size", 2 * size if cfg.get("augment") else size))
    resize_mode = str(recipe.get("preprocess", {}).get("resize_mode", "shortest"))
    mode = recipe["channel_mode"]
    mean = tuple(recipe.get("preprocess", {}).get("mean", OPENAI_CLIP_MEAN))
    std = tuple(recipe.get("preprocess", {}).get("std", OPENAI_CLIP_STD))
    logger.info("loading %d train images at %d px and %d val images", len(train), load_size, len(val))
    u_tr = load_unit_images([r["image"] for r in train], mode, load_size, resize_mode)
    x_va = _normalise(load_unit_images([r["image"] for r in val], mode, size, resize_mode).float() / 255.0, mean, std)
    augment_cfg = dict(cfg.get("augment", {}) or {})
    site = SiteShiftAugment(augment_cfg, size, mode, seed=seed)
    augment = _augmenter(site, gen, float(cfg.get("clean_fraction", 0.0)), size, mean, std)
    shift_cfg = dict(cfg.get("val_shift", augment_cfg) or {})
    u_va = load_unit_images([r["image"] for r in val], mode, load_size, resize_mode).float() / 255.0
    shifter = SiteShiftAugment(shift_cfg, size, mode, seed=seed + 1)
    x_vs = torch.cat([_normalise(shifter(u_va[i : i + 256]), mean, std) for i in range(0, len(u_va), 256)])
    del u_va
    y_tr, c_tr = records_to_arrays(train, bank)
    y_va, c_va = records_to_arrays(val, bank)
    labelled = ~np.all(np.isnan(c_tr), axis=0)
    logger.info("concepts with labels: %d of %d", int(labelled.sum()), bank.num_concepts)
    return _TrainData(
        train, val, u_tr, x_va, x_vs, y_tr, c_tr, y_va, c_va, augment, augment_cfg, load_size, resize_mode, mean, std
    )


def _build_model(
    model_cfg: dict[str, Any], cfg: dict[str, Any], init_from: str | Path | None
) -> tuple[torch.nn.Module, dict[str, str] | None]:
    """The recipe's CLIP, random or from ``init_from`` / ``train.init_from`` / ``train.init_trunk``; with provenance."""
    from open_clip.model import CLIP

    model = CLIP(**model_cfg)
    init_from = init_from or cfg.get("init_from")
    init_info = _init_weights(model, init_from) if init_from else None
    if cfg.get("init_trunk") == "imagenet" and not init_from:
        init_info = _init_imagenet_trunk(model, model_cfg)
    return model, init_info


def _train_epoch(
    model: torch.nn.Module,
    heads: _Heads,
    data: _TrainData,
    tokens: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: Any,
    class_w: torch.Tensor,
    bs: int,
    gen: torch.Generator,
) -> float:
    """One pass over the shuffled training images; returns the sum over batches of loss times batch size.

    The loss is the class-weighted cross-entropy of the auxiliary head plus the concept BCE of
    ``sigmoid(s * cos(image, text(concept)) + b_k)`` over the concept labels present.
    """
    model.train()
    heads.aux.train()
    yt, ct = torch.as_tensor(data.y_tr), torch.as_tensor(data.c_tr)
    perm = torch.randperm(len(data.train), generator=gen)
    total = 0.0
    for start in range(0, len(data.train), bs):
        idx = perm[start : start + bs]
        xb = data.augment(data.u_tr[idx].float() / 255.0)
        img = F.normalize(model.encode_image(xb), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = F.cross_entropy(heads.aux(img) * 10.0, yt[idx], weight=class_w)
        cb = ct[idx]
        known = ~torch.isnan(cb)
        if known.any():
            z = heads.log_scale.exp() * img @ txt.T + heads.concept_bias
            bce = F.binary_cross_entropy_with_logits(z, torch.nan_to_num(cb), reduction="none")
            loss = loss + (bce * known).sum() / known.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(idx)
    return total


def _evaluate(
    model: torch.nn.Module, aux: torch.nn.Linear, data: _TrainData, tokens: torch.Tensor, K: int
) -> tuple[float, float, float]:
    """Balanced accuracy of the auxiliary head on val and on its site-shifted copy, and the mean text-concept
    AUROC on val (NaN when no concept has both labels)."""
    model.eval()
    aux.eval()
    with torch.no_grad():
        img = _embed(model, data.x_va)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        bacc = balanced_accuracy(data.y_va, aux(img).argmax(1).numpy())
        z = (img @ txt.T).numpy()
        bacc_shift = balanced_accuracy(data.y_va, aux(_embed(model, data.x_vs)).argmax(1).numpy())
    c_va = data.c_va
    aucs = [auroc(c_va[~np.isnan(c_va[:, k]), k] > 0.5, z[~np.isnan(c_va[:, k]), k]) for k in range(K)]
    mean_auc = float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")
    return bacc, bacc_shift, mean_auc


def _fit(
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    bank: ConceptBank,
    data: _TrainData,
    cfg: dict[str, Any],
    epochs: int | None,
    gen: torch.Generator,
    t0: float,
) -> tuple[int, int, list[dict[str, Any]]]:
    """Train ``model`` and leave it at the epoch with the best selection score (module docstring).

    Args:
        model: the CLIP to train.
        model_cfg: its open_clip config.
        bank: the concept bank (class count, concept texts).
        data: the run's images and labels.
        cfg: the recipe's ``train`` block.
        epochs: override ``train.epochs``.
        gen: the run's generator (batch order, clean fraction).
        t0: the run's start (``time.time()``), for the elapsed seconds of each epoch.

    Returns:
        The number of epochs, the best epoch (1-based) and one history entry per epoch.
    """
    import open_clip

    ctx = int(model_cfg["text_cfg"].get("context_length", 77))
    tokens = open_clip.tokenize(bank.texts, context_length=ctx)
    C, K, E = bank.num_classes, bank.num_concepts, int(model_cfg["embed_dim"])
    aux = torch.nn.Linear(E, C)
    heads = _Heads(aux, torch.nn.Parameter(torch.zeros(K)), torch.nn.Parameter(torch.tensor(math.log(10.0))))
    n_epochs = int(epochs or cfg["epochs"])
    bs = int(cfg.get("batch_size", 64))
    steps = n_epochs * math.ceil(len(data.train) / bs)
    opt = _optimizer(model, heads.parameters(), cfg)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps, pct_start=0.15
    )
    counts = np.bincount(data.y_tr, minlength=C).astype(np.float64)
    class_w = torch.tensor(len(data.y_tr) / (C * np.maximum(counts, 1)), dtype=torch.float32)
    best: dict[str, Any] = {"score": -1.0}
    history = []
    for epoch in range(n_epochs):
        total = _train_epoch(model, heads, data, tokens, opt, sched, class_w, bs, gen)
        bacc, bacc_shift, mean_auc = _evaluate(model, aux, data, tokens, K)
        score = 0.5 * (bacc + bacc_shift) + 1e-3 * (0 if math.isnan(mean_auc) else mean_auc)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(total / len(data.train), 4),
                "val_balanced_accuracy": round(bacc, 4),
                "val_shift_balanced_accuracy": round(bacc_shift, 4),
                "val_text_concept_auroc": round(mean_auc, 4),
                "seconds": round(time.time() - t0, 1),
            }
        )
        logger.info("epoch %d %s", epoch + 1, history[-1])
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best["state"])
    return n_epochs, best["epoch"], history


def pretrain_backbone(
    recipe: dict[str, Any],
    out_dir: str | Path,
    epochs: int | None = None,
    limit: int | None = None,
    init_from: str | Path | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Train the recipe's backbone and write it as a ``local-dir:`` folder; returns a training summary.

    Args:
        recipe: the loaded recipe (:func:`load_recipe`).
        out_dir: output ``local-dir:`` folder.
        epochs: override ``train.epochs``.
        limit: use only this many training images (smoke runs).
        init_from: start from this ``local-dir:`` backbone (same ``model_cfg``) instead of
            ``train.init_from`` or random weights.
        seed: override ``train.seed`` (the spread over seeds of one recipe).
    """
    t0 = time.time()
    cfg = recipe["train"]
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    bank = load_concept_bank(recipe["concepts"])
    data = _load_data(recipe, bank, limit, seed, gen)
    model_cfg = recipe["model_cfg"]
    model, init_info = _build_model(model_cfg, cfg, init_from)
    n_epochs, best_epoch, history = _fit(model, model_cfg, bank, data, cfg, epochs, gen, t0)
    summary = {
        "recipe": recipe.get("name", ""),
        "dataset": recipe["dataset"],
        "n_train": len(data.train),
        "n_val": len(data.val),
        "epochs": n_epochs,
        "best_epoch": best_epoch,
        "val_balanced_accuracy_aux_head": history[best_epoch - 1]["val_balanced_accuracy"],
        "val_shift_balanced_accuracy_aux_head": history[best_epoch - 1]["val_shift_balanced_accuracy"],
        "load_size": data.load_size,
        "resize_mode": data.resize_mode,
        "augment": data.augment_cfg,
        "clean_fraction": float(cfg.get("clean_fraction", 0.0)),
        "seconds": round(time.time() - t0, 1),
        "seed": seed,
        "init_from": init_info,
        "history": history,
    }
    save_local_dir(
        model,
        model_cfg,
        out_dir,
        data.mean,
        data.std,
        half=True,
        resize_mode=data.resize_mode,
        extra={"medcbm_pretraining": {k: v for k, v in summary.items() if k != "history"}},
    )
    atomic_write_json(Path(out_dir) / "training_log.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML recipe, e.g. configs/pretrain/blood.yaml")
    parser.add_argument("--out", required=True, help="output local-dir folder")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke runs)")
    parser.add_argument("--init-from", default=None, help="start from this local-dir backbone (overrides the recipe)")
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's train.seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    summary = pretrain_backbone(
        load_recipe(args.recipe), args.out, args.epochs, args.limit, args.init_from, seed=args.seed
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
