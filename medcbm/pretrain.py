# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Train a bundle's small default backbone (an open_clip CLIP) from a recipe, on CPU.

Reproducible command (from the repository root, with ``../shared/data`` beside it)::

    python -m medcbm.pretrain --recipe configs/pretrain/blood.yaml --out bundles/blood_cbm/models/backbone

The image tower is trained from scratch on the recipe's ``train`` split with two signals taken from
the data's own annotations: class cross-entropy through an auxiliary linear layer (discarded) and
concept presence through the *text tower*: ``sigmoid(s * cos(image, text(concept)) + b_k)`` against the
concept labels. The text tower thus learns to embed the concept bank's sentences, which is what the
``text`` grounding mode reads. The epoch kept is the one with the best balanced accuracy on the
``val`` split; the test split is never read. Output: an open_clip ``local-dir:`` folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .backbones import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, save_local_dir
from .concepts import ConceptBank, load_concept_bank
from .metrics import auroc, balanced_accuracy

__all__ = ["pretrain_backbone", "load_recipe", "dataset_records", "records_to_arrays"]

logger = logging.getLogger("medcbm.pretrain")


def dataset_records(name: str, **kwargs: Any) -> list[dict]:
    """Records (``image``, ``label``, ``split``, concept columns) of a dataset staged in ``../shared/data``."""
    from . import datasets

    registry: dict[str, str] = {
        "pbc_wbcatt": "pbc_wbcatt_records",
        "nih_cxr14": "nih_cxr14_records",
        "isic2017": "isic2017_records",
        "pneumoniamnist": "pneumoniamnist_records",
    }
    if name not in registry:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(registry)}")
    fn: Callable[..., list[dict]] = getattr(datasets, registry[name])
    return fn(**kwargs)


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


def _load_images(records: list[dict], pipeline: Callable) -> torch.Tensor:
    return torch.stack([pipeline(r["image"]) for r in records])


def _augment(x: torch.Tensor, aug: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    if aug.get("flip"):
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if aug.get("vflip", True):
            flip = torch.rand(x.shape[0], generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-2), x)
    if aug.get("rot90"):
        k = int(torch.randint(0, 4, (1,), generator=gen))
        x = torch.rot90(x, k, dims=(-2, -1))
    shift = int(aug.get("shift", 0))
    if shift:
        dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if aug.get("intensity"):
        s = aug["intensity"]
        gain = 1 + s * (2 * torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 1)
        bias = s * (2 * torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 1)
        x = x * gain + bias
    return x


