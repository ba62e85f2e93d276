# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Inference throughput and memory of the prediction engine on real images (CPU). Prints JSON.

    python benchmarks/inference_speed.py [--bundle blood_cbm] [--threads 2]
        [--out benchmarks/results/inference_speed.json]

Measured, per bundle, on held-out real images (``../shared/data``):

- ``model_overhead``: the engine's model step (encoder, concept grounding, edit, head, contributions) against a
  bare loop calling open_clip's ``encode_image`` on the same preprocessed batches (goal: overhead <= 3 %);
- ``pipeline_ratio``: the full bundle job (``InferenceRunner``: hashing, DataLoader reading and preprocessing,
  model, journal, ordered ``predictions.csv``) against a minimal decode + preprocess + encode loop over the same
  files (goal: >= 0.95 of it), in wall time (fastest run of each side, and the median of the back-to-back pairs)
  and in CPU seconds (the process and its DataLoader workers);
- ``scaling`` (blood only, ``--scale``): marginal throughput at 10,000 inputs against 1,000 (goal >= 0.95) and
  peak RSS growth from 1,000 to 10,000 inputs (goal <= 64 MB), each size in a fresh process;
- ``torchrun`` (``--torchrun``): one process against two under ``torchrun`` on CPU (gloo), same inputs.
Inputs beyond the staged images are symbolic links to them under distinct names (content and decode cost stay real).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import BUNDLES, REPO

from medcbm.bundle import LoadedBundle
from medcbm.pretrain import dataset_records

SIZES = (1000, 10000)


def _images(bundle: str, split: str = "test") -> list[str]:
    spec = BUNDLES[bundle]
    recs = dataset_records(spec["dataset"], **spec["dataset_args"])
    return [r["image"] for r in recs if r["split"] == split]


def _link_inputs(images: list[str], n: int, folder: Path) -> Path:
    """A CSV of ``n`` distinct paths cycling over ``images`` (symbolic links)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        src = Path(images[i % len(images)])
        dst = folder / f"{i:06d}{src.suffix}"
        if not dst.exists():
            os.symlink(src, dst)
        rows.append(str(dst))
    csv_path = folder / "inputs.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"])
        w.writerows([r] for r in rows)
    return csv_path


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def model_overhead(bundle: LoadedBundle, images: list[str], batch_size: int, repeats: int) -> dict:
    pipe = bundle.preprocessing.pipeline()
    x = torch.stack([pipe(p) for p in images])
    batches = list(torch.split(x, batch_size))
    visual = bundle.backbone.model
    net = bundle.network

    def bare():
        for b in batches:
            visual.encode_image(b)

    def engine_model():
        for b in batches:
            s = net.concept_scores(b)
            logits = net.head(s)
            torch.softmax(logits, 1)
            net.contributions_from_scores(s)

    bare(), engine_model()  # warm-up
    t_bare, t_engine = _best(bare, repeats), _best(engine_model, repeats)
    return {
        "images": len(images),
        "bare_encode_image_img_per_s": round(len(images) / t_bare, 1),
        "engine_model_img_per_s": round(len(images) / t_engine, 1),
        "overhead_percent": round(100 * (t_engine / t_bare - 1), 2),
    }


_CHILD_HEAD = """
import csv, json, resource, sys, time, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads({threads})
from medcbm.bundle import LoadedBundle
b = LoadedBundle.load({bundle!r})
def cpu():  # CPU seconds of this process and of its reaped children (DataLoader workers)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime
def hwm():  # VmHWM resets at exec (ru_maxrss would carry the parent's peak over)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

_JOB = """
from medcbm.workflows import InferenceRunner
t0, c0 = time.perf_counter(), cpu()
r = InferenceRunner(output_dir={out!r}, input={inp!r}, bundle=b, batch_size={batch_size},
                    num_workers={workers}, progress=False, exit_on_error=False)
n_err = r.run()
dt, dc = time.perf_counter() - t0, cpu() - c0
rows = r.summary["rows"]
print(json.dumps({{"seconds": dt, "cpu_seconds": dc, "rows": rows, "errors": n_err, "peak_rss_mb": hwm()}}))
"""

