# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The adaptation job (configs/adapt.yaml): support CSV -> adaptation.json -> inference with the edit.

A toy bundle is fitted in the test on red/blue images with a tiny ViT (its features carry colour, unlike
the tiny ResNet's); its "new site" adds a green cast, which under-activates ``red_area`` on reddish images
so that they are called bluish. Real images: blood_cbm on bccd_wbc_dev (another laboratory), skipped when
the shared data or the bundle's source reference set is absent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, TINY_CFG, bundle_command
from medcbm.adaptation.reference_scores import ReferenceScores
from medcbm.networks import HeadArrays
from medcbm.adaptation import AdaptationSpec
from medcbm.backbones import save_local_dir
from medcbm.bundle import REFERENCE_FILE, LoadedBundle
from medcbm.datasets.paths import shared_data_root
from medcbm.errors import MedcbmUserError
from medcbm.metrics import balanced_accuracy
from medcbm.workflows import InferenceRunner, TrainingRunner
from medcbm.workflows.adapt import (
    ADAPTATION_FILE,
    REPORT_FILE,
    AdaptationRunner,
    NoReferenceSetError,
    SupportSetError,
)

VIT_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": TINY_CFG["text_cfg"],
}
CONTRACT_FIELDS = {
    "mask",
    "gain",
    "reasons",
    "source_accuracy_before",
    "source_accuracy_after",
    "support_accuracy_before",
    "support_accuracy_after",
    "provenance",
}


def _concept(cid: str, text: str) -> dict:
    return {"id": cid, "text": text, "group": "colour", "kind": "finding", "source": {"citation": "toy"}}


def _images(folder, n, seed, green_cast=False):
    """Reddish / bluish images; at the source half the bluish ones are green too; ``green_cast``: all are."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, ch in (("reddish", 0), ("bluish", 2)):
        for i in range(n):
            img = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
            img[..., ch] = rng.integers(160, 255, (40, 40))
            green = green_cast or (label == "bluish" and i % 4 < 2)
            if green:
                img[..., 1] = rng.integers(160, 255, (40, 40))
            p = folder / f"{label}_{i}.png"
            Image.fromarray(img).save(p)
            rows.append([str(p), label, int(ch == 0), int(ch == 2), int(green)])
    return rows


def _write(path, rows, header=("image", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(header))
        for r in rows:
            w.writerow(list(r)[: len(header)])
    return path


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A toy bundle fitted at the source, a green-cast target site, its support and held-out CSVs."""
    w = tmp_path_factory.mktemp("adapt_site")
    (w / "cfg").mkdir()
    (w / "cfg" / "medcbm-test-adapt-vit.json").write_text(json.dumps(VIT_CFG))
    open_clip.add_model_config(w / "cfg")
    torch.manual_seed(0)
    save_local_dir(open_clip.create_model("medcbm-test-adapt-vit", pretrained=None), VIT_CFG, w / "base" / "backbone")
    root = w / "toy_cbm"
    (root / "configs").mkdir(parents=True)
    (w / "derm_cbm" / "configs").mkdir(parents=True)  # a sibling bundle: a support CSV made for it is recognised
    shutil.copy(REPO / "bundles" / "derm_cbm" / "configs" / "metadata.json", w / "derm_cbm" / "configs")
    bank = {
        "classes": ["reddish", "bluish"],
        "concepts": [
            _concept("red_area", "a red area"),
            _concept("blue_area", "a blue area"),
            _concept("green_area", "a green area"),
        ],
        "prior": {
            "reddish": {"red_area": 1, "blue_area": -1},
            "bluish": {"blue_area": 1, "red_area": -1, "green_area": 1},
        },
    }
    (root / "configs" / "concepts.yaml").write_text(yaml.safe_dump(bank))
    src = _images(w / "src", 16, seed=0)
    header = ("image", "label", "red_area", "blue_area", "green_area")
    _write(w / "train.csv", src[0::2], header)
    _write(w / "val.csv", src[1::2], header)
    TrainingRunner(
        root / "configs" / "concepts.yaml",
        w / "train.csv",
        w / "val.csv",
        root / "models",
        w / "base",
        drop_ungroundable=False,
        exit_on_error=False,
    ).run()
    tgt = _images(w / "tgt", 12, seed=1, green_cast=True)
    in_support = [r for r in tgt if int(r[0].rsplit("_", 1)[1].split(".")[0]) < 4]
    rest = [r for r in tgt if r not in in_support]
    return {
        "work": w,
        "root": root,
        "support": _write(w / "support.csv", in_support),
        "rest": _write(w / "rest.csv", rest),
        "support_rows": in_support,
        "tgt": tgt,
    }


