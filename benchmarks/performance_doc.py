# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Write docs/performance.md's generated block from benchmarks/results/inference_speed.json.

python benchmarks/performance_doc.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- BEGIN GENERATED: inference_speed -->", "<!-- END GENERATED -->"


def render(d: dict) -> str:
    rows = [
        "| bundle | input px | engine model step vs bare `encode_image` | minimal loop img/s | bundle job img/s "
        "(0 workers / 2 workers) | job / minimal loop, wall: fastest runs | job / minimal loop, wall: median of "
        "back-to-back pairs | job / minimal loop, CPU seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in d["bundles"].items():
        p = v["pipeline_ratio"]
        rows.append(
            f"| {name} | {v['input_size']} | {v['model_overhead']['overhead_percent']:+.1f} % | "
            f"{p['minimal_loop_img_per_s']} | {p.get('bundle_job_img_per_s_workers_0')} / "
            f"{p.get('bundle_job_img_per_s_workers_2')} | {p.get('ratio_workers_0')} / {p.get('ratio_workers_2')} | "
            f"{p.get('paired_ratio_workers_0', 'n/a')} / {p.get('paired_ratio_workers_2', 'n/a')} | "
            f"{p.get('cpu_ratio_workers_0', 'n/a')} / {p.get('cpu_ratio_workers_2', 'n/a')} |"
        )
    rounds = [
        f"{name} {w} workers: {', '.join(str(x) for x in v['pipeline_ratio'][f'ratio_rounds_workers_{w}'])}"
        for name, v in d["bundles"].items()
        for w in (0, 2)
        if f"ratio_rounds_workers_{w}" in v["pipeline_ratio"]
    ]
    if rounds:
        rows += ["", "Job / minimal loop per round (wall): " + "; ".join(rounds) + "."]
    s, t = d.get("scaling_blood_cbm"), d.get("torchrun_blood_cbm")
    lines = [
        BEGIN,
        f"Generated from `benchmarks/results/inference_speed.json` ({d['threads']} threads, "
        f"batch {d['batch_size']}, {d['cpu_count']} CPU cores, torch {d['torch']}).",
        "",
        *rows,
        "",
    ]
    if s:
        lines.append(
            f"Scaling (blood_cbm, fresh process per size): {s['img_per_s']['1000']} img/s at 1,000 inputs, "
            f"{s['img_per_s']['10000']} at 10,000; marginal throughput 1k -> 10k is {s['marginal_ratio']} of the "
            f"1k rate; peak RSS grows {s['peak_rss_growth_mb']} MB."
        )
    if t:
        lines.append(
            f"torchrun (blood_cbm, {t['images']} images, whole command incl. start-up): 1 process "
            f"{t['seconds_1_process']} s, 2 processes {t['seconds_2_processes']} s; identical predictions.csv: "
            f"{t['identical_predictions_csv']}."
        )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    d = json.loads((REPO / "benchmarks" / "results" / "inference_speed.json").read_text())
    text = DOC.read_text()
    new = text[: text.index(BEGIN)] + render(d) + text[text.index(END) + len(END) :]
    if args.check:
        sys.exit(0 if new == text else 1)
    DOC.write_text(new)


if __name__ == "__main__":
    main()
