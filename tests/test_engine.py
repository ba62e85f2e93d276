# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The prediction engine, the loaded bundle and the streaming outputs, on a toy bundle (no shared data)."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medcbm.bundle import BundleLoadError, LoadedBundle
from medcbm.engine import PredictionEngine, content_sha256, shard_indices
from medcbm.networks import read_cbm_state, save_cbm_state
from medcbm.sinks import OutputBusyError, OutputLock
from medcbm.workflows import InferenceRunner
from medcbm.workflows.infer import format_top_concepts, top_concepts
from test_workflows import _fit_toy_bundle


@pytest.fixture(scope="module")
def toy_bundle_dir(tmp_path_factory, tiny_backbone_spec):
    """A bundle folder (configs/concepts.yaml + models/) re-fitted on toy red/blue images."""
    return _fit_toy_bundle(tmp_path_factory.mktemp("toy_bundle"), tiny_backbone_spec)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(bundle, out, inp, **kw):
    runner = InferenceRunner(output_dir=out, input=inp, exit_on_error=False, bundle=bundle, progress=False, **kw)
    n_err = runner.run()
    return n_err, runner.summary


def _input_csv(tmp_path, root, names):
    p = tmp_path / "inputs.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"])
        for n in names:
            w.writerow([n if os.path.isabs(str(n)) else str(root / "imgs" / n)])
    return p


# ------------------------------------------------------------------------------------------------ outputs
def test_predictions_are_the_networks_argmax_with_top_concepts_of_that_class(toy_bundle_dir, tmp_path):
    bundle = LoadedBundle.load(toy_bundle_dir)
    # reversed input order: the output must follow the input, not the folder
    names = [f"bluish_{i}.png" for i in range(3)] + [f"reddish_{i}.png" for i in range(3)]
    names = names[::-1]
    n_err, _ = _run(bundle, tmp_path / "out", _input_csv(tmp_path, toy_bundle_dir, names))
    rows = _read(tmp_path / "out" / "predictions.csv")
    assert n_err == 0 and [os.path.basename(r["image"]) for r in rows] == names
    pipe = bundle.preprocessing.pipeline()
    net = bundle.network
    neutral = net.neutral.numpy()
    seen_classes = set()
    for r in rows:
        x = pipe(r["image"])[None]
        with torch.no_grad():
            scores = net.concept_scores(x)
            logits = net(x)[0]
            contrib = net.contributions_from_scores(scores)[0].numpy()
        c = int(logits.argmax())
        seen_classes.add(c)
        assert r["prediction"] == bundle.class_names[c]
        probs = torch.softmax(logits, 0).numpy()
        assert float(r["probability"]) == pytest.approx(probs[c], abs=1e-5)
        for k, name in enumerate(bundle.class_names):
            assert float(r[f"prob_{name}"]) == pytest.approx(probs[k], abs=1e-5)
        expected = format_top_concepts(top_concepts(bundle.concept_ids, contrib[c], scores[0].numpy(), neutral, 5))
        assert r["top_concepts"] == expected
        # contributions plus bias equal the logits (float64, so huge toy weights cannot hide a real error)
        W, b = net.head.weight.double(), net.head.bias.double()
        s64 = scores.double()
        c64 = net.contributions_from_scores(s64.float()).double()[0]
        torch.testing.assert_close(
            c64.sum(-1) + b + W @ net.neutral.double(), (s64 @ W.T + b)[0], rtol=1e-5, atol=1e-6 * float(W.abs().sum())
        )
    assert seen_classes == {0, 1}, "the toy data must exercise both classes (a class-0 bug would hide otherwise)"


def test_top_concepts_state_direction():
    ids = ["lobes", "granules", "large"]
    contrib = np.array([2.0, 1.0, -0.5])
    scores = np.array([0.1, 0.9, 0.2])
    neutral = np.array([0.5, 0.5, 0.5])
    items = top_concepts(ids, contrib, scores, neutral, top_k=5)
    assert items == [("lobes", "absent", 2.0), ("granules", "present", 1.0)]  # negative contributions are not reasons
    assert format_top_concepts(items) == "not lobes=2.0000;granules=1.0000"


