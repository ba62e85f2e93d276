# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""``adapt.yaml --site_images``: an unlabelled site sample -> calibration and label shift in ``adaptation.json``.

Uses the toy bundle of ``test_adapt_workflow`` (red/blue images, a green-cast site).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medcbm.bundle import LoadedBundle
from medcbm.engine import PredictionEngine
from medcbm.workflows import InferenceRunner
from medcbm.workflows.adapt import ADAPTATION_FILE, REPORT_FILE, AdaptationRunner
from medcbm.workflows.site_sample import SiteSampleError
from test_adapt_workflow import (  # noqa: F401
    _adapt_then_infer,
    _assert_fails_in_one_line,
    _images,
    _predictions,
    _run_toy,
    _write,
    site,
)


def _smooth_images(folder, n, seed, green_cast=True):
    """Like ``_images`` (reddish / bluish, green cast) but drawn at 10 x 10 and upsampled: the engine's image checks
    call pixel-independent noise "noise-like", and a site sample must pass them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for label, ch in (("reddish", 0), ("bluish", 2)):
        for i in range(n):
            img = rng.integers(0, 80, (10, 10, 3), dtype=np.uint8)
            img[..., ch] = rng.integers(160, 255, (10, 10))
            if green_cast:
                img[..., 1] = rng.integers(160, 255, (10, 10))
            Image.fromarray(img).resize((40, 40), Image.BICUBIC).save(folder / f"{label}_{i}.png")
    return folder


@pytest.fixture(scope="module")
def site_folder(site):  # noqa: F811
    """40 unlabelled green-cast images of the target site (none of them in the support or held-out CSVs)."""
    return _smooth_images(site["work"] / "site_sample", 20, seed=7)


def _adapt(site, out, site_images, support=None, **kw):  # noqa: F811
    kw.setdefault("progress", False)
    return AdaptationRunner(site["root"], out, support, site_images=site_images, exit_on_error=False, **kw).run()


def test_site_sample_alone_writes_a_complete_reasoned_file_and_the_same_bytes_twice(site, site_folder, tmp_path):  # noqa: F811
    spec = _adapt(site, tmp_path / "a", site_folder)
    data = json.loads((tmp_path / "a" / ADAPTATION_FILE).read_text())
    assert data["mask"] == [] and data["gain"] == {} and data["support_accuracy_before"] is None
    assert data["label_shift"]["reason"] and isinstance(data["label_shift"]["applied"], bool)
    cal = data["calibration"]
    for entry in cal.get("concepts", {}).values():
        assert entry["slope"] > 0 and entry["reason"]
    assert all(r.startswith("source guard:") for r in cal.get("refused", {}).values())
    assert data["provenance"]["n_site_images"] == 40 and len(data["provenance"]["site_images_sha256"]) == 64
    assert data["method"]["site_sample"]["n_site_images"] == 40
    assert spec.source_accuracy_before is not None and spec.source_accuracy_after is not None
    report = json.loads((tmp_path / "a" / REPORT_FILE).read_text())
    assert set(report["site_sample"]["concept_shift"]) >= {"before_calibration", "after_calibration", "message"}
    _adapt(site, tmp_path / "b", site_folder)
    assert (tmp_path / "a" / ADAPTATION_FILE).read_bytes() == (tmp_path / "b" / ADAPTATION_FILE).read_bytes()


def test_with_support_the_edit_is_searched_on_top_and_a_prediction_ignores_its_batch(site, site_folder, tmp_path):  # noqa: F811
    _adapt(site, tmp_path / "adapt", site_folder, support=site["support"])
    path = tmp_path / "adapt" / ADAPTATION_FILE
    data = json.loads(path.read_text())
    assert data["provenance"]["k_per_class"] == {"reddish": 4, "bluish": 4} and "n_site_images" in data["provenance"]
    assert data["support_accuracy_after"] >= data["support_accuracy_before"]
    bundle = LoadedBundle.load(site["root"], adaptation=path)
    engine = PredictionEngine(bundle, progress=False)
    with open(site["rest"], newline="") as f:
        images = [r["image"] for r in csv.DictReader(f)][:12]
    pipe = bundle.preprocessing.pipeline()
    with torch.no_grad():
        feats = bundle.network.features(torch.stack([pipe(p) for p in images]))
    batch = engine.predict_features(feats)["logits"]
    alone = np.concatenate([engine.predict_features(feats[i : i + 1])["logits"] for i in range(len(images))])
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-5)
    # the file, removed, leaves the shipped bundle
    shipped = LoadedBundle.load(site["root"])
    bundle.set_adaptation(None)
    assert bundle.fingerprint() == shipped.fingerprint()


def test_bundle_command_site_images_then_inference_reports_the_calibrated_shift(site, site_folder, tmp_path):  # noqa: F811
    data, out = _adapt_then_infer(site, tmp_path, "--site_images", str(site_folder))
    assert "calibration" in data
    summary = json.loads((out / "run_summary.json").read_text())
    if data["calibration"].get("concepts"):
        cs = summary["site_shift"]["concept_space"]
        assert cs["before_calibration"]["n"] == len(_predictions(out)) and "after" in cs["message"]
    # a bad site sample: one line, exit 2, no file
    few = _smooth_images(tmp_path / "few", 3, seed=9)
    proc = _run_toy(site, "adapt.yaml", "--site_images", str(few), "--output_dir", str(tmp_path / "bad"))
    _assert_fails_in_one_line(proc, tmp_path / "bad", str(few), "at least 30 needed")


# ------------------------------------------------------------------------------------------------ bad site samples
def _bad_site(site_folder, tmp_path, case):
    folder = tmp_path / "site"
    shutil.copytree(site_folder, folder)
    first = sorted(folder.glob("*.png"))[0]
    if case == "too_few":
        for p in sorted(folder.glob("*.png"))[5:]:
            p.unlink()
    elif case == "blank":
        Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(folder / "zz_blank.png")
    elif case == "duplicate_content":
        shutil.copy(first, folder / "zz_copy.png")
    elif case == "unreadable":
        (folder / "zz_broken.png").write_bytes(b"not a png")
    elif case == "wrong_modality":
        for p in sorted(folder.glob("*.png")):
            Image.open(p).convert("L").convert("RGB").save(p)
    elif case == "same_row_twice":
        rows = [[str(p)] for p in sorted(folder.glob("*.png"))] + [[str(first)]]
        return _write(tmp_path / "site.csv", rows, header=("image",))
    return folder


BAD_SITES = {
    "too_few": r"5 site images, at least 30 needed",
    "blank": r"1 of 41 site images are unusable: .*zz_blank\.png \(blank image",
    "duplicate_content": r"listed more than once: .*zz_copy\.png \(identical content to",
    "unreadable": r"1 of 41 site images cannot be read: .*zz_broken\.png",
    "wrong_modality": r"40 of 40 site images are unusable: .*greyscale image for a colour modality",
    "same_row_twice": r"the same image is listed more than once",
}


@pytest.mark.parametrize("case", sorted(BAD_SITES))
def test_a_bad_site_sample_is_one_clear_line_and_no_file(site, site_folder, tmp_path, case):  # noqa: F811
    given = _bad_site(site_folder, tmp_path, case)
    with pytest.raises(SiteSampleError, match=BAD_SITES[case]) as info:
        _adapt(site, tmp_path / "adapt", given)
    assert str(given) in str(info.value)
    assert not (tmp_path / "adapt" / ADAPTATION_FILE).exists() and not (tmp_path / "adapt" / REPORT_FILE).exists()


def test_labels_in_a_site_csv_are_ignored_with_a_warning(site, site_folder, tmp_path, caplog):  # noqa: F811
    rows = [[str(p), "reddish"] for p in sorted(site_folder.glob("*.png"))]
    labelled = _write(tmp_path / "site.csv", rows)
    with caplog.at_level(logging.WARNING, logger="medcbm.workflows.site_sample"):
        _adapt(site, tmp_path / "with_labels", labelled)
    _adapt(site, tmp_path / "folder", site_folder)
    data = json.loads((tmp_path / "with_labels" / ADAPTATION_FILE).read_text())
    assert any("carry a label" in w and "ignored" in w for w in data["warnings"])
    assert any("carry a label" in r.getMessage() for r in caplog.records)
    plain = json.loads((tmp_path / "folder" / ADAPTATION_FILE).read_text())
    assert data["calibration"] == plain["calibration"] and data["label_shift"] == plain["label_shift"]


def test_inference_without_the_file_is_the_shipped_bundle(site, site_folder, tmp_path):  # noqa: F811
    _adapt(site, tmp_path / "adapt", site_folder)
    InferenceRunner(site["root"], tmp_path / "plain", site["rest"], exit_on_error=False, progress=False).run()
    summary = json.loads((tmp_path / "plain" / "run_summary.json").read_text())
    assert "concept_space" not in summary["site_shift"] and "adaptation" not in summary["model"]