def pretrain_backbone(
    recipe: dict[str, Any], out_dir: str | Path, epochs: int | None = None, limit: int | None = None
) -> dict[str, Any]:
    """Train the recipe's backbone and write it as a ``local-dir:`` folder; returns a training summary."""
    import open_clip
    from open_clip.model import CLIP

    from .transforms import ClinicalImagePipeline

    t0 = time.time()
    cfg = recipe["train"]
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    bank = load_concept_bank(recipe["concepts"])
    records = dataset_records(recipe["dataset"], **recipe.get("dataset_args", {}))
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    for extra in recipe.get("extra_train", []):  # more training images from other datasets (never val/test)
        train += dataset_records(extra["dataset"], **extra.get("dataset_args", {}))
    if limit:
        train, val = train[:limit], val[: max(limit // 4, 10)]
    model_cfg = recipe["model_cfg"]
    size = int(model_cfg["vision_cfg"]["image_size"])
    pipeline = ClinicalImagePipeline(recipe["channel_mode"], size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    logger.info("loading %d train / %d val images at %d px", len(train), len(val), size)
    x_tr, x_va = _load_images(train, pipeline), _load_images(val, pipeline)
    y_tr, c_tr = records_to_arrays(train, bank)
    y_va, c_va = records_to_arrays(val, bank)
    labelled = ~np.all(np.isnan(c_tr), axis=0)
    logger.info("concepts with labels: %d of %d", int(labelled.sum()), bank.num_concepts)

    model = CLIP(**model_cfg)
    ctx = int(model_cfg["text_cfg"].get("context_length", 77))
    tokens = open_clip.tokenize(bank.texts, context_length=ctx)
    C, K, E = bank.num_classes, bank.num_concepts, int(model_cfg["embed_dim"])
    aux = torch.nn.Linear(E, C)
    concept_bias = torch.nn.Parameter(torch.zeros(K))
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = list(model.parameters()) + list(aux.parameters()) + [concept_bias, log_scale]
    n_epochs = int(epochs or cfg["epochs"])
    bs = int(cfg.get("batch_size", 64))
    steps = n_epochs * math.ceil(len(train) / bs)
    opt = torch.optim.AdamW(params, lr=float(cfg.get("lr", 2e-3)), weight_decay=float(cfg.get("weight_decay", 0.05)))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=float(cfg.get("lr", 2e-3)), total_steps=steps, pct_start=0.15
    )
    counts = np.bincount(y_tr, minlength=C).astype(np.float64)
    class_w = torch.tensor(len(y_tr) / (C * np.maximum(counts, 1)), dtype=torch.float32)
    yt, ct = torch.as_tensor(y_tr), torch.as_tensor(c_tr)
    best: dict[str, Any] = {"score": -1.0}
    history = []
    for epoch in range(n_epochs):
        model.train()
        aux.train()
        perm = torch.randperm(len(train), generator=gen)
        total = 0.0
        for start in range(0, len(train), bs):
            idx = perm[start : start + bs]
            xb = _augment(x_tr[idx], cfg.get("augment", {}), gen)
            img = F.normalize(model.encode_image(xb), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            loss = F.cross_entropy(aux(img) * 10.0, yt[idx], weight=class_w)
            cb = ct[idx]
            known = ~torch.isnan(cb)
            if known.any():
                z = log_scale.exp() * img @ txt.T + concept_bias
                bce = F.binary_cross_entropy_with_logits(z, torch.nan_to_num(cb), reduction="none")
                loss = loss + (bce * known).sum() / known.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        aux.eval()
        with torch.no_grad():
            img = torch.cat(
                [F.normalize(model.encode_image(x_va[i : i + 256]), dim=-1) for i in range(0, len(x_va), 256)]
            )
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            bacc = balanced_accuracy(y_va, aux(img).argmax(1).numpy())
            z = (img @ txt.T).numpy()
        aucs = [auroc(c_va[~np.isnan(c_va[:, k]), k] > 0.5, z[~np.isnan(c_va[:, k]), k]) for k in range(K)]
        mean_auc = float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan")
        score = bacc + 1e-3 * (0 if math.isnan(mean_auc) else mean_auc)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(total / len(train), 4),
                "val_balanced_accuracy": round(bacc, 4),
                "val_text_concept_auroc": round(mean_auc, 4),
            }
        )
        logger.info("epoch %d %s", epoch + 1, history[-1])
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best["state"])
    summary = {
        "recipe": recipe.get("name", ""),
        "dataset": recipe["dataset"],
        "n_train": len(train),
        "n_val": len(val),
        "epochs": n_epochs,
        "best_epoch": best["epoch"],
        "val_balanced_accuracy_aux_head": history[best["epoch"] - 1]["val_balanced_accuracy"],
        "seconds": round(time.time() - t0, 1),
        "seed": seed,
        "history": history,
    }
    save_local_dir(
        model,
        model_cfg,
        out_dir,
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        half=True,
        extra={"medcbm_pretraining": {k: v for k, v in summary.items() if k != "history"}},
    )
    (Path(out_dir) / "training_log.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML recipe, e.g. configs/pretrain/blood.yaml")
    parser.add_argument("--out", required=True, help="output local-dir folder")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    summary = pretrain_backbone(load_recipe(args.recipe), args.out, args.epochs, args.limit)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