def test_error_rows_for_unreadable_inputs_and_the_batch_goes_on(toy_bundle_dir, tmp_path):
    bundle = LoadedBundle.load(toy_bundle_dir)
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = str(toy_bundle_dir / "imgs" / "reddish_0.png")
    inp = _input_csv(
        tmp_path,
        toy_bundle_dir,
        [
            good,
            str(tmp_path / "folder.png"),
            str(tmp_path / "pipe.png"),
            str(tmp_path / "dangling.png"),
            str(tmp_path / "broken.png"),
            good,
        ],
    )
    n_err, summary = _run(bundle, tmp_path / "out", inp)
    rows = _read(tmp_path / "out" / "predictions.csv")
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error", "error", "ok"]
    assert "folder" in rows[1]["error"] and "FIFO" in rows[2]["error"] and "broken symbolic link" in rows[3]["error"]
    assert "broken.png" in rows[4]["error"]
    assert n_err == 4 and summary["errors"] == 4


# ------------------------------------------------------------------------------------------------ resume
def test_rerun_resumes_by_content_and_recomputes_a_replaced_file(toy_bundle_dir, tmp_path):
    bundle = LoadedBundle.load(toy_bundle_dir)
    imgs = tmp_path / "imgs"
    shutil.copytree(toy_bundle_dir / "imgs", imgs)
    (imgs / "train.csv").unlink()
    (imgs / "val.csv").unlink()
    _, first = _run(bundle, tmp_path / "out", imgs)
    assert first["throughput"]["encoded"] == 24
    before = {r["image"]: r for r in _read(tmp_path / "out" / "predictions.csv")}
    _, again = _run(bundle, tmp_path / "out", imgs)
    assert again["throughput"]["encoded"] == 0 and again["rows"] == 24
    assert _read(tmp_path / "out" / "predictions.csv") == list(before.values())
    # the same name, other pixels: recomputed, and its row changes
    shutil.copy(imgs / "bluish_0.png", imgs / "reddish_0.png")
    _, third = _run(bundle, tmp_path / "out", imgs)
    assert third["throughput"]["encoded"] == 1
    after = {r["image"]: r for r in _read(tmp_path / "out" / "predictions.csv")}
    key = str(imgs / "reddish_0.png")
    assert after[key]["prob_reddish"] != before[key]["prob_reddish"]


def test_rerun_with_an_edit_recomputes_every_row(toy_bundle_dir, tmp_path):
    bundle = LoadedBundle.load(toy_bundle_dir)
    inp = _input_csv(tmp_path, toy_bundle_dir, ["reddish_1.png", "bluish_1.png"])
    _run(bundle, tmp_path / "out", inp)
    before = _read(tmp_path / "out" / "predictions.csv")
    edit = tmp_path / "adaptation.json"
    edit.write_text(json.dumps({"mask": ["red_area"], "gain": {}}))
    edited = LoadedBundle.load(toy_bundle_dir, adaptation=edit)
    _, summary = _run(edited, tmp_path / "out", inp)
    assert summary["throughput"]["encoded"] == 2
    after = _read(tmp_path / "out" / "predictions.csv")
    assert [r["concept_red_area"] for r in after] != [r["concept_red_area"] for r in before]
    neutral = float(edited.network.neutral[edited.concept_ids.index("red_area")])
    assert all(float(r["concept_red_area"]) == pytest.approx(neutral, abs=1e-6) for r in after)


def test_a_second_run_into_a_busy_folder_is_refused_and_loses_nothing(toy_bundle_dir, tmp_path):
    bundle = LoadedBundle.load(toy_bundle_dir)
    inp = _input_csv(tmp_path, toy_bundle_dir, ["reddish_1.png", "bluish_1.png"])
    _run(bundle, tmp_path / "out", inp)
    finished = (tmp_path / "out" / "predictions.csv").read_bytes()
    with OutputLock(tmp_path / "out"):
        with pytest.raises(OutputBusyError, match="another medcbm run"):
            _run(bundle, tmp_path / "out", _input_csv(tmp_path, toy_bundle_dir, ["bluish_2.png"]))
    assert (tmp_path / "out" / "predictions.csv").read_bytes() == finished


def test_output_folder_that_is_a_file_is_a_user_error(toy_bundle_dir, tmp_path):
    from medcbm.errors import MedcbmUserError

    (tmp_path / "out").write_text("x")
    with pytest.raises(MedcbmUserError, match="is a file"):
        _run(LoadedBundle.load(toy_bundle_dir), tmp_path / "out", toy_bundle_dir / "imgs")


