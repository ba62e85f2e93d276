# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Bundle metadata, licences and large-file lists, checked offline against the vendored schema."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

# verify_metadata warns that an existing schema file is used without a hash check; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:No hash value provided:UserWarning")

from monai.bundle import verify_metadata  # noqa: E402

import medcbm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO / "bundles"
SCHEMA_FILE = REPO / "medcbm" / "schemas" / "meta_schema.json"
OFFICIAL_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)

# shared/docs/CONTRACT.md, "Class names" (order = logit order)
CONTRACT_CLASSES = {
    "derm_cbm": ["nevus", "melanoma", "seborrheic_keratosis"],
    "cxr_cbm": ["normal", "abnormal"],
    "blood_cbm": ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"],
}
BUNDLES = sorted(CONTRACT_CLASSES)
REQUIRED_PACKAGES = {
    "medcbm",
    "open_clip_torch",
    "pydicom",
    "nibabel",
    "scikit-image",
    "safetensors",
    "fire",
    "pyyaml",
    "timm",
}
SPEC_TENSOR_KEYS = {
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
}
# download_large_files passes every entry to monai.apps.download_url(**entry) after renaming path -> filepath
LARGE_FILE_KEYS = {"path", "url", "hash_val", "hash_type"}
HASH_HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}


def _meta_file(bundle: str) -> Path:
    return BUNDLES_DIR / bundle / "configs" / "metadata.json"


def _load_meta(bundle: str) -> dict:
    return json.loads(_meta_file(bundle).read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


@pytest.fixture(scope="module")
def validator(schema):
    return jsonschema.Draft7Validator(schema)


# ---------------------------------------------------------------- the schema itself


def test_schema_is_valid_draft07(schema):
    assert schema["$schema"].startswith("http://json-schema.org/draft-07/schema")
    jsonschema.Draft7Validator.check_schema(schema)
    comment = schema["$comment"]
    assert "offline" in comment.lower() and "meta_schema_20240725.json" in comment and OFFICIAL_SCHEMA_URL in comment


def test_schema_requires_spec_keys(schema):
    assert set(schema["required"]) >= {
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    }
    assert set(schema["definitions"]["tensor"]["required"]) == SPEC_TENSOR_KEYS


# ---------------------------------------------------------------- per-bundle metadata


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_metadata_passes_with_vendored_schema(bundle):
    # MONAI 1.6.1: returns None on success, raises ValueError on a validation error; an existing
    # `filepath` is used as is (no download).
    assert verify_metadata(meta_file=str(_meta_file(bundle)), filepath=str(SCHEMA_FILE)) is None


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_fields(bundle):
    meta = _load_meta(bundle)
    assert meta["schema"] == OFFICIAL_SCHEMA_URL
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]) and meta["version"] in meta["changelog"]
    assert meta["version"] in meta["changelog"] and meta["changelog"][meta["version"]].strip()
    assert set(meta["required_packages_version"]) == REQUIRED_PACKAGES
    assert meta["required_packages_version"]["medcbm"] == medcbm.__version__
    assert meta["authors"] == "medcbm contributors"
    assert meta["copyright"] == "Copyright (c) 2026 medcbm contributors"
    assert meta["intended_use"].startswith("Research use only. Not a medical device")
    assert "not a medical device" in meta["description"].lower()
    # figures come from the committed evaluation output, never typed by hand
    results = json.loads((REPO / "benchmarks" / "results" / "evaluate_bundles.json").read_text())[bundle]
    assert meta["eval_metrics"]["cbm"] == {k: v for k, v in results["cbm_test"].items() if k != "n"}
    card = (REPO / "bundles" / bundle / "docs" / "README.md").read_text()
    assert f"| balanced accuracy (%) | {100 * results['cbm_test']['balanced_accuracy']:.1f} |" in card
    assert "not a medical device" in card
    assert any("Textbook Remedy for Domain Shifts" in r for r in meta["references"])


def test_versions_agree_across_bundles():
    keys = ("monai_version", "pytorch_version", "numpy_version", "required_packages_version")
    first = _load_meta(BUNDLES[0])
    for bundle in BUNDLES[1:]:
        meta = _load_meta(bundle)
        assert {k: meta[k] for k in keys} == {k: first[k] for k in keys}, bundle


@pytest.mark.parametrize("bundle", BUNDLES)
def test_class_names_match_contract(bundle):
    meta = _load_meta(bundle)
    classes = CONTRACT_CLASSES[bundle]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert set(pred) >= SPEC_TENSOR_KEYS
    assert [pred["channel_def"][str(i)] for i in range(len(pred["channel_def"]))] == classes
    assert pred["num_channels"] == len(classes)
    assert pred["spatial_shape"] == [1, len(classes)]
    assert (pred["type"], pred["format"], pred["dtype"]) == ("probabilities", "classes", "float32")
    assert "logits" in pred["note"] and "softmax" in pred["note"]
    for name in classes:
        assert name in meta["pred_classes"]
    # and the bundle's concept bank agrees on names and order
    bank = yaml.safe_load((BUNDLES_DIR / bundle / "configs" / "concepts.yaml").read_text())
    assert bank["classes"] == classes


