# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The three bundles through MONAI's bundle runner: real images, synthetic DICOM/NIfTI, bad inputs, resume."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, bundle_command
from medcbm.data import write_synthetic_dicom
from medcbm.datasets.paths import shared_data_root

BUNDLES = {
    "blood_cbm": ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"],
    "cxr_cbm": ["normal", "abnormal"],
    "derm_cbm": ["nevus", "melanoma", "seborrheic_keratosis"],
}
REAL = {
    "blood_cbm": "pbc_wbcatt/images/test/neutrophil",
    "cxr_cbm": "nih_cxr14_multires/images/256px",
    "derm_cbm": "isic2017_256/images/val",
}
DATA = shared_data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="../shared/data not present (set MEDCBM_SHARED_DATA)")


def _workflow(bundle: str, config: str = "inference.yaml", workflow_type: str = "infer", **override):
    from monai.bundle import ConfigWorkflow

    root = REPO / "bundles" / bundle
    wf = ConfigWorkflow(
        config_file=str(root / "configs" / config),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(root),
        **override,
    )
    wf.initialize()
    return wf


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run_infer(bundle, **override) -> list[dict]:
    wf = _workflow(bundle, **override)
    wf.evaluator.exit_on_error = False
    wf.run()
    return _read(os.path.join(override["output_dir"], "predictions.csv"))


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_infer_properties_and_net_in_out(bundle):
    from monai.bundle import verify_net_in_out

    wf = _workflow(bundle)
    assert wf.check_properties() in ([], None)
    root = REPO / "bundles" / bundle
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "inference.yaml"),
        bundle_root=str(root),
        n=2,
    )


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_default_run_on_the_shipped_examples(bundle, tmp_path):
    rows = _run_infer(bundle, output_dir=str(tmp_path / "out"))
    with open(REPO / "bundles" / bundle / "examples" / "examples.csv", newline="") as f:
        examples = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [e["image"] for e in examples]
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["sample"] == "true" for r in rows)
    assert [r["label"] for r in rows] == [e["label"] for e in examples]  # marked with their known class
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in BUNDLES[bundle]]
        assert abs(sum(probs) - 1) < 1e-4 and r["prediction"] in BUNDLES[bundle]
        assert float(r["probability"]) == pytest.approx(max(probs), abs=1e-6)
        concept_cols = [k for k in r if k.startswith("concept_")]
        assert concept_cols and all(0.0 <= float(r[k]) <= 1.0 for k in concept_cols)  # probe probabilities
        pairs = [p for p in r["top_concepts"].split(";") if p]
        assert len(pairs) <= 5
        names = {p.split("=")[0].removeprefix("not ") for p in pairs}
        assert names <= {k[len("concept_") :] for k in concept_cols}
        values = [float(p.split("=")[1]) for p in pairs]
        assert values == sorted(values, reverse=True) and all(v > 0 for v in values)


