# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Figures come only from scripts: model cards, metadata and docs agree with the committed results files.

- the generator (``benchmarks/update_model_cards.py --check``) finds nothing to change;
- no decimal figure or percentage sits outside a generated block or code block of a card or ``docs/*.md``,
  except the explicit, non-measured allow-list below (settings, citations, versions);
- ``metadata.json`` names only config files that exist;
- every JSON file under ``bundles/`` is the model zoo's pretty JSON (4-space indent, final newline).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("blood_cbm", "cxr_cbm", "derm_cbm")
CARDS = [REPO / "bundles" / b / "docs" / "README.md" for b in BUNDLES]
DOCS = sorted((REPO / "docs").glob("*.md"))


def _generator():
    spec = importlib.util.spec_from_file_location("update_model_cards", REPO / "benchmarks" / "update_model_cards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ (a) in sync
def test_cards_and_metadata_are_in_sync_with_the_results_files():
    gen = _generator()

    def refuse(path, text):
        raise AssertionError(f"--check must not write, but tried to write {path}")

    stale = [str(p.relative_to(REPO)) for p, (old, new) in gen.updated_files().items() if old != new]
    assert not stale, f"out of date (run python benchmarks/update_model_cards.py): {stale}"
    assert gen.main(["--check"], write=refuse) == 0


def _copy_sources(tmp: Path) -> Path:
    """The files the generator reads and writes, copied into a scratch repository."""
    for b in BUNDLES:
        for rel in (
            "docs/README.md",
            "configs/metadata.json",
            "models/fit_report.json",
            "models/backbone/training_log.json",
            "configs/train.yaml",
        ):
            src = REPO / "bundles" / b / rel
            dst = tmp / "bundles" / b / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return tmp


def test_generator_writes_the_given_run_and_only_inside_its_blocks(tmp_path):
    gen = _generator()
    repo = _copy_sources(tmp_path / "repo")
    results = json.loads(gen.DEFAULT_RESULTS.read_text())
    results["cxr_cbm"]["cbm_test"]["auroc_abnormal"] = 0.1234
    new_run = tmp_path / "eval.json"
    new_run.write_text(json.dumps({"cxr_cbm": results["cxr_cbm"]}))
    fit = repo / "bundles" / "derm_cbm" / "models" / "fit_report.json"
    report = json.loads(fit.read_text())
    report["val_metrics"]["balanced_accuracy"] = 0.4321
    fit.write_text(json.dumps(report))

    files = gen.updated_files(new_run, repo)
    old, new = files[repo / "bundles" / "cxr_cbm" / "docs" / "README.md"]
    assert "| AUROC abnormal | 0.123 |" in new and "0.123 |" not in old
    assert f"from `{new_run}`" in new  # the card names the run its figures came from
    outside = re.compile(r"<!-- BEGIN GENERATED: [\w-]+ -->\n.*?<!-- END GENERATED -->", re.S)
    assert outside.sub("", old) == outside.sub("", new)  # nothing outside the blocks moved
    meta = json.loads(files[repo / "bundles" / "cxr_cbm" / "configs" / "metadata.json"][1])
    assert meta["eval_metrics"]["cbm"]["auroc_abnormal"] == 0.1234
    # bundles absent from the run keep their held-out figures; their fit block follows fit_report.json
    derm_old, derm_new = files[repo / "bundles" / "derm_cbm" / "docs" / "README.md"]
    assert "balanced accuracy 0.432" in derm_new
    evaluation = re.compile(r"<!-- BEGIN GENERATED: evaluate_bundles -->.*?<!-- END GENERATED -->", re.S)
    assert evaluation.search(derm_old).group() == evaluation.search(derm_new).group()


def test_generator_names_the_card_without_a_block(tmp_path):
    gen = _generator()
    repo = _copy_sources(tmp_path / "repo")
    card = repo / "bundles" / "blood_cbm" / "docs" / "README.md"
    card.write_text(card.read_text().replace("<!-- BEGIN GENERATED: fit_report -->", ""))
    with pytest.raises(gen.GeneratedBlockError, match=r"blood_cbm/docs/README\.md: expected exactly one"):
        gen.updated_files(gen.DEFAULT_RESULTS, repo)


# ------------------------------------------------------------------------------------------ (b) no loose figures
# A decimal number or a percentage. Integers (counts, sizes, years) are not scanned.
# Not part of a version or dotted identifier (0.8.1, BT.601); a sentence-ending full stop is fine.
FIGURE = re.compile(r"(?<![\w.])\d+\.\d+(?!\d|\.\d)(?:\s?%)?|(?<![\w.])\d+(?:\.\d+)?\s?%")
# Every entry is a number that is NOT measured by this project, with the reason. Keep it tight and specific.
ALLOWED = [
    (r"CC BY 4\.0|Apache License(?:, Version)? 2\.0", "licence names"),
    (r"doi:10\.\d{4,5}/[\w./()-]+|arXiv:\d{4}\.\d{4,5}", "citations"),
    (r"one-sided 95 % lower bound (?:above|≤) 0\.5", "the concept-dropping rule (confidence level, chance AUROC)"),
    (r"lr 0\.002|weight decay 0\.05|jitter 0\.1", "backbone recipe settings (configs/pretrain/*.yaml)"),
    (r"`\[0\.0, 0\.01, 0\.1, 1\.0\]`", "the prior-strength grid (configs/train.yaml)"),
    (r"`?\[0\.0, 0\.01, 0\.1, 1\.0, 3\.0, 10\.0\]`?", "the prior-strength grid (configs/train.yaml)"),
    (r"within 0\.01 \(1 point\)|prior_tolerance: 0\.01", "the prior-strength selection tolerance (configs/train.yaml)"),
    (r"Apache-2\.0", "licence name"),
    (r"mean = std = 0\.5|\(x - 0\.5\) / 0\.5|`?\[-1(?:\.0)?, 1(?:\.0)?\]`?", "EfficientNet-Lite normalisation"),
    (r"\(15 % per class, stratified", "the derm train/val split rule"),
    (r"about 90 % (?:label accuracy|accurate)", "NIH's published label accuracy (Wang et al. 2017, cited)"),
    (r"about 1\.7 GB", "download size of the third-party hub weights (large_files.yml)"),
    (r"MONAI-extra-test-data 0\.8\.1 release", "a version"),
    (r"`\[-1\.7923, 2\.1459\]`", "CLIP normalisation range, computed from the published mean/std"),
    (r"a gain of 0\.25, 0\.5 or 0\.75", "the edit search's attenuation levels (ConceptEditSearch defaults)"),
    (r"95 % Clopper-Pearson upper bound|\(0\.5 points\)|loss rate at 95 %", "the source guard's rule (settings)"),
]


def _prose_lines(path: Path):
    """(line number, text) of lines outside fenced code and generated blocks."""
    fence = generated = False
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if line.startswith("<!-- BEGIN GENERATED:"):
            generated = True
        if generated:
            generated = line != "<!-- END GENERATED -->"
            continue
        if not fence:
            yield i, line


def _loose_figures(path: Path) -> list[str]:
    allowed = re.compile("|".join(f"(?:{p})" for p, _ in ALLOWED))
    out = []
    # an allowed phrase may wrap: clear it on the line joined with its neighbours, then look at this line only
    lines = list(_prose_lines(path))
    padded = [(0, "")] + lines + [(0, "")]
    for (_, prev), (i, line), (_, nxt) in zip(padded, padded[1:], padded[2:]):
        joined = f"{prev} {line} {nxt}"
        start = len(prev) + 1
        cleared = allowed.sub(lambda m: "#" * len(m.group()), joined)[start : start + len(line)]
        out += [f"{path.relative_to(REPO)}:{i}: {m.group()!r} in {line.strip()!r}" for m in FIGURE.finditer(cleared)]
    return out


@pytest.mark.parametrize("path", CARDS + DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_measured_figure_outside_generated_blocks(path):
    loose = _loose_figures(path)
    assert not loose, "figures outside a generated block (move them into one fed by a results file):\n" + "\n".join(
        loose
    )


def test_the_figure_scan_catches_a_hand_written_figure(tmp_path, monkeypatch):
    card = tmp_path / "bundles" / "x" / "docs" / "README.md"
    card.parent.mkdir(parents=True)
    card.write_text(
        "AUROC rose from 0.662 to 0.772.\n```bash\nrun --lr 0.5\n```\n"
        "<!-- BEGIN GENERATED: evaluate_bundles -->\n| accuracy | 99.6 |\n<!-- END GENERATED -->\n"
        "about 69 % nevus; one-sided 95 % lower bound above 0.5\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = _loose_figures(card)
    assert [f.split(": ", 1)[1].split(" in ")[0] for f in found] == ["'0.662'", "'0.772'", "'69 %'"]


# ------------------------------------------------------------------------------------------ (c) metadata claims
@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_names_only_existing_config_files(bundle):
    root = REPO / "bundles" / bundle
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    text = json.dumps(meta)
    named = set(re.findall(r"configs/([\w./-]+\.(?:yaml|json))", text))
    assert named, "the description should name its configs"
    missing = sorted(n for n in named if not (root / "configs" / n).is_file())
    assert not missing, f"{root / 'configs' / 'metadata.json'} names missing config files: {missing}"
    # and it names every optional workflow the bundle ships
    gen = _generator()
    assert gen.supports_sentence(root / "configs") in meta["description"]


def test_supports_sentence_follows_the_config_files(tmp_path):
    gen = _generator()
    assert gen.supports_sentence(tmp_path) == ""
    (tmp_path / "train.yaml").write_text("{}")
    expected = "The bundle also supports re-fitting on a site's labelled data (configs/train.yaml)."
    assert gen.supports_sentence(tmp_path) == expected
    (tmp_path / "adapt.yaml").write_text("{}")
    sentence = gen.supports_sentence(tmp_path)
    assert "(configs/adapt.yaml)" in sentence and "audit.yaml" not in sentence


# ------------------------------------------------------------------------------------------ pretty JSON
BUNDLE_JSON = sorted((REPO / "bundles").rglob("*.json"))
# Files written by code this test's owner does not own; expected failures until their writers emit pretty JSON.
PENDING_WRITERS = {
    "fit_report.json": "medcbm/workflows/train.py",
    "training_log.json": "medcbm/pretrain.py",
    "open_clip_config.json": "medcbm/backbones.py save_local_dir",
}


@pytest.mark.parametrize("path", BUNDLE_JSON, ids=lambda p: str(p.relative_to(REPO)))
def test_bundle_json_is_pretty_4_space(path):
    text = path.read_text()
    pretty = json.dumps(json.loads(text), indent=4) + "\n"
    if text != pretty and path.name in PENDING_WRITERS:
        pytest.xfail(
            f"{path.name} (written by {PENDING_WRITERS[path.name]}) predates the 4-space writer; reformatting it "
            "would change the backbone fingerprint (a content hash) and stale every fit, "
            "so it waits for the next retrain"
        )
    assert text == pretty, (
        f"{path.relative_to(REPO)} is not 4-space pretty JSON with a final newline (the model zoo's "
        "pretty-format-json hook); rewrite it with json.dumps(data, indent=4) + '\\n'"
    )


def test_generated_doc_blocks_match_their_results_files():
    """docs/REPRODUCE.md's encoder comparison and seed spread, and docs/performance.md, are rendered from
    committed results."""
    import subprocess

    for script in ("encoder_comparison.py", "recipe_seeds.py", "performance_doc.py"):
        flag = "--check" if script == "performance_doc.py" else "--check-doc"
        args = [sys.executable, str(REPO / "benchmarks" / script), flag]
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, f"out of date: run python benchmarks/{script} ({done.stderr[-500:]})"


def test_results_files_name_no_machine_paths():
    """Results are committed and shared: paths in them are repository- or data-relative, never this machine's."""
    machine = re.compile(r'"(/(?:home|root|tmp|work|check|Users|mnt|var)/[^"]*|[A-Za-z]:\\\\[^"]*)"')
    found = {
        p.name: machine.findall(p.read_text())[:3]
        for p in sorted((REPO / "benchmarks" / "results").glob("*.json"))
        if machine.search(p.read_text())
    }
    assert not found, found
