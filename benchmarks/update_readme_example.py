# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Run the README's quick-start command and write what it printed into README.md's generated block.

    python benchmarks/update_readme_example.py [--check]

The block shows the first rows of ``predictions.csv`` (a few columns, abbreviated) and how many of the
shipped example images came out as their known class, so the README never shows an output the current
bundle does not produce. ``--check`` exits 1 when the block is out of date (writes nothing).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, bundle_run_command

BEGIN, END = "<!-- BEGIN GENERATED: quick_start_example -->", "<!-- END GENERATED -->"
BUNDLE = "blood_cbm"


def quick_start_rows(out: Path) -> list[dict]:
    cmd = bundle_run_command(BUNDLE, "inference.yaml", "--workflow_type", "infer", "--output_dir", str(out))
    subprocess.run(
        cmd, cwd=REPO, check=True, capture_output=True, env={**__import__("os").environ, "MEDCBM_PROGRESS": "0"}
    )
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def render(rows: list[dict]) -> str:
    cols = ["image", "status", "prediction", "probability", "top_concepts", "sample", "label", "site_shift"]
    lines = [",".join(cols) + ",..."]
    for r in rows[:3]:
        top = ";".join(r["top_concepts"].split(";")[:2]) + (";..." if r["top_concepts"].count(";") >= 2 else "")
        vals = [r[c] if c != "top_concepts" else top for c in cols]
        lines.append(",".join(vals) + ",...")
    right = sum(1 for r in rows if r["status"] == "ok" and r["prediction"] == r["label"])
    return (
        f"{BEGIN}\n```\n" + "\n".join(lines) + "\n```\n"
        f"On the {len(rows)} shipped example images, {right} predictions match the known class "
        f"(written by `python benchmarks/update_readme_example.py`).\n{END}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        block = render(quick_start_rows(Path(td) / "out"))
    readme = REPO / "README.md"
    text = readme.read_text()
    a, b = text.index(BEGIN), text.index(END) + len(END)
    new = text[:a] + block + text[b:]
    if args.check:
        sys.exit(0 if new == text else 1)
    readme.write_text(new)
    print(block)


if __name__ == "__main__":
    main()
