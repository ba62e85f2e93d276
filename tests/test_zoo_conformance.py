# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The MONAI model-zoo's own checks (its ``ci/verify_bundle.py``), run offline on every bundle.

Exempt by design (see docs/DESIGN.md): PyPI pins of the unreleased medcbm, weights above 1 MB kept in git
(the bundles must run offline), YAML instead of JSON configs (the zoo lets a bundle name its config file).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import REPO

BUNDLES = ["blood_cbm", "cxr_cbm", "derm_cbm"]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _files(name):
    b = REPO / "bundles" / name
    return b, b / "configs" / "metadata.json", b / "configs" / "inference.yaml"


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_directory_and_version(name):
    import json

    b, meta_file, infer = _files(name)
    for rel in ("LICENSE", "configs/metadata.json", "models/model.pt", "configs/inference.yaml", "docs/README.md"):
        assert (b / rel).is_file(), f"{name}: {rel} missing"
    meta = json.loads(meta_file.read_text())
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_net_in_out_and_torchscript_export(name, tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out

    b, meta_file, infer = _files(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=str(infer), bundle_root=str(b))
        # as the zoo calls it: scripted (no use_trace), from models/model.pt
        ckpt_export(
            net_id="network_def",
            filepath=str(tmp_path / "verify_model.ts"),
            ckpt_file=str(b / "models" / "model.pt"),
            meta_file=str(meta_file),
            config_file=str(infer),
            bundle_root=str(b),
        )
    ts = torch.jit.load(str(tmp_path / "verify_model.ts"))
    from medcbm.bundle import LoadedBundle

    bundle = LoadedBundle.load(b)
    s = bundle.preprocessing.image_size
    x = torch.rand(2, 3, s, s)
    with torch.no_grad():
        # model.pt is stored in float16: the exported network agrees with the safetensors one to that precision
        torch.testing.assert_close(ts(x), bundle.network(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", BUNDLES)
def test_model_pt_is_the_shipped_network(name):
    from medcbm.bundle import LoadedBundle

    b, _, _ = _files(name)
    state = torch.load(b / "models" / "model.pt", weights_only=True)
    ref = LoadedBundle.load(b).network.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(state[k].to(v.dtype), v, rtol=1e-3, atol=1e-3, msg=f"{name}: {k} differs")


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("workflow_type, config", [("infer", "inference.yaml"), ("train", "train.yaml")])
def test_workflow_properties(name, workflow_type, config):
    from monai.bundle import ConfigWorkflow

    b, meta_file, _ = _files(name)
    wf = ConfigWorkflow(
        config_file=str(b / "configs" / config),
        meta_file=str(meta_file),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(b),
    )
    wf.initialize()
    assert wf.check_properties() == []
    if workflow_type == "train":
        assert wf.parser.get_parsed_content("train#trainer").max_epochs == 1
        assert str(wf.parser.get_parsed_content("train#trainer").device) == str(wf.parser.get_parsed_content("device"))


@pytest.mark.parametrize("name", BUNDLES)
def test_zoo_train_pattern_runs_a_smoke_fit_on_the_shipped_examples(name, tmp_path, monkeypatch):
    """The model zoo's unit-test pattern, with no override but ``output_dir``: the default training data is
    the bundle's labelled examples, and the fitted folder says it is a smoke fit."""
    monkeypatch.setenv("MEDCBM_CACHE", str(tmp_path / "cache"))
    import json

    from monai.bundle import ConfigWorkflow

    b, meta_file, _ = _files(name)
    wf = ConfigWorkflow(
        workflow_type="train",
        config_file=str(b / "configs" / "train.yaml"),
        meta_file=str(meta_file),
        logging_file=str(b / "configs" / "logging.conf"),
        bundle_root=str(b),
        output_dir=str(tmp_path / "models"),
    )
    wf.initialize()
    assert wf.check_properties() == []
    assert wf.parser.get_parsed_content("train#dataset#data").endswith("examples/examples.csv")
    assert wf.parser.get_parsed_content("train#handlers") == []
    wf.run()
    wf.finalize()
    report = json.loads((tmp_path / "models" / "fit_report.json").read_text())
    n_examples = len((b / "examples" / "examples.csv").read_text().splitlines()) - 1
    assert report["n_train"] == report["n_val"] == n_examples
    assert "not a model to use" in report["smoke_fit"]
    assert report["trained_on"].startswith("smoke fit, not for use")
    assert (tmp_path / "models" / "cbm.safetensors").is_file()


@pytest.mark.parametrize("name", BUNDLES)
def test_multi_gpu_overlay_merges_after_inference(name):
    from monai.bundle import ConfigParser

    b, _, infer = _files(name)
    parser = ConfigParser()
    parser.read_config([str(infer), str(b / "configs" / "multi_gpu_inference.yaml")])
    assert parser["evaluator"]["_target_"] == "medcbm.workflows.InferenceRunner"
    assert any("init_process_group" in x for x in parser["initialize"])
