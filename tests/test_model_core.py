# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Backbone loading (local-dir), both grounding modes, the network and its saved state, the feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medcbm.backbones import load_backbone
from medcbm.engine import extract_features
from medcbm.features import FeatureCache
from medcbm.grounding import ProbeGrounding, TextGrounding, fit_concept_probes, grounding_report
from medcbm.head import KnowledgePriorHead
from medcbm.networks import ConceptBottleneckClassifier, read_cbm_state, save_cbm_state
from medcbm.transforms import ClinicalImagePipeline


def test_local_dir_backbone_round_trip(tiny_backbone_spec, tmp_path):
    bk = load_backbone(tiny_backbone_spec)
    assert bk.image_size == 32 and len(bk.mean) == 3
    img = bk.encode_images(torch.rand(2, 3, 32, 32))
    assert img.shape == (2, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    txt = bk.encode_texts(["a round shape", "spiky outline"])
    assert txt.shape == (2, 16)
    again = load_backbone(tiny_backbone_spec)
    assert again.fingerprint == bk.fingerprint
    torch.testing.assert_close(
        again.encode_images(torch.ones(1, 3, 32, 32)), bk.encode_images(torch.ones(1, 3, 32, 32))
    )


def test_backbone_fingerprint_changes_with_weights(tmp_path):
    from conftest import build_tiny_backbone

    a = load_backbone(build_tiny_backbone(tmp_path / "a", seed=0))
    b = load_backbone(build_tiny_backbone(tmp_path / "b", seed=1))
    assert a.fingerprint != b.fingerprint


def test_missing_local_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_backbone(f"local-dir:{tmp_path}")


def _probe_data(n, seed, d=8):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, d))
    labels = np.stack([(f[:, 0] > 0), (f[:, 1] + 0.5 * rng.standard_normal(n) > 0.3), rng.random(n) < 0.5], 1)
    labels = labels.astype(np.float32)
    labels[: n // 4, 2] = np.nan  # partially annotated concept
    return f / np.linalg.norm(f, axis=1, keepdims=True), labels


def test_probe_grounding_learns_and_reports_chance_concepts():
    X, Y = _probe_data(400, 0)
    Xv, Yv = _probe_data(200, 1)
    probe = fit_concept_probes(X, Y, Xv, Yv)
    assert isinstance(probe, ProbeGrounding) and probe.num_concepts == 3
    s = probe(torch.as_tensor(Xv, dtype=torch.float32)).numpy()
    assert s.min() >= 0 and s.max() <= 1
    report = grounding_report(["c0", "c1", "noise"], s, Yv)
    assert report[0].groundable and report[0].auroc > 0.95
    assert report[1].groundable
    assert not report[2].groundable and "not better than chance" in report[2].reason
    # calibration: mean predicted probability near the observed rate for a learnable concept
    assert abs(s[:, 0].mean() - np.nanmean(Yv[:, 0])) < 0.1


def test_text_grounding_is_scaled_cosine_and_calibrates():
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    g = TextGrounding(emb, scale=5.0)
    f = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    torch.testing.assert_close(g(f), 5.0 * f @ emb.T)
    g.calibrate(f)
    torch.testing.assert_close(g(f).mean(0), torch.zeros(3), atol=1e-5, rtol=0)


def _network(encoder=None, K=3, C=2):
    g = TextGrounding(torch.nn.functional.normalize(torch.randn(K, 16), dim=-1))
    W, b = torch.randn(C, K), torch.randn(C)
    return ConceptBottleneckClassifier(encoder, g, W, b, [f"k{i}" for i in range(K)], ["a", "b"][:C])


def test_network_forward_is_logits_and_contributions_sum(tiny_backbone_spec):
    bk = load_backbone(tiny_backbone_spec)
    net = _network(bk.image_encoder()).eval()
    x = torch.rand(4, 3, 32, 32)
    logits = net(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, 2)
    contrib = net.contributions(x)
    torch.testing.assert_close(contrib.sum(-1) + net.contribution_bias(), logits)
    net.neutral.copy_(torch.rand(3))  # a source-site reference moves contributions, never the logits
    torch.testing.assert_close(net.contributions(x).sum(-1) + net.contribution_bias(), net(x))
    net.set_edit(mask=["k1"])
    assert torch.all(net.contributions(x)[:, :, 1] == 0)
    assert net.targets == ["a", "b"] and net.concepts == ["k0", "k1", "k2"]


def test_edit_is_identity_by_default_and_masks_and_gains():
    net = _network()
    f = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    raw = net.concept_scores_from_features(f, edited=False)
    torch.testing.assert_close(net.concept_scores_from_features(f), raw)
    net.neutral.fill_(0.25)
    net.set_edit(mask=["k1"], gain={"k2": 2.0})
    s = net.concept_scores_from_features(f)
    torch.testing.assert_close(s[:, 1], torch.full((5,), 0.25))
    torch.testing.assert_close(s[:, 2], 2 * raw[:, 2])
    torch.testing.assert_close(s[:, 0], raw[:, 0])
    with pytest.raises(KeyError, match="unknown concept id 'nope'"):
        net.set_edit(mask=["nope"])
    net.reset_edit()
    torch.testing.assert_close(net.concept_scores_from_features(f), raw)


def test_head_arrays_compute_what_the_network_computes():
    """The numpy view (edit search, audit, benchmarks) and the torch network agree: edit, logits with a label-shift
    offset, probabilities, contributions and their bias."""
    net = _network().double()
    f = torch.nn.functional.normalize(torch.randn(6, 16, dtype=torch.float64), dim=-1)
    net.neutral.fill_(0.25)
    net.set_edit(mask=["k1"], gain={"k2": 2.0})
    net.set_site_calibration(class_offset=np.array([0.7, -0.3]))
    net.double()
    raw = net.concept_scores_from_features(f, edited=False)
    h = net.head_arrays()
    S = h.edit(raw.detach().numpy())
    np.testing.assert_allclose(S, net.apply_edit(raw).detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(h.logits(S), net.logits_from_scores(torch.as_tensor(S)).detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(h.probabilities(S).sum(1), 1.0)
    C = h.contributions(S)
    np.testing.assert_allclose(C, net.contributions_from_scores(torch.as_tensor(S)).detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(C.sum(2) + h.contribution_bias(), h.logits(S), atol=1e-10)


def test_verify_net_in_out_accepts_network(tiny_backbone_spec):
    from monai.bundle import verify_net_in_out  # noqa: F401  (the bundle check relies on this API)

    bk = load_backbone(tiny_backbone_spec)
    net = _network(bk.image_encoder()).eval()
    out = net(torch.rand(1, 3, 32, 32))
    assert out.dtype == torch.float32 and out.shape[1] == 2


def test_cbm_state_round_trip(tmp_path):
    probe = ProbeGrounding(torch.randn(3, 16), torch.randn(3))
    head = KnowledgePriorHead.from_prior(np.array([[1, -1, 0], [-1, 1, 0]]))
    net = ConceptBottleneckClassifier.from_head(None, probe, head, ["x", "y", "z"], ["a", "b"], np.ones(3) * 0.3)
    path = save_cbm_state(tmp_path / "cbm.safetensors", net, {"backbone_fingerprint": "abc"})
    tensors, meta = read_cbm_state(path)
    assert meta["grounding_mode"] == "probe" and meta["concept_ids"] == ["x", "y", "z"]
    assert meta["backbone_fingerprint"] == "abc"
    torch.testing.assert_close(tensors["head.weight"], net.head.weight.detach())
    torch.testing.assert_close(tensors["neutral"], torch.full((3,), 0.3))
    assert not list(tmp_path.glob("*.tmp"))


def _write_pngs(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_feature_cache_hit_miss_and_invalidation(tiny_backbone_spec, tmp_path):
    bk = load_backbone(tiny_backbone_spec)
    pipe = ClinicalImagePipeline("rgb", bk.image_size, bk.mean, bk.std)
    paths = _write_pngs(tmp_path / "imgs", 3)
    cache = FeatureCache(tmp_path / "cache", bk.fingerprint, pipe.fingerprint())
    first = extract_features(paths, bk.image_encoder(), pipe, cache)
    assert cache.misses == 3 and cache.hits == 0 and first.features.shape == (3, 16)
    second = extract_features(paths, bk.image_encoder(), pipe, cache)
    assert cache.hits == 3
    np.testing.assert_allclose(second.features, first.features, atol=1e-6)

    # a changed file is a miss (content-addressed), the others still hit
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(paths[0])
    cache.hits = cache.misses = 0
    third = extract_features(paths, bk.image_encoder(), pipe, cache)
    assert cache.misses == 1 and cache.hits == 2
    assert not np.allclose(third.features[0], first.features[0])

    # another preprocessing or backbone never sees these entries
    other = FeatureCache(
        tmp_path / "cache", bk.fingerprint, ClinicalImagePipeline("grey", 32, bk.mean, bk.std).fingerprint()
    )
    extract_features(paths, bk.image_encoder(), pipe, other)
    assert other.hits == 0 and other.misses == 3
    other_bk = FeatureCache(tmp_path / "cache", "another-backbone", pipe.fingerprint())
    assert other_bk.get(third.content_sha256[1]) is None

    # a corrupt entry is not served
    entry = next(cache.namespace.rglob("*.safetensors"))  # an entry this cache reads
    entry.write_bytes(b"garbage")
    fresh = FeatureCache(tmp_path / "cache", bk.fingerprint, pipe.fingerprint())
    extract_features(paths, bk.image_encoder(), pipe, fresh)
    assert fresh.misses >= 1


def test_extraction_keeps_going_past_bad_files(tiny_backbone_spec, tmp_path):
    bk = load_backbone(tiny_backbone_spec)
    pipe = ClinicalImagePipeline("rgb", bk.image_size, bk.mean, bk.std)
    good = _write_pngs(tmp_path / "imgs", 2)
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = extract_features([good[0], bad, tmp_path / "missing.png", good[1]], bk.image_encoder(), pipe)
    assert res.ok == [0, 3]
    assert str(bad) in res.errors[1] and "missing.png" in res.errors[2]


def test_hub_weights_are_hash_checked_before_loading(tmp_path, monkeypatch):
    import huggingface_hub

    from medcbm.backbones import BACKBONE_PRESETS, verify_hub_weights

    fake = tmp_path / "open_clip_pytorch_model.bin"
    fake.write_bytes(b"tampered weights")
    monkeypatch.setattr("medcbm.backbones.hub_reachable", lambda timeout=None: (True, ""))  # as if online
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(fake))
    with pytest.raises(ValueError, match="does not match the pinned"):
        load_backbone("whyxrayclip")  # preset name resolves to the hub spec and is verified first
    good = BACKBONE_PRESETS["biomedclip"]
    monkeypatch.setitem(good, "sha256", __import__("hashlib").sha256(b"tampered weights").hexdigest())
    assert verify_hub_weights(good["spec"]) == fake
    assert verify_hub_weights("hf-hub:someone/unpinned") is None

    def offline(repo, name):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match="cannot fetch open_clip_pytorch_model.bin of hf-hub:yyupenn/whyxrayclip"):
        load_backbone("whyxrayclip")