# the smallest loop that does the same work: decode + preprocess each listed file, encode batches
_MINIMAL = """
paths = [row["image"] for row in csv.DictReader(open({inp!r}, newline=""))]
pipe, encoder = b.preprocessing.pipeline(), b.network.encoder
t0, c0 = time.perf_counter(), cpu()
with torch.no_grad():
    for i in range(0, len(paths), {batch_size}):
        encoder(torch.stack([pipe(p) for p in paths[i : i + {batch_size}]]))
dt, dc = time.perf_counter() - t0, cpu() - c0
print(json.dumps({{"seconds": dt, "cpu_seconds": dc, "rows": len(paths), "errors": 0, "peak_rss_mb": hwm()}}))
"""


def _child(body: str, bundle_name: str, **fmt: Any) -> dict:
    """Run ``body`` in a fresh process with the bundle loaded (not timed); returns its JSON line."""
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    code = _CHILD_HEAD.format(repo=str(REPO), threads=threads, bundle=str(REPO / "bundles" / bundle_name))
    env = {**os.environ, "MEDCBM_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code + body.format(**fmt)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_job(bundle_name: str, inp: Path, out: Path, batch_size: int, workers: int) -> dict:
    """One bundle inference job in a fresh process; returns its JSON line (time, rows, peak RSS)."""
    shutil.rmtree(out, ignore_errors=True)  # a rerun into the same folder would resume instead of working
    return _child(_JOB, bundle_name, out=str(out), inp=str(inp), batch_size=batch_size, workers=workers)


def pipeline_ratio(
    bundle_name: str, images: list[str], tmp: Path, batch_size: int, workers: int, repeats: int, n: int = 1000
) -> dict:
    """The job against the minimal loop over the same ``n`` inputs (cycling the test images), each in a fresh
    process (both start cold, as a user's run does), ``repeats`` rounds in rotating order.

    Two estimates of the ratio: the fastest run of each side (``ratio_workers_*``), and the median over rounds of
    the ratio within one round (``paired_ratio_workers_*``: the two runs of a round are back to back, so a slow
    minute of the shared machine slows both; ``ratio_rounds_workers_*`` lists each round's ratio).
    """
    images = [images[i % len(images)] for i in range(n)]
    inp = _link_inputs(images, len(images), tmp / "pipe_in")

    def run(key: str) -> dict:
        if key == "minimal":
            return _child(_MINIMAL, bundle_name, inp=str(inp), batch_size=batch_size)
        w = int(key[len("job_w") :])
        return _run_job(bundle_name, inp, tmp / f"pipe_out_w{w}", batch_size, w)

    keys = ["minimal", *(f"job_w{w}" for w in sorted({0, workers}))]
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    for rep in range(repeats):
        # rotate the order: on a shared virtual machine the first run after a pause is the fastest, so a fixed
        # order would favour whichever side always runs first
        for key in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            r = run(key)
            wall[key].append(r["seconds"] / r["rows"])
            cpu[key].append(r["cpu_seconds"] / r["rows"])
    out = {"images": len(images), "repeats": repeats, "minimal_loop_img_per_s": round(1 / min(wall["minimal"]), 1)}
    for w in sorted({0, workers}):
        job = f"job_w{w}"
        rounds = [m / j for m, j in zip(wall["minimal"], wall[job])]
        out[f"bundle_job_img_per_s_workers_{w}"] = round(1 / min(wall[job]), 1)
        out[f"ratio_workers_{w}"] = round(min(wall["minimal"]) / min(wall[job]), 3)
        out[f"paired_ratio_workers_{w}"] = round(float(np.median(rounds)), 3)
        out[f"ratio_rounds_workers_{w}"] = [round(x, 3) for x in rounds]
        # CPU seconds per image beside wall time (threads that wait for a busy core still spend CPU)
        out[f"cpu_ratio_workers_{w}"] = round(min(cpu["minimal"]) / min(cpu[job]), 3)
    return out


def scaling(bundle_name: str, images: list[str], tmp: Path, batch_size: int, workers: int) -> dict:
    res = {}
    for n in SIZES:
        inp = _link_inputs(images, n, tmp / f"scale_in_{n}")
        res[n] = _run_job(bundle_name, inp, tmp / f"scale_out_{n}", batch_size, workers)
    small, big = res[SIZES[0]], res[SIZES[1]]
    marginal_big = (big["rows"] - small["rows"]) / max(big["seconds"] - small["seconds"], 1e-9)
    rate_small = small["rows"] / small["seconds"]
    return {
        "img_per_s": {str(n): round(r["rows"] / r["seconds"], 1) for n, r in res.items()},
        "marginal_img_per_s_1k_to_10k": round(marginal_big, 1),
        "marginal_ratio": round(marginal_big / rate_small, 3),
        "peak_rss_mb": {str(n): round(r["peak_rss_mb"], 1) for n, r in res.items()},
        "peak_rss_growth_mb": round(big["peak_rss_mb"] - small["peak_rss_mb"], 1),
    }


def torchrun_compare(bundle_name: str, images: list[str], tmp: Path, batch_size: int) -> dict:
    inp = _link_inputs(images, len(images), tmp / "tr_in")
    B = f"bundles/{bundle_name}"
    out = {}
    for n in (1, 2):
        target = tmp / f"tr_out_{n}"
        args = [
            "--bundle_root",
            B,
            "--meta_file",
            f"{B}/configs/metadata.json",
            "--workflow_type",
            "infer",
            "--input",
            str(inp),
            "--output_dir",
            str(target),
            "--batch_size",
            str(batch_size),
            "--num_workers",
            "0",
        ]
        if n == 1:
            cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"{B}/configs/inference.yaml", *args]
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                f"['{B}/configs/inference.yaml','{B}/configs/multi_gpu_inference.yaml']",
                *args,
            ]
        env = {**os.environ, "MEDCBM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        out[n] = time.perf_counter() - t0
    same = (tmp / "tr_out_1" / "predictions.csv").read_bytes() == (tmp / "tr_out_2" / "predictions.csv").read_bytes()
    return {
        "images": len(images),
        "seconds_1_process": round(out[1], 1),
        "seconds_2_processes": round(out[2], 1),
        "speedup": round(out[1] / out[2], 2),
        "identical_predictions_csv": same,
        "note": "wall time of the whole command, process start and model load included; one thread per process",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", nargs="+", default=list(BUNDLES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", action="store_true", help="1,000 vs 10,000 inputs (blood_cbm)")
    ap.add_argument("--torchrun", action="store_true", help="1 vs 2 processes under torchrun (blood_cbm)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)
    result: dict = {
        "threads": args.threads,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "bundles": {},
    }
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name in args.bundle:
            images = _images(name)
            t0 = time.perf_counter()
            bundle = LoadedBundle.load(REPO / "bundles" / name)
            entry = {"load_seconds": round(time.perf_counter() - t0, 2), "input_size": bundle.preprocessing.image_size}
            entry["model_overhead"] = model_overhead(bundle, images, args.batch_size, args.repeats)
            entry["pipeline_ratio"] = pipeline_ratio(
                name, images, tmp / name, args.batch_size, args.workers, args.repeats
            )
            result["bundles"][name] = entry
            print(json.dumps({name: entry}), file=sys.stderr)
        if args.scale:
            result["scaling_blood_cbm"] = scaling(
                "blood_cbm", _images("blood_cbm", "train"), tmp, args.batch_size, args.workers
            )
        if args.torchrun:
            result["torchrun_blood_cbm"] = torchrun_compare(
                "blood_cbm", _images("blood_cbm", "test"), tmp, args.batch_size
            )
    result["peak_rss_mb_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
