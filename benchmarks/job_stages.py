# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Per-image cost of each stage of the inference job against the minimal loop's, on held-out images (CPU).
Prints JSON.

    python benchmarks/job_stages.py [--bundle cxr_cbm] [--n 160] [--repeats 2] [--out FILE]

``inference_speed.py`` times whole runs, which on a shared 2-core machine drift by more than the job's own
overhead; this times the stages the job adds in one process, interleaved with the stages both loops share:
``minimal_decode`` (the preprocessing pipeline on a path) against ``job_read_hash_decode`` (the engine's one
read, sha256, decode and modality check), ``image_check`` (blank / noise flag), ``encoder`` (shared) and
``head_and_alarm`` (concept scores, head, contributions, site-shift score). Fastest of ``--repeats`` passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import BUNDLES, REPO

from inference_speed import _images
from medcbm.bundle import LoadedBundle
from medcbm.engine import PredictionEngine, _ReadForEncoder, image_check


def measure(name: str, n: int, repeats: int, batch_size: int = 16) -> dict:
    bundle = LoadedBundle.load(REPO / "bundles" / name)
    paths = _images(name)[:n]
    pipe, encoder = bundle.preprocessing.pipeline(), bundle.network.encoder
    engine = PredictionEngine(bundle, batch_size=batch_size, progress=False)
    read = _ReadForEncoder(pipe, None, None)
    best: dict[str, float] = {}

    def timed(key, fn):
        t0 = time.perf_counter()
        out = fn()
        best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)
        return out

    with torch.no_grad():
        for _ in range(repeats):
            x = torch.stack(timed("minimal_decode", lambda: [pipe(p) for p in paths]))
            items = [{"index": i, "image": p, "path": p} for i, p in enumerate(paths)]
            outs = timed("job_read_hash_decode", lambda: [read(it) for it in items])
            timed("image_check", lambda: [image_check(o["image"]) for o in outs])
            batches = list(torch.split(x, batch_size))
            feats = timed("encoder", lambda: [encoder(b) for b in batches])
            timed("head_and_alarm", lambda: [engine.predict_features(f) for f in feats])
    ms = {k: round(1000 * v / len(paths), 2) for k, v in best.items()}
    minimal = ms["minimal_decode"] + ms["encoder"]
    job = ms["job_read_hash_decode"] + ms["image_check"] + ms["encoder"] + ms["head_and_alarm"]
    return {"images": len(paths), "ms_per_image": ms, "stage_ratio": round(minimal / job, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", nargs="+", default=list(BUNDLES))
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "bundles": {b: measure(b, args.n, args.repeats) for b in args.bundle}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
