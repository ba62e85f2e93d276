# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Inference throughput and memory of each bundle on real images (CPU), through the bundle runner's code path.

    python benchmarks/inference_speed.py [--bundle blood_cbm cxr_cbm derm_cbm] [--n 64] [--threads 2]

For each bundle: network load time, images per second for ``InferenceRunner`` on ``n`` held-out images
(reading, preprocessing, encoder, concepts, head, CSV writing), and the process's peak resident memory.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from common import BUNDLES, REPO

from medcbm.pretrain import dataset_records
from medcbm.workflows import InferenceRunner, load_bundle_network


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", nargs="+", default=list(BUNDLES))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "batch_size": args.batch_size, "bundles": {}}
    for bundle in args.bundle:
        spec = BUNDLES[bundle]
        recs = [r for r in dataset_records(spec["dataset"], **spec["dataset_args"]) if r["split"] == "test"][: args.n]
        root = REPO / "bundles" / bundle
        t0 = time.perf_counter()
        net = load_bundle_network(
            root / "models", root / "configs" / "concepts.yaml", channel_mode=spec["channel_mode"]
        )
        load_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / "input.csv"
            csv_path.write_text("image\n" + "\n".join(r["image"] for r in recs) + "\n")
            runner = InferenceRunner(
                net, Path(tmp) / "out", input=csv_path, batch_size=args.batch_size, exit_on_error=False
            )
            t0 = time.perf_counter()
            errors = runner.run()
            run_s = time.perf_counter() - t0
        out["bundles"][bundle] = {
            "images": len(recs),
            "errors": errors,
            "network_load_seconds": round(load_s, 3),
            "seconds": round(run_s, 3),
            "images_per_second": round(len(recs) / run_s, 1),
            "input_size": net.pipeline.encoder_input.image_size,
            "parameters": sum(p.numel() for p in net.parameters()),
        }
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