@pytest.mark.parametrize("bundle", BUNDLES)
def test_input_format(bundle):
    image = _load_meta(bundle)["network_data_format"]["inputs"]["image"]
    assert set(image) >= SPEC_TENSOR_KEYS
    # what the shipped backbone takes: its preprocess_cfg size, and [0, 1] pixels after its normalisation
    pp = json.loads((REPO / "bundles" / bundle / "models" / "backbone" / "open_clip_config.json").read_text())
    pp = pp["preprocess_cfg"]
    assert image["spatial_shape"] == [pp["size"], pp["size"]]
    assert image["num_channels"] == 3 and image["dtype"] == "float32" and image["is_patch_data"] is False
    assert sorted(image["channel_def"]) == ["0", "1", "2"]
    lo, hi = image["value_range"]
    assert lo == pytest.approx(min(-m / s for m, s in zip(pp["mean"], pp["std"])), abs=1e-4)
    assert hi == pytest.approx(max((1 - m) / s for m, s in zip(pp["mean"], pp["std"])), abs=1e-4)


# ---------------------------------------------------------------- rejection of broken metadata


def _broken_cases(meta: dict):
    def without(*path):
        m = copy.deepcopy(meta)
        node = m
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return m

    def with_value(value, *path):
        m = copy.deepcopy(meta)
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return m

    yield "missing task", without("task")
    yield "missing schema", without("schema")
    yield "missing required_packages_version", without("required_packages_version")
    yield "missing inputs.image", without("network_data_format", "inputs", "image")
    yield "missing outputs.pred.channel_def", without("network_data_format", "outputs", "pred", "channel_def")
    yield "version not semver (0.1)", with_value("0.1", "version")
    yield "version with v prefix", with_value("v0.1.0", "version")
    yield "version not a string", with_value(1, "version")
    yield "package version 'latest'", with_value("latest", "required_packages_version", "medcbm")
    yield "monai_version '>=1.6'", with_value(">=1.6", "monai_version")
    pred_range = ("network_data_format", "outputs", "pred", "value_range")
    yield "value_range not numbers", with_value(["-inf", "inf"], *pred_range)
    yield "value_range of one item", with_value([0], "network_data_format", "inputs", "image", "value_range")
    yield "pred_classes as list", with_value(["a", "b"], "pred_classes")
    yield "changelog key not semver", with_value({"first": "x"}, "changelog")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_schema_rejects_broken_metadata(bundle, validator):
    meta = _load_meta(bundle)
    assert not list(validator.iter_errors(meta))
    for label, broken in _broken_cases(meta):
        assert list(validator.iter_errors(broken)), f"schema accepted metadata with {label}"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda m: m.pop("task"), id="missing-task"),
        pytest.param(lambda m: m.update(version="0.1"), id="bad-version"),
    ],
)
def test_verify_metadata_raises_on_broken(tmp_path, mutate):
    meta = _load_meta("derm_cbm")
    mutate(meta)
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA_FILE))


# ---------------------------------------------------------------- licences and large files


@pytest.mark.parametrize("bundle", BUNDLES)
def test_license_files(bundle):
    text = (BUNDLES_DIR / bundle / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
    data_licence = (BUNDLES_DIR / bundle / "docs" / "data_license.txt").read_text()
    expected = {
        "derm_cbm": ["CC-0"],
        "cxr_cbm": ["unrestricted", "NIH Clinical Center"],
        "blood_cbm": ["CC BY 4.0", "MIT"],
    }[bundle]
    for needle in expected:
        assert needle in data_licence


@pytest.mark.parametrize("bundle", BUNDLES)
def test_large_files(bundle):
    bundle_root = BUNDLES_DIR / bundle
    entries = yaml.safe_load((bundle_root / "large_files.yml").read_text())["large_files"]
    assert entries
    weights = 0
    for entry in entries:
        assert {"path", "url", "hash_type"} <= set(entry) <= LARGE_FILE_KEYS, entry
        path = entry["path"]
        assert not os.path.isabs(path)
        target = os.path.realpath(bundle_root / path)
        assert os.path.commonpath([os.path.realpath(bundle_root), target]) == os.path.realpath(bundle_root)
        assert path.startswith("models/hub/")
        # pinned to a 40-hex tree; BiomedCLIP's full revision id could not be read offline (see its comment)
        revision = "main" if bundle == "blood_cbm" else "[0-9a-f]{40}"
        assert re.fullmatch(
            rf"https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/{revision}/" + re.escape(Path(path).name), entry["url"]
        ), entry["url"]
        assert entry["hash_type"] in HASH_HEX_LEN
        hash_val = entry.get("hash_val", "")
        assert hash_val == "" or re.fullmatch(rf"[0-9a-f]{{{HASH_HEX_LEN[entry['hash_type']]}}}", hash_val)
        if Path(path).name in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
            weights += 1
            assert hash_val, "weight files must carry a pinned hash"
    assert weights == 1
    assert any(Path(e["path"]).name == "open_clip_config.json" for e in entries)