@needs_data
@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_real_images_with_synthetic_dicom_nifti_and_bad_inputs(bundle, tmp_path):
    src = DATA / REAL[bundle]
    real = sorted(p for p in src.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:3]
    rng = np.random.default_rng(0)
    base = (rng.random((64, 72)) * 3000).astype(np.uint16)
    write_synthetic_dicom(tmp_path / "mono1.dcm", base, photometric="MONOCHROME1", bits=16)
    write_synthetic_dicom(tmp_path / "mono2.dcm", base, photometric="MONOCHROME2", bits=16)
    nib.save(nib.Nifti1Image(rng.random((48, 40)).astype(np.float32), np.eye(4)), str(tmp_path / "slice.nii.gz"))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "notes.txt").write_text("not an image")
    images = [str(p) for p in real] + [
        "mono1.dcm",
        "mono2.dcm",
        "slice.nii.gz",
        "corrupt.png",
        "missing.jpg",
        "notes.txt",
    ]
    with open(tmp_path / "input.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        for im in images:
            w.writerow([im, ""])
    rows = _run_infer(bundle, input=str(tmp_path / "input.csv"), output_dir=str(tmp_path / "out"))
    assert [r["image"] for r in rows] == images  # input order, one row each
    status = {r["image"]: r for r in rows}
    for im in images[:-3]:
        assert status[im]["status"] == "ok", status[im]["error"]
    for bad, reason in (("corrupt.png", "corrupt"), ("missing.jpg", "not found"), ("notes.txt", "unsupported")):
        assert status[bad]["status"] == "error"
        assert bad in status[bad]["error"] and reason in status[bad]["error"]

    # MONOCHROME1 is the inverted rendering of the same pixels: the model must not see identical inputs
    def outputs(r):
        return [r[f"prob_{c}"] for c in BUNDLES[bundle]] + [r["top_concepts"]]

    assert outputs(status["mono1.dcm"]) != outputs(status["mono2.dcm"])


def test_rerun_resumes_and_keeps_finished_rows(tmp_path):
    import json

    out = tmp_path / "out"
    first = _run_infer("cxr_cbm", output_dir=str(out))
    # simulate an interrupted run: the journal lost its last row and predictions.csv was never assembled
    journal = out / ".medcbm" / "journal.rank0.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    kept = json.loads(lines[0])
    kept["row"]["probability"] = "0.123456"  # tampered: a kept row is not recomputed
    journal.write_text(json.dumps(kept) + "\n" + "".join(lines[1:-1]) + lines[-1][: len(lines[-1]) // 2])
    (out / "predictions.csv").unlink()
    second = _run_infer("cxr_cbm", output_dir=str(out))
    summary = json.loads((out / "run_summary.json").read_text())
    assert len(second) == len(first) and summary["throughput"]["encoded"] == 1
    assert second[0]["probability"] == "0.123456"
    # the lost row is recomputed (alone in its batch: float reduction order may move the 6th decimal)
    assert second[-1]["prediction"] == first[-1]["prediction"]
    assert float(second[-1]["probability"]) == pytest.approx(float(first[-1]["probability"]), abs=1e-5)


@needs_data
def test_cli_exit_status_and_error_rows(tmp_path):
    """The contract command from the repo root: non-zero exit when a row fails, all rows written."""
    img = next((DATA / REAL["blood_cbm"]).glob("*.jpg"))
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(img, folder / "cell.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    cmd = bundle_command(
        "blood_cbm",
        "inference.yaml",
        "--workflow_type",
        "infer",
        "--input",
        str(folder),
        "--output_dir",
        str(tmp_path / "out"),
    )
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    rows = _read(tmp_path / "out" / "predictions.csv")
    assert {os.path.basename(r["image"]): r["status"] for r in rows} == {"broken.jpg": "error", "cell.jpg": "ok"}
    assert "1 of 2 inputs failed" in proc.stderr


@needs_data
def test_train_workflow_refits_from_csv(tmp_path):
    """train.yaml on a small site CSV (with concept columns) writes a models folder that inference can use."""
    from medcbm.datasets import pbc_wbcatt_records
    from medcbm.datasets.export import write_split_csvs
    from medcbm.concepts import load_concept_bank

    bank = load_concept_bank(REPO / "bundles" / "blood_cbm" / "configs" / "concepts.yaml")
    recs = pbc_wbcatt_records(splits=("train", "val"))
    small = [r for r in recs if r["split"] == "train"][::6] + [r for r in recs if r["split"] == "val"][::3]
    write_split_csvs(small, bank.concept_ids, tmp_path / "csv")
    models = tmp_path / "models"
    wf = _workflow(
        "blood_cbm",
        "train.yaml",
        "train",
        train=str(tmp_path / "csv" / "train.csv"),
        val=str(tmp_path / "csv" / "val.csv"),
        output_dir=str(models),
        cache_dir=str(tmp_path / "cache"),
    )
    wf.run()
    report = __import__("json").loads((models / "fit_report.json").read_text())
    assert report["grounding"] == "probe" and report["val_metrics"]["accuracy"] > 0.5
    assert (models / "cbm.safetensors").is_file() and (models / "backbone" / "open_clip_config.json").is_file()
    rows = _run_infer("blood_cbm", models_dir=str(models), output_dir=str(tmp_path / "out"))
    assert all(r["status"] == "ok" for r in rows)


def test_backbone_override_falls_back_to_zero_shot(tmp_path, tiny_backbone_spec):
    """Another backbone makes the stored fit stale: text grounding + prior head, same concepts and classes."""
    from medcbm.bundle import LoadedBundle

    wf = _workflow("cxr_cbm", output_dir=str(tmp_path / "out"), backbone=tiny_backbone_spec)
    net = wf.network_def
    bundle = LoadedBundle.load(REPO / "bundles" / "cxr_cbm", backbone=tiny_backbone_spec)
    assert bundle.info["fit"] == "zero-shot prior head" and bundle.reference is None
    assert net.targets == BUNDLES["cxr_cbm"] == bundle.class_names
    with torch.no_grad():
        assert net(torch.rand(1, 3, 32, 32)).shape == (1, 2)


def test_concept_columns_can_be_switched_off_and_a_rerun_then_recomputes(tmp_path):
    out = tmp_path / "out"
    with_cols = _run_infer("cxr_cbm", output_dir=str(out))
    without = _run_infer("cxr_cbm", output_dir=str(out), concept_columns=False)
    assert any(k.startswith("concept_") for k in with_cols[0])
    assert not any(k.startswith("concept_") for k in without[0])
    assert [r["prediction"] for r in without] == [r["prediction"] for r in with_cols]