def _adapt(site, out, support=None, **kw):
    kw.setdefault("progress", False)
    return AdaptationRunner(site["root"], out, support or site["support"], exit_on_error=False, **kw).run()


def _predictions(folder):
    with open(folder / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ adapt -> infer
def test_adapt_then_infer_fixes_the_shifted_site_and_keeps_the_source(site, tmp_path):
    spec = _adapt(site, tmp_path / "adapt")
    path = tmp_path / "adapt" / ADAPTATION_FILE
    data = json.loads(path.read_text())
    assert CONTRACT_FIELDS <= set(data)
    # the green cast under-activates red_area on reddish images: amplifying it is the edit, with a reason
    assert "red_area" in data["gain"] and data["gain"]["red_area"] > 1 and data["mask"] == []
    assert set(data["reasons"]) == set(spec.edited_concepts) and "under-activated" in data["reasons"]["red_area"]
    assert data["support_accuracy_before"] < data["support_accuracy_after"] == 1.0
    assert data["source_accuracy_after"] >= data["source_accuracy_before"] - 0.005
    # provenance: bundle, the CSV's and every image's sha256, k per class
    prov = data["provenance"]
    assert prov["bundle"] == {"name": "toy_cbm", "version": ""}
    assert prov["support_csv_sha256"] == _sha(site["support"])
    assert prov["support_images"] == {r[0]: _sha(r[0]) for r in site["support_rows"]}
    assert prov["k_per_class"] == {"reddish": 4, "bluish": 4}
    assert data["missing_classes"] == [] and data["warnings"] == []
    report = json.loads((tmp_path / "adapt" / REPORT_FILE).read_text())
    assert [i["after"] for i in report["support"]["images"]] == [i["label"] for i in report["support"]["images"]]

    # the guard's figure is the shipped reference set's accuracy with the edit on the real network
    bundle = LoadedBundle.load(site["root"], adaptation=path)
    assert bundle.reference.accuracy(bundle.network) == pytest.approx(data["source_accuracy_after"], abs=1e-6)

    # inference on held-out target images: the edit is applied, and it helps
    for name, adaptation in (("plain", None), ("adapted", path)):
        n_err = InferenceRunner(
            site["root"], tmp_path / name, site["rest"], adaptation=adaptation, exit_on_error=False, progress=False
        ).run()
        assert n_err == 0
    plain, adapted = _predictions(tmp_path / "plain"), _predictions(tmp_path / "adapted")
    y = [r["label"] for r in plain]
    acc = {
        n: balanced_accuracy(np.array(y), np.array([r["prediction"] for r in rows]))
        for n, rows in (("plain", plain), ("adapted", adapted))
    }
    assert acc["plain"] <= 0.5 < 0.9 <= acc["adapted"]
    # every adapted row is the edited network's argmax on that image
    pipe = bundle.preprocessing.pipeline()
    with torch.no_grad():
        logits = bundle.network(torch.stack([pipe(r["image"]) for r in adapted]))
    assert [r["prediction"] for r in adapted] == [bundle.class_names[i] for i in logits.argmax(1).tolist()]


def test_adaptation_is_deterministic_and_reads_back(site, tmp_path):
    _adapt(site, tmp_path / "a")
    _adapt(site, tmp_path / "b", cache_dir=tmp_path / "cache")
    a, b = (tmp_path / d / ADAPTATION_FILE for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    spec = AdaptationSpec.read(a, concept_ids=["red_area", "blue_area", "green_area"])
    assert spec.gain and spec.provenance["bundle"]["name"] == "toy_cbm"


def test_a_class_missing_from_the_support_set_is_a_recorded_warning(site, tmp_path, caplog):
    only_red = _write(tmp_path / "support.csv", [r for r in site["support_rows"] if r[1] == "reddish"])
    with caplog.at_level(logging.WARNING, logger="medcbm.workflows.adapt"):
        spec = _adapt(site, tmp_path / "adapt", only_red)
    data = json.loads((tmp_path / "adapt" / ADAPTATION_FILE).read_text())
    assert data["missing_classes"] == ["bluish"] == spec.missing_classes
    assert data["provenance"]["k_per_class"] == {"reddish": 4, "bluish": 0}
    assert any("bluish" in w and "no support image" in w for w in data["warnings"])
    assert any("bluish" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ bad support sets
def _bad_support(site, tmp_path, case):
    rows = [r[:2] for r in site["support_rows"]]
    p = tmp_path / "bad_support.csv"
    if case == "unknown_label":
        rows[1] = [rows[1][0], "purple"]
    elif case == "no_rows":
        rows = []
    elif case == "same_row_twice":
        rows.append(rows[0])
    elif case == "same_content_twice":
        copy = tmp_path / "copy_of_first.png"
        shutil.copy(rows[0][0], copy)
        rows.append([str(copy), rows[0][1]])
    elif case == "unreadable_image":
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png at all")
        rows.append([str(broken), "reddish"])
    elif case == "missing_image":
        rows.append([str(tmp_path / "nowhere.png"), "reddish"])
    elif case == "another_bundle":
        rows = [[r[0], "melanoma" if r[1] == "reddish" else "nevus"] for r in rows]
    elif case == "empty_label":
        rows[2] = [rows[2][0], ""]
    elif case == "no_label_column":
        return _write(p, [r[:1] for r in rows], header=("image",))
    elif case == "folder":
        return site["work"] / "tgt"
    return _write(p, rows)


BAD_CASES = {
    "unknown_label": r"labels not among toy_cbm's classes: purple",
    "no_rows": r"no rows \(k = 0\)",
    "same_row_twice": r"listed more than once: .*reddish_0\.png",
    "same_content_twice": r"listed more than once: .*copy_of_first\.png \(identical content to .*reddish_0\.png\)",
    "unreadable_image": r"1 of 9 support images cannot be read: .*broken\.png",
    "missing_image": r"cannot be read: .*nowhere\.png: file not found",
    "another_bundle": r"looks like a support set for derm_cbm .*not for toy_cbm",
    "empty_label": r"1 rows have no label: .*reddish_2\.png",
    "no_label_column": r"no labels; the support CSV needs a 'label' column",
    "folder": r"must be a CSV file with columns image,label",
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_support_set_is_a_clear_error_and_writes_no_file(site, tmp_path, case):
    support = _bad_support(site, tmp_path, case)
    with pytest.raises(SupportSetError, match=BAD_CASES[case]) as info:
        _adapt(site, tmp_path / "adapt", support)
    assert str(support) in str(info.value)  # names the file
    assert not (tmp_path / "adapt" / ADAPTATION_FILE).exists()
    assert not (tmp_path / "adapt" / REPORT_FILE).exists()


def test_no_support_given_is_a_clear_error(site, tmp_path):
    with pytest.raises(SupportSetError, match=r"--support SUPPORT\.csv"):
        AdaptationRunner(site["root"], tmp_path / "adapt", None, exit_on_error=False, progress=False).run()
    assert not (tmp_path / "adapt" / ADAPTATION_FILE).exists()


def test_a_bundle_without_reference_set_must_be_refitted(site, tmp_path):
    root = tmp_path / "toy_cbm"
    shutil.copytree(site["root"], root)
    (root / "models" / REFERENCE_FILE).unlink()
    with pytest.raises(
        NoReferenceSetError,
        match=r"reference\.safetensors: toy_cbm carries no source reference set.*"
        r"re-fit the bundle with configs/train\.yaml",
    ):
        AdaptationRunner(root, tmp_path / "adapt", site["support"], exit_on_error=False, progress=False).run()
    assert not (tmp_path / "adapt").exists() or not any((tmp_path / "adapt").iterdir())
    assert issubclass(NoReferenceSetError, MedcbmUserError)


# ------------------------------------------------------------------------------------------------ the bundle command
def _toy_command(site, config, *args):
    cmd = bundle_command("blood_cbm", config, "--workflow_type", "infer", *args)
    cmd[cmd.index("--bundle_root") + 1] = str(site["root"])  # the shipped config, run on the toy bundle
    return cmd


def _env():
    return {**os.environ, "MEDCBM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _run_toy(site, config, *args):
    """The toy bundle's command, run to the end with captured output."""
    return subprocess.run(
        _toy_command(site, config, *args), cwd=REPO, capture_output=True, text=True, timeout=600, env=_env()
    )


def _adapt_then_infer(site, tmp_path, *adapt_args: str) -> tuple[dict, Path]:
    """``adapt.yaml`` with ``adapt_args``, then ``inference.yaml`` on the site's other images with the result;
    returns the ``adaptation.json`` content and the inference output folder."""
    adapt, out = tmp_path / "adapt", tmp_path / "out"
    proc = _run_toy(site, "adapt.yaml", *adapt_args, "--output_dir", str(adapt))
    assert proc.returncode == 0, proc.stderr[-2000:]
    args = ("--input", str(site["rest"]), "--output_dir", str(out), "--adaptation", str(adapt / ADAPTATION_FILE))
    proc = _run_toy(site, "inference.yaml", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((adapt / ADAPTATION_FILE).read_text()), out


def _assert_fails_in_one_line(proc, output_dir: Path, *named: str) -> None:
    """Exit 2, one ``medcbm:`` line naming each of ``named``, no traceback and no ``adaptation.json``."""
    assert proc.returncode == 2
    last = [line for line in proc.stderr.splitlines() if line.startswith("medcbm:")]
    assert len(last) == 1 and all(n in last[0] for n in named), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (output_dir / ADAPTATION_FILE).exists()


def test_bundle_command_adapts_then_infers_and_fails_in_one_line(site, tmp_path):
    adaptation, out = _adapt_then_infer(site, tmp_path, "--support", str(site["support"]))
    assert adaptation["gain"]
    rows = _predictions(out)
    assert balanced_accuracy(np.array([r["label"] for r in rows]), np.array([r["prediction"] for r in rows])) >= 0.9

    bad = _write(tmp_path / "bad.csv", [[site["support_rows"][0][0], "purple"]])
    proc = _run_toy(site, "adapt.yaml", "--support", str(bad), "--output_dir", str(tmp_path / "bad_adapt"))
    _assert_fails_in_one_line(proc, tmp_path / "bad_adapt", str(bad), "purple")


# ------------------------------------------------------------------------------------------------ real images
def _blood_bundle():
    # MEDCBM_TEST_BLOOD_BUNDLE: run this test on another fitted copy of blood_cbm (e.g. before it ships one)
    return os.environ.get("MEDCBM_TEST_BLOOD_BUNDLE", str(REPO / "bundles" / "blood_cbm"))


def test_blood_adapts_to_another_laboratory_through_the_bundle_command(tmp_path):
    data = shared_data_root()
    if data is None or not (data / "bccd_wbc_dev" / "labels.csv").is_file():
        pytest.skip("../shared/data/bccd_wbc_dev is absent (set MEDCBM_SHARED_DATA)")
    root = _blood_bundle()
    if not os.path.isfile(os.path.join(root, "models", REFERENCE_FILE)):
        pytest.skip(
            f"{root}/models/{REFERENCE_FILE} is absent: re-fit blood_cbm with configs/train.yaml to ship a "
            "source reference set"
        )
    with open(data / "bccd_wbc_dev" / "labels.csv", newline="") as f:
        rows = [(str(data / "bccd_wbc_dev" / r["file"]), r["label"]) for r in csv.DictReader(f)]
    rng = np.random.default_rng(0)
    support, rest = [], []
    for c in sorted({lab for _, lab in rows}):
        members = [r for r in rows if r[1] == c]
        pick = set(rng.choice(len(members), size=min(4, len(members) - 1), replace=False).tolist())
        support += [m for i, m in enumerate(members) if i in pick]
        rest += [m for i, m in enumerate(members) if i not in pick]
    sup_csv, rest_csv = _write(tmp_path / "support.csv", support), _write(tmp_path / "rest.csv", rest)

    def run(config, *args):
        cmd = bundle_command("blood_cbm", config, "--workflow_type", "infer", *args)
        cmd[cmd.index("--bundle_root") + 1] = root
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=_env())
        assert proc.returncode == 0, proc.stderr[-2000:]

    run("adapt.yaml", "--support", str(sup_csv), "--output_dir", str(tmp_path / "adapt"))
    spec = json.loads((tmp_path / "adapt" / ADAPTATION_FILE).read_text())
    assert spec["source_accuracy_after"] >= spec["source_accuracy_before"] - 0.005  # the source guard
    assert spec["provenance"]["k_per_class"]["basophil"] == 0 and spec["missing_classes"] == ["basophil"]
    run("inference.yaml", "--input", str(rest_csv), "--output_dir", str(tmp_path / "plain"))
    run(
        "inference.yaml",
        "--input",
        str(rest_csv),
        "--output_dir",
        str(tmp_path / "adapted"),
        "--adaptation",
        str(tmp_path / "adapt" / ADAPTATION_FILE),
    )
    ba, rows = {}, {}
    for name in ("plain", "adapted"):
        out = rows[name] = _predictions(tmp_path / name)
        assert len(out) == len(rest) and all(r["status"] == "ok" for r in out)
        ba[name] = balanced_accuracy(np.array([r["label"] for r in out]), np.array([r["prediction"] for r in out]))
    # the stored edit is what inference applies: scaled concepts by their gain, masked ones at a constant
    for cid, gain in spec["gain"].items():
        plain, adapted = (np.array([float(r[f"concept_{cid}"]) for r in rows[n]]) for n in ("plain", "adapted"))
        np.testing.assert_allclose(adapted, gain * plain, rtol=1e-3, atol=1e-4)
    for cid in spec["mask"]:
        assert len({r[f"concept_{cid}"] for r in rows["adapted"]}) == 1
    if not (spec["mask"] or spec["gain"]):
        assert ba["adapted"] == ba["plain"]
    # one draw of a k = 4 support is a single measurement, not a promise (benchmarks/adaptation.py averages
    # draws); an edit that passed the source guard must not wreck the site's unseen cells either
    assert ba["adapted"] >= ba["plain"] - 0.02, (ba, spec["reasons"])
    print(json.dumps({"balanced_accuracy": ba, "edited": list(spec["reasons"])}), file=sys.stderr)


# ------------------------------------------------------------------------------------------------ the source guard
def test_source_guard_counts_broken_source_images_that_fixes_elsewhere_cannot_offset():
    from test_adaptation_search import CLASSES, IDS, _setting

    from medcbm.adaptation import ConceptEditSearch

    W, b, neutral, R, yr, S, ys, _, _ = _setting(confound=0.6, weak_c=1.0)
    plain = ConceptEditSearch(class_names=CLASSES, concept_ids=IDS).fit(
        S, ys, HeadArrays.plain(W, b, neutral), ReferenceScores(R, yr)
    )
    assert plain.spec_.mask == ["confounder"]  # on this site, masking the confounder is the edit
    R2, neutral2 = R.copy(), neutral.copy()
    neutral2[3] = 0.2
    b_idx, a_idx = np.flatnonzero(yr == 1)[:6], np.flatnonzero(yr == 0)[:6]
    R2[b_idx, 1], R2[b_idx, 3] = 0.1, 0.9  # source b images recognised by the confounder alone: the mask breaks them
    R2[a_idx, 0], R2[a_idx, 3] = 0.7, 0.9  # source a images the confounder wrongly pulls to b: the mask fixes them
    s = ConceptEditSearch(class_names=CLASSES, concept_ids=IDS).fit(
        S, ys, HeadArrays.plain(W, b, neutral2), ReferenceScores(R2, yr)
    )
    before = (R2 @ W.T + b).argmax(1)
    masked = R2.copy()
    masked[:, 3] = neutral2[3]
    after = (masked @ W.T + b).argmax(1)
    assert ((before == yr) & (after != yr)).sum() == 6 and ((before != yr) & (after == yr)).sum() == 6  # net zero
    assert s.spec_.mask == [] and "turn 6 of" in s.spec_.method["guard_rejected"]["confounder"]