# ------------------------------------------------------------------------------------------------ the bundle
def test_loaded_bundle_checks_preprocessing_and_format_version(toy_bundle_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(toy_bundle_dir / "models", models)
    tensors, meta = read_cbm_state(models / "cbm.safetensors")
    net = LoadedBundle.load(toy_bundle_dir, models_dir=models).network

    def rewrite(**changes):
        dropped = ("format_version", "grounding_mode", "concept_ids", "class_names")
        m = {k: v for k, v in meta.items() if k not in dropped}
        m.update(changes)
        save_cbm_state(models / "cbm.safetensors", net, m, text_embeddings=tensors.get("text_embeddings"))

    rewrite(preprocessing={**meta["preprocessing"], "image_size": 64})
    with pytest.raises(BundleLoadError, match="image_size"):
        LoadedBundle.load(toy_bundle_dir, models_dir=models)
    rewrite(preprocessing={**meta["preprocessing"], "resize_mode": "longest"})
    with pytest.raises(BundleLoadError, match="resize_mode"):
        LoadedBundle.load(toy_bundle_dir, models_dir=models)
    import medcbm.networks as networks

    old = networks.CBM_FORMAT_VERSION
    try:
        networks.CBM_FORMAT_VERSION = "99"
        rewrite()
    finally:
        networks.CBM_FORMAT_VERSION = old
    with pytest.raises(BundleLoadError, match="format version '99'"):
        LoadedBundle.load(toy_bundle_dir, models_dir=models)
    with pytest.raises(BundleLoadError, match="models folder not found"):
        LoadedBundle.load(toy_bundle_dir, models_dir=tmp_path / "nope")


def test_loaded_bundle_is_typed_not_patched(toy_bundle_dir):
    b = LoadedBundle.load(toy_bundle_dir)
    for attr in ("pipeline", "backbone_fingerprint", "channel_mode", "model_info"):
        assert attr not in b.network.__dict__
    assert b.preprocessing.channel_mode == "rgb" and b.bank.concept_ids == b.concept_ids
    assert b.prior.shape == (2, 2) and b.reference is not None
    # the reference accuracy follows the edit
    acc = b.reference.accuracy(b.network)
    b.network.set_edit(mask=["red_area", "blue_area"])
    assert b.reference.accuracy(b.network) <= acc


# ------------------------------------------------------------------------------------------------ engine
def test_engine_workers_give_the_same_features_as_in_process(toy_bundle_dir):
    b = LoadedBundle.load(toy_bundle_dir)
    paths = sorted((toy_bundle_dir / "imgs").glob("*.png"))[:6]
    one = PredictionEngine(b, batch_size=4, num_workers=0, progress=False).extract_features(paths)
    two = PredictionEngine(b, batch_size=4, num_workers=2, progress=False).extract_features(paths)
    assert one.ok == two.ok == list(range(6))
    np.testing.assert_allclose(one.features, two.features, atol=1e-6)


def test_shards_cover_every_index_once():
    parts = [shard_indices(10, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert parts[0] == [0, 3, 6, 9]
    blocks = [shard_indices(10, r, 2, block=4) for r in range(2)]
    assert blocks == [[0, 1, 2, 3, 8, 9], [4, 5, 6, 7]]


def test_content_hash_refuses_non_regular_files(tmp_path):
    os.mkfifo(tmp_path / "f.png")
    with pytest.raises(ValueError, match="FIFO"):
        content_sha256(tmp_path / "f.png")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ValueError, match="loop"):
        content_sha256(tmp_path / "a")
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(img)
    import hashlib

    assert content_sha256(img) == hashlib.sha256(img.read_bytes()).hexdigest()


def test_torchrun_two_processes_write_what_one_process_writes(tmp_path):
    """configs/multi_gpu_inference.yaml under torchrun (gloo on CPU): the same bytes as one process."""
    import subprocess
    import sys

    from conftest import REPO, bundle_command

    from medcbm.data import make_sample_inputs

    B = "bundles/cxr_cbm"
    make_sample_inputs("cxr", tmp_path / "in")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDCBM_PROGRESS": "0"}
    common = ["--workflow_type", "infer", "--batch_size", "1", "--num_workers", "0", "--input", str(tmp_path / "in")]
    one = bundle_command("cxr_cbm", "inference.yaml", *common, "--output_dir", str(tmp_path / "one"))
    subprocess.run(one, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    multi = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "monai.bundle",
        "run",
        "--bundle_root",
        B,
        "--config_file",
        f"['{B}/configs/inference.yaml','{B}/configs/multi_gpu_inference.yaml']",
        "--meta_file",
        f"{B}/configs/metadata.json",
        *common,
        "--output_dir",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(multi, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = _read(tmp_path / "one" / "predictions.csv")
    b = _read(tmp_path / "two" / "predictions.csv")
    assert len(a) >= 2 and a == b
    journals = sorted(p.name for p in (tmp_path / "two" / ".medcbm").glob("journal.rank*.jsonl"))
    assert journals == ["journal.rank0.jsonl", "journal.rank1.jsonl"], "both ranks must have computed a shard"


def test_blank_and_noise_inputs_are_flagged_without_a_reference_set(toy_bundle_dir, tmp_path):
    from medcbm.engine import image_check

    rng = np.random.default_rng(0)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    smooth = np.clip(np.add.outer(np.arange(64), np.arange(64)) * 2, 0, 255).astype(np.uint8)
    Image.fromarray(np.stack([smooth] * 3, -1)).save(tmp_path / "gradient.png")
    bundle = LoadedBundle.load(toy_bundle_dir)
    pipe = bundle.preprocessing.pipeline()
    assert image_check(pipe(tmp_path / "gradient.png")) == ""
    inp = _input_csv(tmp_path, toy_bundle_dir, [str(tmp_path / n) for n in ("black.png", "white.png", "noise.png")])
    _run(bundle, tmp_path / "out", inp)
    rows = _read(tmp_path / "out" / "predictions.csv")
    assert [r["site_shift"] for r in rows] == ["true"] * 3
    assert "blank" in rows[0]["site_shift_reason"] and "blank" in rows[1]["site_shift_reason"]
    assert "noise" in rows[2]["site_shift_reason"]


def test_an_adaptation_made_for_another_fit_is_refused(toy_bundle_dir, tmp_path):
    bundle = LoadedBundle.load(toy_bundle_dir)
    ok = tmp_path / "ok.json"
    ok.write_text(
        json.dumps({"mask": ["red_area"], "gain": {}, "provenance": {"model_fingerprint": bundle.fingerprint()}})
    )
    assert LoadedBundle.load(toy_bundle_dir, adaptation=ok).network.edit_mask.tolist() == [True, False]
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({"mask": ["red_area"], "gain": {}, "provenance": {"model_fingerprint": "0" * 64}}))
    with pytest.raises(BundleLoadError, match="another fit"):
        LoadedBundle.load(toy_bundle_dir, adaptation=stale)


def test_colour_that_does_not_fit_the_modality_is_flagged():
    from medcbm.engine import modality_check

    grey = torch.rand(1, 32, 32).repeat(3, 1, 1)
    colour = torch.rand(3, 32, 32)
    assert modality_check(grey, "grey") == "" and modality_check(colour, "rgb") == ""
    assert "colour image" in modality_check(colour, "grey")
    assert "greyscale image" in modality_check(grey, "rgb")


def test_each_image_file_is_read_once_and_the_cache_key_hashes_the_decoded_bytes(tmp_path, monkeypatch):
    """PNG, DICOM and NIfTI: one open per file in the engine (hash and decode share the bytes)."""
    import hashlib

    import nibabel as nib

    import medcbm.io.files as files
    from medcbm.data import write_synthetic_dicom
    from medcbm.engine import FeatureExtractor
    from medcbm.features import FeatureCache
    from medcbm.io.inputs import list_inputs
    from medcbm.transforms import ClinicalImagePipeline

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    write_synthetic_dicom(tmp_path / "b.dcm", (rng.random((40, 48)) * 3000).astype(np.uint16), bits=16)
    nib.save(nib.Nifti1Image(rng.random((40, 48)).astype(np.float32), np.eye(4)), str(tmp_path / "c.nii.gz"))
    opened: list[str] = []
    real_open = files.os.open

    def counting_open(name, *a, **k):
        opened.append(os.path.basename(name))
        return real_open(name, *a, **k)

    monkeypatch.setattr(files.os, "open", counting_open)

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    cache = FeatureCache(tmp_path / "cache", "toy", "toy")
    ex = FeatureExtractor(
        Mean(), ClinicalImagePipeline("rgb", 32, mean=(0.5,) * 3, std=(0.5,) * 3), cache, progress=False
    )
    records = list_inputs(tmp_path)
    res = ex.extract(records)
    assert not res.errors and len(res.ok) == 3
    images = {"a.png", "b.dcm", "c.nii.gz"}
    assert sorted(n for n in opened if n in images) == sorted(images)
    for i, r in enumerate(records):
        assert res.content_sha256[i] == hashlib.sha256((tmp_path / r.image).read_bytes()).hexdigest()
