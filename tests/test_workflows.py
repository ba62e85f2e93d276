# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Re-fit and inference workflows on synthetic images with a tiny backbone (no shared data needed)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, bundle_command
from medcbm.backbones import load_backbone
from medcbm.bundle import LoadedBundle
from medcbm.workflows import InferenceRunner, TrainingRunner


def _toy_bank(path, text_suffix=""):
    bank = {
        "classes": ["reddish", "bluish"],
        "concepts": [
            {
                "id": "red_area",
                "text": "a red area" + text_suffix,
                "group": "colour",
                "kind": "finding",
                "source": {"citation": "toy"},
            },
            {
                "id": "blue_area",
                "text": "a blue area",
                "group": "colour",
                "kind": "finding",
                "source": {"citation": "toy"},
            },
        ],
        "prior": {"reddish": {"red_area": 1, "blue_area": -1}, "bluish": {"blue_area": 1, "red_area": -1}},
    }
    path.write_text(yaml.safe_dump(bank))
    return path


def _toy_images(folder, n_per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, channel in (("reddish", 0), ("bluish", 2)):
        for i in range(n_per_class):
            img = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
            img[..., channel] = rng.integers(160, 255, (40, 40))
            p = folder / f"{label}_{i}.png"
            Image.fromarray(img).save(p)
            rows.append((p.name, label, 1 if channel == 0 else 0, 1 if channel == 2 else 0))
    return rows


def _write_csv(path, rows, with_concepts):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"] + (["red_area", "blue_area"] if with_concepts else []))
        for r in rows:
            w.writerow(list(r[:2]) + (list(r[2:]) if with_concepts else []))


def _fit_toy_bundle(root, tiny_backbone_spec):
    """A bundle folder (configs/concepts.yaml + models/) re-fitted on toy red/blue images; returns ``root``."""
    (root / "configs").mkdir()
    bank = _toy_bank(root / "configs" / "concepts.yaml")
    rows = _toy_images(root / "imgs")
    base = root / "base_models"
    shutil.copytree(tiny_backbone_spec[len("local-dir:") :], base / "backbone")
    _write_csv(root / "imgs" / "train.csv", rows[0::2], True)
    _write_csv(root / "imgs" / "val.csv", rows[1::2], True)
    TrainingRunner(
        bank,
        root / "imgs" / "train.csv",
        root / "imgs" / "val.csv",
        root / "models",
        base,
        cache_dir=root / "cache",
        drop_ungroundable=False,
        exit_on_error=False,
    ).run()
    return root


@pytest.fixture
def toy_site(tmp_path, tiny_backbone_spec):
    bank = _toy_bank(tmp_path / "concepts.yaml")
    rows = _toy_images(tmp_path / "imgs")
    models = tmp_path / "bundle_models"
    shutil.copytree(tiny_backbone_spec[len("local-dir:") :], models / "backbone")
    return tmp_path, bank, rows, models


@pytest.mark.parametrize("with_concepts, mode", [(True, "probe"), (False, "text")])
def test_refit_then_infer(toy_site, with_concepts, mode):
    tmp, bank, rows, models = toy_site
    _write_csv(tmp / "imgs" / "train.csv", rows[0::2], with_concepts)
    _write_csv(tmp / "imgs" / "val.csv", rows[1::2], with_concepts)
    out = tmp / f"refit_{mode}"
    report = TrainingRunner(
        bank,
        tmp / "imgs" / "train.csv",
        tmp / "imgs" / "val.csv",
        out,
        models,
        cache_dir=tmp / "cache",
        drop_ungroundable=False,
    ).run()
    assert report["grounding"] == mode
    assert json.loads((out / "fit_report.json").read_text())["n_train"] == 12
    bundle = LoadedBundle.load(tmp, models_dir=out, concepts_file=bank)
    assert bundle.info["fit"] == "trained" and bundle.concept_ids == ["red_area", "blue_area"]
    # the source reference set: validation scores and labels, no images
    ref = bundle.reference
    assert ref is not None and ref.scores.shape == (12, 2) and sorted(set(ref.labels.tolist())) == [0, 1]
    assert len(ref.train_features) == 12
    # the site-shift detector is fitted at training time and stored with the reference set
    det = ref.site_shift_detector()
    assert ref.shift_tensors and det.threshold_ > 0 and det.score(ref.features).shape == (12,)
    # a second fit on the same images is served from the feature cache
    again = TrainingRunner(
        bank,
        tmp / "imgs" / "train.csv",
        tmp / "imgs" / "val.csv",
        tmp / "again",
        models,
        cache_dir=tmp / "cache",
        drop_ungroundable=False,
    ).run()
    assert again["feature_cache"]["misses"] == 0 and again["feature_cache"]["hits"] == 24
    n_err = InferenceRunner(output_dir=tmp / "pred", input=tmp / "imgs", exit_on_error=False, bundle=bundle).run()
    assert n_err == 0
    with open(tmp / "pred" / "predictions.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 24 and {r["prediction"] for r in got} <= {"reddish", "bluish"}


def test_changed_concept_text_recomputes_stored_text_embeddings(toy_site):
    tmp, bank, rows, models = toy_site
    _write_csv(tmp / "imgs" / "train.csv", rows[0::2], False)
    _write_csv(tmp / "imgs" / "val.csv", rows[1::2], False)
    TrainingRunner(
        bank,
        tmp / "imgs" / "train.csv",
        tmp / "imgs" / "val.csv",
        tmp / "m",
        models,
        cache_dir=tmp / "cache",
        drop_ungroundable=False,
    ).run()
    bk = load_backbone(f"local-dir:{tmp / 'm' / 'backbone'}")
    same = LoadedBundle.load(tmp, models_dir=tmp / "m", concepts_file=bank).network
    changed_bank = _toy_bank(tmp / "changed.yaml", text_suffix=" with a sharp edge")
    changed = LoadedBundle.load(tmp, models_dir=tmp / "m", concepts_file=changed_bank).network
    fresh = bk.encode_texts(["a red area with a sharp edge", "a blue area"])
    assert not torch.allclose(same.grounding.text_embeddings[0], fresh[0])
    torch.testing.assert_close(changed.grounding.text_embeddings, torch.nn.functional.normalize(fresh, dim=-1))


def test_refit_rejects_unknown_labels_and_bad_concept_values(toy_site):
    tmp, bank, rows, models = toy_site
    bad = [("reddish_0.png", "purple")] + [r[:2] for r in rows[1:]]
    _write_csv(tmp / "imgs" / "train.csv", bad, False)
    _write_csv(tmp / "imgs" / "val.csv", rows[1::2], False)
    with pytest.raises(ValueError, match=r"train.csv row 2: unknown class 'purple'"):
        TrainingRunner(
            bank, tmp / "imgs" / "train.csv", tmp / "imgs" / "val.csv", tmp / "x", models, exit_on_error=False
        ).run()
    with open(tmp / "imgs" / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "red_area"])
        w.writerow(["reddish_0.png", "reddish", "maybe"])
    with pytest.raises(ValueError, match="row 2, column red_area: concept label 'maybe'"):
        TrainingRunner(
            bank, tmp / "imgs" / "train.csv", tmp / "imgs" / "val.csv", tmp / "x", models, exit_on_error=False
        ).run()


def test_adaptation_file_applies_edit_and_rejects_unknown_concepts(tmp_path):
    B = REPO / "bundles" / "cxr_cbm"
    ids = LoadedBundle.load(B).network.concepts
    (tmp_path / "a.json").write_text(json.dumps({"mask": [ids[0]], "gain": {ids[1]: 1.5}}))
    net = LoadedBundle.load(B, adaptation=tmp_path / "a.json").network
    assert bool(net.edit_mask[0]) and not bool(net.edit_mask[1]) and float(net.edit_gain[1]) == 1.5
    (tmp_path / "b.json").write_text(json.dumps({"mask": ["no_such_concept"]}))
    with pytest.raises(ValueError, match="b.json.*no_such_concept"):
        LoadedBundle.load(B, adaptation=tmp_path / "b.json")


def test_checkpoint_export_traces_the_network(tmp_path):
    from monai.bundle import ConfigParser, ckpt_export

    B = REPO / "bundles" / "cxr_cbm"
    parser = ConfigParser()
    parser.read_config(str(B / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(B)
    net = parser.get_parsed_content("network_def").eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        meta_file=str(B / "configs" / "metadata.json"),
        config_file=str(B / "configs" / "inference.yaml"),
        bundle_root=str(B),
        use_trace=True,
        input_shape=[1, 3, 64, 64],
    )
    ts = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(ts(x), net(x))


@pytest.mark.parametrize(
    "config, args, message",
    [
        ("inference.yaml", ["--workflow_type", "infer", "--input", "{tmp}/bad.csv"], "CSV has no 'image' column"),
        ("inference.yaml", ["--workflow_type", "infer", "--input", "{tmp}/nowhere"], "input not found"),
        (
            "train.yaml",
            ["--workflow_type", "train", "--train", "{tmp}/bad.csv"],
            "needs --train TRAIN.csv and --val VAL.csv",
        ),
    ],
)
def test_cli_bad_input_lists_fail_with_one_clear_line(tmp_path, config, args, message):
    import subprocess

    (tmp_path / "bad.csv").write_text("path,label\na.png,normal\n")
    cmd = bundle_command("cxr_cbm", config, "--output_dir", str(tmp_path / "out"))
    cmd += [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_refit_names_a_class_without_training_images(toy_site):
    tmp, bank, rows, models = toy_site
    _write_csv(tmp / "imgs" / "train.csv", [r for r in rows if r[1] == "reddish"], False)
    _write_csv(tmp / "imgs" / "val.csv", rows[1::2], False)
    with pytest.raises(ValueError, match=r"no image of class\(es\) \['bluish'\]"):
        TrainingRunner(
            bank, tmp / "imgs" / "train.csv", tmp / "imgs" / "val.csv", tmp / "x", models, exit_on_error=False
        ).run()
