# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Uniform weight averaging ("model soup", Wortsman et al., ICML 2022) of backbones fine-tuned by one recipe.

    python -m medcbm.soup --out /tmp/derm_soup /tmp/derm_seed0 /tmp/derm_seed1 /tmp/derm_seed2

Backbones fine-tuned from the same pretrained trunk with the same recipe and different seeds usually lie in
one basin of the loss, so the average of their weights is one encoder that often generalises better than
each of them, at the inference cost of one. The ingredients must share the model config, the preprocessing
and the initialisation (ImageNet file hash); the soup is written as an open_clip ``local-dir:`` folder with
the ingredients' provenance (``medcbm_pretraining.soup``) and a ``training_log.json`` of the same shape as
:mod:`medcbm.pretrain` writes. Batch-norm running statistics are averaged like every other tensor.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .io.atomic import atomic_write_bytes, atomic_write_json
from .io.files import file_sha256

__all__ = ["uniform_soup"]

WEIGHTS, CONFIG, LOG = "open_clip_model.safetensors", "open_clip_config.json", "training_log.json"
_SAME = ("recipe", "dataset", "init_from")


def _ingredient(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"soup ingredient {folder}: no {name} (not a local-dir backbone)")
    return json.loads((folder / CONFIG).read_text()), load_file(str(folder / WEIGHTS))


def _check_compatible(folders: Sequence[Path], configs: list[dict], states: list[dict]) -> None:
    first = configs[0]
    for folder, cfg, state in zip(folders[1:], configs[1:], states[1:]):
        for key in ("model_cfg", "preprocess_cfg"):
            if cfg.get(key) != first.get(key):
                raise ValueError(f"soup ingredient {folder}: {key} differs from {folders[0]}'s")
        run, run0 = cfg.get("medcbm_pretraining", {}), first.get("medcbm_pretraining", {})
        for key in _SAME:
            if run.get(key) != run0.get(key):
                raise ValueError(f"soup ingredient {folder}: {key} {run.get(key)!r} differs ({run0.get(key)!r})")
        if set(state) != set(states[0]) or any(state[k].shape != states[0][k].shape for k in state):
            raise ValueError(f"soup ingredient {folder}: its tensors differ in names or shapes from {folders[0]}'s")


def uniform_soup(folders: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Average the weights of ``folders`` (open_clip ``local-dir:`` backbones of one recipe) into ``out_dir``.

    Args:
        folders: two or more backbones fine-tuned from the same initialisation by the same recipe.
        out_dir: the soup's ``local-dir:`` folder.

    Returns:
        The soup's training summary (also written as ``out_dir/training_log.json``).

    Raises:
        ValueError: fewer than two ingredients, or ingredients of different models, recipes or initialisations.
        FileNotFoundError: a folder is not a ``local-dir:`` backbone.
    """
    from safetensors.torch import save

    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise ValueError(f"a soup needs at least two backbones, got {len(folders)}")
    configs, states = zip(*(_ingredient(f) for f in folders))
    _check_compatible(folders, list(configs), list(states))
    soup = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            mean = torch.stack([s[key].float() for s in states]).mean(0)
            soup[key] = mean.to(first.dtype).contiguous()
        else:  # integer buffers (batch-norm step counters) are not weights
            soup[key] = first.clone()
    runs = [c.get("medcbm_pretraining", {}) for c in configs]
    ingredients = [
        {k: r.get(k) for k in ("seed", "best_epoch", "val_balanced_accuracy_aux_head", "seconds")}
        | {"sha256": file_sha256(f / WEIGHTS)}
        for f, r in zip(folders, runs)
    ]
    summary = {k: runs[0].get(k) for k in ("recipe", "dataset", "n_train", "n_val", "resize_mode", "init_from")}
    summary.update(
        seed=[i["seed"] for i in ingredients],
        seconds=round(sum(float(i["seconds"] or 0) for i in ingredients), 1),
        soup={"method": "uniform weight average", "ingredients": ingredients},
    )
    out = Path(out_dir)
    atomic_write_bytes(out / WEIGHTS, save(soup))
    atomic_write_json(out / CONFIG, {**configs[0], "medcbm_pretraining": summary})
    atomic_write_json(out / LOG, summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="local-dir backbones of one recipe (different seeds)")
    parser.add_argument("--out", required=True, help="the soup's local-dir folder")
    args = parser.parse_args(argv)
    print(json.dumps(uniform_soup(args.folders, args.out), indent=2))


if __name__ == "__main__":
    main()
