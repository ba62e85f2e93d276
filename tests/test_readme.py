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
    # the README's example block is what this command prints today (benchmarks/update_readme_example.py)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from update_readme_example import BEGIN, END, render

    text = (REPO / "README.md").read_text()
    assert text[text.index(BEGIN) : text.index(END) + len(END)] == render(rows), (
        "README example is stale: run python benchmarks/update_readme_example.py"
    )


def test_layout_names_existing_paths():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S).group(1)
    parent = ""
    for line in block.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name or name.startswith("<"):
            continue
        for part in name.rstrip(",").split(","):
            part = part.strip()
            if not part:
                continue
            if line.startswith("  "):
                path = REPO / parent / part
            else:
                parent = part if part.endswith("/") else ""
                path = REPO / part
            if "<" not in str(path):
                assert path.exists(), f"README layout names {path.relative_to(REPO)}, which does not exist"
