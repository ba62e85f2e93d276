# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The README's quick start stays runnable: its run command, exactly as written, works offline."""

from __future__ import annotations

import csv
import re
import shlex
import subprocess
import sys

from conftest import REPO


def _quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no quick start block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_command():
    commands = _quick_start_commands()
    assert len(commands) == 2
    assert "python -m monai.bundle run" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (REPO / ".ci" / "run").read_text()


def test_quick_start_run_command_works(tmp_path):
    run = _quick_start_commands()[0].split("&&", 1)[1].strip()
    args = shlex.split(run)
    assert args[:2] == ["python", "-m"]
    out = tmp_path / "blood"
    args[args.index("--output_dir") + 1] = str(out)
    proc = subprocess.run([sys.executable, *args[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["status"] == "ok" and r["sample"] == "true" for r in rows)
