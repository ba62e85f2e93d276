# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Few-shot site adaptation of the shipped bundles: the concept edit against its peers (METHODS.md §2).

    timeout 1200 python benchmarks/adaptation.py [--bundles blood_cbm cxr_cbm derm_cbm] [--ks 1 2 4 8]
        [--draws 5] [--bundles-dir bundles] [--out benchmarks/results/adaptation.json] [--docs docs/adapting.md]

Scenarios (target = where the support set is drawn and the adapted model is scored):
- ``blood_cbm / bccd_wbc_dev``: a real second laboratory (277 cells, never used for training);
- ``cxr_cbm / nih_view_ap``: NIH chest X-rays taken AP (test split) for a source of PA images: the guard's
  reference set is the PA validation images, source accuracy is measured on the PA test images;
- ``<bundle> / synthetic_*``: a fixed, deterministic acquisition change applied to the source test split
  (stain or colour, contrast, blur + down-sampling + JPEG; MONAI and scikit-image transforms).

Per scenario, k labelled images per class are drawn (``--draws`` seeds; a class keeps at least one image for
scoring, so a class with one image never enters the support set) and every method is scored on the
remaining target images (balanced accuracy) and on the source test split (accuracy, before/after):
``none`` (shipped head), ``concept_edit`` (ours: ConceptEditSearch with the source guard), ``t3a`` (on concept
scores, seeded with the support set), ``lame`` (on the scored batch, unsupervised), ``refit_head_prior``
(few-shot re-fit of the knowledge-prior head on the support scores; needs every class) and
``linear_probe`` (logistic regression on the support features; a reference that gives up the bottleneck).
From an unlabelled site sample (every other target image outside the support set, so the site sample and the
scored images are disjoint; all methods are scored on the other half): ``site_calibration``, ``site_label_shift``,
``site_both`` (:func:`medcbm.adaptation.fit_site_adaptation`), ``site_both_edit`` (the concept edit searched on
top, as ``adapt.yaml --site_images --support`` does) and ``adabn`` (a baseline outside the bundle: the encoder's
batch-norm statistics re-estimated on the site sample, AdaBN of Li et al. 2017; source images then pass through the
same re-estimated encoder; measured at k = 4 only, since it uses no label and costs encoder passes).

The guard's reference set is the bundle's ``models/reference.safetensors`` when it ships one (labelled validation
scores plus the unlabelled training sample, as ``adapt.yaml`` uses it; for ``nih_view_ap`` the PA validation images
alone, since the training sample mixes views), else the same
definition rebuilt from the source validation split (recorded in the results). Features come through the
medcbm feature cache (``$MEDCBM_CACHE``), so a rerun only re-scores. Prints the JSON it writes, and writes the
docs table between ``<!-- BEGIN GENERATED: adaptation -->`` and ``<!-- END GENERATED -->``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from medcbm.adaptation import ConceptEditSearch, ReferenceScores, fit_site_adaptation  # noqa: E402
from medcbm.adaptation.baselines import T3A, lame_predict, linear_probe_refit, refit_head_with_prior  # noqa: E402
from medcbm.bundle import LoadedBundle  # noqa: E402
from medcbm.datasets.paths import shared_data_root  # noqa: E402
from medcbm.engine import PredictionEngine  # noqa: E402
from medcbm.features import default_cache_dir  # noqa: E402
from medcbm.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from medcbm.metrics import balanced_accuracy  # noqa: E402
from medcbm.pretrain import dataset_records  # noqa: E402

METHODS = (
    "none",
    "concept_edit",
    "t3a",
    "lame",
    "refit_head_prior",
    "linear_probe",
    "site_calibration",
    "site_label_shift",
    "site_both",
    "site_both_edit",
    "adabn",
)
TITLES = {
    "none": "none",
    "concept_edit": "concept edit",
    "t3a": "T3A",
    "lame": "LAME",
    "refit_head_prior": "head re-fit (prior)",
    "linear_probe": "linear probe",
    "site_calibration": "site calibration",
    "site_label_shift": "site label shift",
    "site_both": "site both",
    "site_both_edit": "site both + edit",
    "adabn": "AdaBN",
}
DATASETS = {"blood_cbm": "pbc_wbcatt", "cxr_cbm": "nih_cxr14_256", "derm_cbm": "isic2017"}
SHIFTS = {
    "blood_cbm": ("synthetic_stain", "synthetic_blur_jpeg"),
    "cxr_cbm": ("synthetic_contrast", "synthetic_blur_jpeg"),
    "derm_cbm": ("synthetic_colour_light", "synthetic_blur_jpeg"),
}
MIN_CLASS_IMAGES = 5  # classes with fewer scored target images are left out of the _ge5 figure
ADABN_KS = (4,)  # AdaBN uses no label: k only decides which target images are held out (CPU budget: one k)
ADABN_THREADS = 2
SHIFT_VERSION = "1"  # bump when a shift below changes (it keys the shifted-image folder)
BLOCK = ("<!-- BEGIN GENERATED: adaptation -->", "<!-- END GENERATED -->")


# ---------------------------------------------------------------------------------------------- synthetic shifts
def _hed_stain(rgb: np.ndarray) -> np.ndarray:
    """Another laboratory's stain: haematoxylin up, eosin down, in HED space (scikit-image deconvolution)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    hed[..., 0] *= 1.5
    hed[..., 1] *= 0.5
    hed[..., 2] += 0.02
    return hed2rgb(hed)


def _colour_light(rgb: np.ndarray) -> np.ndarray:
    """Another dermatoscope: hue rotation, less saturation, darker vignetted corners."""
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(rgb)
    hsv[..., 0] = (hsv[..., 0] + 0.05) % 1.0
    hsv[..., 1] *= 0.7
    out = hsv2rgb(hsv)
    h, w = out.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    return out * np.clip(1.0 - 0.35 * r2, 0.3, 1.0)[..., None]


def _contrast(rgb: np.ndarray) -> np.ndarray:
    """Another X-ray processing: gamma and a compressed window (MONAI AdjustContrast)."""
    from monai.transforms import AdjustContrast

    x = torch.as_tensor(rgb.transpose(2, 0, 1), dtype=torch.float32)
    x = AdjustContrast(gamma=1.8)(x)
    return 0.15 + 0.7 * np.asarray(x).transpose(1, 2, 0)


def _blur(rgb: np.ndarray) -> np.ndarray:
    """Defocus (MONAI GaussianSmooth, sigma 1.5 px per 100 px of the short side)."""
    from monai.transforms import GaussianSmooth

    sigma = 1.5 * min(rgb.shape[:2]) / 100.0
    x = torch.as_tensor(rgb.transpose(2, 0, 1), dtype=torch.float32)
    return np.asarray(GaussianSmooth(sigma=(sigma, sigma))(x)).transpose(1, 2, 0)


SHIFT_FNS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "synthetic_stain": _hed_stain,
    "synthetic_colour_light": _colour_light,
    "synthetic_contrast": _contrast,
    "synthetic_blur_jpeg": _blur,  # then half resolution and JPEG quality 20 in _write_shifted
}


def _write_shifted(src: str, shift: str, folder: Path) -> Path:
    raw = Path(src).read_bytes()
    out = folder / f"{hashlib.sha256(raw).hexdigest()[:24]}.png"
    if out.is_file():
        return out
    img = Image.open(io.BytesIO(raw))
    grey = img.mode in ("L", "I;16", "I")
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    y = np.clip(SHIFT_FNS[shift](rgb), 0, 1)
    pil = Image.fromarray((y * 255 + 0.5).astype(np.uint8))
    if grey:
        pil = pil.convert("L")
    if shift == "synthetic_blur_jpeg":
        w, h = pil.size
        pil = pil.resize((max(8, w // 2), max(8, h // 2)), Image.BILINEAR)
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=20)
        pil = Image.open(buf)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    pil.save(tmp)
    tmp.replace(out)
    return out


def shifted_paths(paths: list[str], shift: str, cache_root: Path) -> list[str]:
    folder = cache_root / "adaptation_shifts" / f"{shift}_v{SHIFT_VERSION}"
    return [str(_write_shifted(p, shift, folder)) for p in paths]


# ---------------------------------------------------------------------------------------------- data
class Scored:
    """Features, unedited concept scores, logits and labels of a list of images under one bundle."""

    def __init__(self, bundle: LoadedBundle, engine: PredictionEngine, paths: list[str], labels: list[str]):
        res = engine.extract_features(paths)
        if res.errors:
            raise RuntimeError(f"unreadable images: {list(res.errors.values())[:3]}")
        self.X = np.asarray(res.features, dtype=np.float64)
        with torch.no_grad():
            s = bundle.network.concept_scores_from_features(torch.as_tensor(self.X, dtype=torch.float32), edited=False)
        self.S = s.double().numpy()
        self.y = np.array([bundle.bank.class_index(lab) for lab in labels], dtype=np.int64)
        self.U = None  # unlabelled source scores for the guard (only a bundle's reference set has them)
        self.paths = list(paths)

    def subset(self, idx: np.ndarray) -> "Scored":
        out = object.__new__(Scored)
        out.X, out.S, out.y, out.U = self.X[idx], self.S[idx], self.y[idx], None
        out.paths = [self.paths[i] for i in idx] if self.paths else []
        return out


_INPUTS: dict[str, torch.Tensor] = {}  # decoded encoder inputs, reused across AdaBN draws


def _encoder_inputs(bundle: LoadedBundle, paths: list[str]) -> torch.Tensor:
    pipeline = bundle.preprocessing.pipeline()
    for p in paths:
        if p not in _INPUTS:
            x = pipeline(p)
            _INPUTS[p] = (x.as_tensor() if hasattr(x, "as_tensor") else x).float()
    return torch.stack([_INPUTS[p] for p in paths])


def adabn_scores(bundle: LoadedBundle, site: list[str], scored: list[list[str]], batch: int = 32) -> list[np.ndarray]:
    """AdaBN (Li et al., 2017): the encoder's batch-norm statistics re-estimated on the unlabelled site sample
    (running means/variances replaced by the sample's, affine weights kept), then concept scores of ``scored``."""
    import copy

    enc = copy.deepcopy(bundle.network.encoder).eval()
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("the encoder has no batch-norm layer")
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the whole site sample
        m.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(ADABN_THREADS)  # encoder passes: the one costly method here
    try:
        return _adabn_passes(bundle, enc, site, scored, batch)
    finally:
        torch.set_num_threads(threads)


def _adabn_passes(bundle: LoadedBundle, enc: torch.nn.Module, site: list[str], scored: list[list[str]], batch: int):
    with torch.no_grad():
        for i in range(0, len(site), batch):
            enc(_encoder_inputs(bundle, site[i : i + batch]))
        enc.eval()
        out = []
        for paths in scored:
            feats = torch.cat([enc(_encoder_inputs(bundle, paths[i : i + batch])) for i in range(0, len(paths), batch)])
            out.append(bundle.network.concept_scores_from_features(feats.float(), edited=False).double().numpy())
    return out


def _head(bundle: LoadedBundle) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    head = bundle.head_arrays()
    return head.weight, head.bias, head.neutral, bundle.source_class_means


def draw_support(y: np.ndarray, k: int, seed: int, n_classes: int) -> np.ndarray:
    """``min(k, n_c - 1)`` indices per class (every class keeps one image to be scored), sorted."""
    rng = np.random.default_rng(seed)
    pick = []
    for c in range(n_classes):
        members = np.flatnonzero(y == c)
        m = min(k, len(members) - 1)
        if m > 0:
            pick.append(rng.choice(members, size=m, replace=False))
    return np.sort(np.concatenate(pick)) if pick else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- methods
def run_methods(
    bundle: LoadedBundle,
    sup: Scored,
    tgt: Scored,
    src: Scored,
    ref: Scored,
    site: Scored | None = None,
    adabn: bool = True,
) -> dict[str, dict[str, Any]]:
    """Every method fitted on ``sup`` (and the unlabelled ``site`` sample); scored on ``tgt`` and the source ``src``."""
    W, b, neutral, mus = _head(bundle)
    C = W.shape[0]
    out: dict[str, dict[str, Any]] = {}
    common = [c for c in np.unique(tgt.y) if (tgt.y == c).sum() >= MIN_CLASS_IMAGES]

    def score(name, pred_t, pred_s, seconds, **extra):
        recall = {c: float((pred_t[tgt.y == c] == c).mean()) for c in np.unique(tgt.y)}
        out[name] = {
            "target_balanced_accuracy": balanced_accuracy(tgt.y, pred_t),
            # the other-laboratory measure: one basophil in 277 cells moves the five-class figure by 20 points
            "target_balanced_accuracy_ge5": float(np.mean([recall[c] for c in common])),
            "target_recall": {bundle.class_names[c]: r for c, r in recall.items()},
            "source_accuracy": float((pred_s == src.y).mean()),
            "seconds": seconds,
            **extra,
        }

    t0 = time.perf_counter()
    score("none", (tgt.S @ W.T + b).argmax(1), (src.S @ W.T + b).argmax(1), time.perf_counter() - t0)

    search = ConceptEditSearch(class_names=bundle.class_names, concept_ids=bundle.concept_ids)
    search.fit(sup.S, sup.y, bundle.head_arrays(), ReferenceScores(ref.S, ref.y, ref.U), mus)
    spec = search.spec_
    score(
        "concept_edit",
        search.predict(tgt.S),
        search.predict(src.S),
        search.fit_seconds_,
        n_edited=int(search.mask_.sum() + (search.gain_ != 1.0).sum()),
        n_masked=int(search.mask_.sum()),
        n_amplified=int((search.gain_ != 1.0).sum()),
        guard_reference_drop=float(spec.source_accuracy_before - spec.source_accuracy_after),
        edited=spec.edited_concepts,
    )

    t0 = time.perf_counter()
    t3a = T3A(W, b)
    pt, ps = t3a.predict(tgt.S, sup.S, sup.y), t3a.predict(src.S, sup.S, sup.y)
    score("t3a", pt, ps, time.perf_counter() - t0)

    t0 = time.perf_counter()
    pt, ps = lame_predict(tgt.S @ W.T + b, tgt.X), lame_predict(src.S @ W.T + b, src.X)
    score("lame", pt, ps, time.perf_counter() - t0)

    t0 = time.perf_counter()
    head = refit_head_with_prior(sup.S, sup.y, bundle.prior, n_classes=C)
    if head is None:
        out["refit_head_prior"] = {"skipped": "a class has no support image: the head cannot be re-fitted"}
    else:
        score("refit_head_prior", head.predict(tgt.S), head.predict(src.S), time.perf_counter() - t0)

    t0 = time.perf_counter()
    probe = linear_probe_refit(sup.X, sup.y)
    if probe is None:
        out["linear_probe"] = {"skipped": "fewer than two classes in the support set"}
    else:

        def norm(x):
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

        score("linear_probe", probe.predict(norm(tgt.X)), probe.predict(norm(src.X)), time.perf_counter() - t0)
    if site is not None:
        _site_methods(bundle, sup, tgt, src, ref, site, score)
        if not adabn:
            out["adabn"] = {"skipped": f"label-free; measured at k in {list(ADABN_KS)} only (CPU budget)"}
        elif site.paths:
            t0 = time.perf_counter()
            try:
                St, Ss = adabn_scores(bundle, site.paths, [tgt.paths, src.paths])
            except ValueError as e:
                out["adabn"] = {"skipped": str(e)}
            else:
                score("adabn", (St @ W.T + b).argmax(1), (Ss @ W.T + b).argmax(1), time.perf_counter() - t0)
    return out


def _site_methods(
    bundle: LoadedBundle, sup: Scored, tgt: Scored, src: Scored, ref: Scored, site: Scored, score: Callable[..., None]
) -> None:
    """Calibration only, label shift only, both, and both with the concept edit on top (site sample unlabelled)."""
    head, reference = bundle.head_arrays(), ReferenceScores(ref.S, ref.y, ref.U)
    for name, cal, ls in (
        ("site_calibration", True, False),
        ("site_label_shift", False, True),
        ("site_both", True, True),
    ):
        t0 = time.perf_counter()
        fit = fit_site_adaptation(
            site.S, reference, head, bundle.class_names, bundle.concept_ids, calibrate=cal, label_shift=ls
        )
        adapted = head.with_offset(fit.offset)
        seconds = time.perf_counter() - t0
        score(
            name,
            adapted.logits(fit.calibrate(tgt.S)).argmax(1),
            adapted.logits(fit.calibrate(src.S)).argmax(1),
            seconds,
            n_calibrated=len(fit.calibration_dict().get("concepts", {})),
            label_shift_applied=bool(fit.label_shift is not None and fit.label_shift.applied_),
        )
    t0 = time.perf_counter()
    search = ConceptEditSearch(class_names=bundle.class_names, concept_ids=bundle.concept_ids)
    search.fit(fit.calibrate(sup.S), sup.y, adapted, reference.mapped(fit.calibrate), bundle.source_class_means)
    score(
        "site_both_edit",
        search.predict(fit.calibrate(tgt.S)),
        search.predict(fit.calibrate(src.S)),
        seconds + time.perf_counter() - t0,
        n_edited=int(search.mask_.sum() + (search.gain_ != 1.0).sum()),
    )


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": round(float(a.mean()), 4),
        "sd": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
    }


def evaluate_scenario(bundle, target: Scored, src: Scored, ref: Scored, ks, draws) -> dict[str, Any]:
    C = len(bundle.class_names)
    W, b, _, _ = _head(bundle)
    src_before = float(((src.S @ W.T + b).argmax(1) == src.y).mean())
    result: dict[str, Any] = {
        "n_target": int(len(target.y)),
        "target_class_counts": {c: int((target.y == i).sum()) for i, c in enumerate(bundle.class_names)},
        "n_source_test": int(len(src.y)),
        "n_reference": int(len(ref.y)),
        "source_accuracy_before": round(src_before, 4),
        "by_k": {},
    }
    for k in ks:
        runs = []
        for seed in range(draws):
            idx = draw_support(target.y, k, seed, C)
            rest = np.setdiff1d(np.arange(len(target.y)), idx)
            site, scored = rest[0::2], rest[1::2]  # disjoint: the unlabelled site sample and the scored images
            runs.append(
                run_methods(
                    bundle, target.subset(idx), target.subset(scored), src, ref, target.subset(site), k in ADABN_KS
                )
            )
        per_method = {}
        for m in METHODS:
            done = [r[m] for r in runs if "skipped" not in r[m]]
            if not done:
                per_method[m] = {"skipped": runs[0][m]["skipped"]}
                continue
            entry = {
                "draws": len(done),
                "target_balanced_accuracy": _stats([d["target_balanced_accuracy"] for d in done]),
                "target_balanced_accuracy_ge5": _stats([d["target_balanced_accuracy_ge5"] for d in done]),
                "source_accuracy_after": _stats([d["source_accuracy"] for d in done]),
                "max_source_drop_points": round(100 * max(src_before - d["source_accuracy"] for d in done), 2),
                "target_recall_mean": {
                    c: round(float(np.mean([d["target_recall"][c] for d in done if c in d["target_recall"]])), 4)
                    for c in bundle.class_names
                    if any(c in d["target_recall"] for d in done)
                },
                "seconds": _stats([d["seconds"] for d in done]),
            }
            if len(done) < len(runs):
                entry["skipped_draws"] = len(runs) - len(done)
            if m == "concept_edit":
                entry["n_edited"] = _stats([d["n_edited"] for d in done])
                entry["n_masked"] = _stats([d["n_masked"] for d in done])
                entry["n_amplified"] = _stats([d["n_amplified"] for d in done])
                entry["max_guard_reference_drop_points"] = round(100 * max(d["guard_reference_drop"] for d in done), 2)
                counts: dict[str, int] = {}
                for d in done:
                    for cid in d["edited"]:
                        counts[cid] = counts.get(cid, 0) + 1
                entry["edited_concepts_count"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            per_method[m] = entry
        support_sizes = [len(draw_support(target.y, k, s, C)) for s in range(draws)]
        result["by_k"][str(k)] = {"n_support": int(np.mean(support_sizes)), "methods": per_method}
    return result


# ---------------------------------------------------------------------------------------------- per bundle
def _records(bundle_name: str) -> list[dict]:
    return dataset_records(DATASETS[bundle_name])


def evaluate_bundle(name: str, bundles_dir: Path, cache_dir: Path, ks, draws) -> dict[str, Any]:
    t0 = time.perf_counter()
    bundle = LoadedBundle.load(bundles_dir / name)
    engine = PredictionEngine(bundle, cache_dir=cache_dir, progress=False, batch_size=32)
    recs = _records(name)

    def scored(rs):
        return Scored(bundle, engine, [r["image"] for r in rs], [r["label"] for r in rs])

    by_split = {s: [r for r in recs if r["split"] == s] for s in ("val", "test")}
    if bundle.reference is not None:
        ref = object.__new__(Scored)
        ref.X = bundle.reference.features.astype(np.float64)
        ref.S = bundle.reference.scores.astype(np.float64)
        ref.y = bundle.reference.labels.astype(np.int64)
        ref.U = bundle.reference.unlabelled_scores(bundle.network)
        ref.paths = []
        ref_source = f"bundle models/reference.safetensors ({bundle.reference.split})"
    else:
        ref = scored(by_split["val"])
        ref_source = f"rebuilt from the {DATASETS[name]} val split (this bundle ships no reference set)"
    src = scored(by_split["test"])
    out: dict[str, Any] = {
        "bundle": {"name": bundle.name, "version": bundle.version, "fingerprint": bundle.fingerprint()[:16]},
        "backbone": bundle.info.get("backbone"),
        "reference_set": ref_source,
        "source_test": f"{DATASETS[name]} test split",
        "scenarios": {},
    }
    if name == "blood_cbm":
        root = shared_data_root() / "bccd_wbc_dev"
        import csv

        with open(root / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        target = Scored(bundle, engine, [str(root / r["file"]) for r in rows], [r["label"] for r in rows])
        out["scenarios"]["bccd_wbc_dev"] = evaluate_scenario(bundle, target, src, ref, ks, draws)
    if name == "cxr_cbm":
        pa_val = [r for r in by_split["val"] if r["view_position"] == "PA"]
        pa_test = [r for r in by_split["test"] if r["view_position"] == "PA"]
        ap_test = [r for r in by_split["test"] if r["view_position"] == "AP"]
        sc = evaluate_scenario(bundle, scored(ap_test), scored(pa_test), scored(pa_val), ks, draws)
        sc["note"] = "source = PA: guard reference = PA val images, source accuracy on PA test; target = AP test"
        out["scenarios"]["nih_view_ap"] = sc
    for shift in SHIFTS[name]:
        test = by_split["test"]
        paths = shifted_paths([r["image"] for r in test], shift, cache_dir)
        target = Scored(bundle, engine, paths, [r["label"] for r in test])
        out["scenarios"][shift] = evaluate_scenario(bundle, target, src, ref, ks, draws)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ---------------------------------------------------------------------------------------------- docs table
def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None or "skipped" in entry:  # None: a method this bundle's stored run predates
        return "n/a"
    t = entry["target_balanced_accuracy"]
    return f"{t['mean']:.3f} ± {t['sd']:.3f}"


def docs_block(results: dict[str, Any], source: str) -> str:
    lines = [
        BLOCK[0],
        f"Generated by `benchmarks/adaptation.py` from `{source}` ({results['draws']} support draws per k). "
        "Target balanced accuracy, mean ± sd over draws, on the target images outside the support set; "
        "`drop` is the largest source-accuracy drop of the concept edit over all draws, in points, on the held-out "
        "source test split (the guard itself checks the reference set); `edits` is the mean number of edited "
        "concepts; n/a: the method needs every class in the support set, or (AdaBN, which uses no label) was measured "
        f"at k = {', '.join(map(str, ADABN_KS))} only.",
        "",
        "| bundle | target | k | " + " | ".join(TITLES[m] for m in METHODS) + " | drop | edits |",
        "|---|---|---|" + "---|" * (len(METHODS) + 2),
    ]
    for bname, b in results["bundles"].items():
        if "error" in b:
            lines.append(f"| {bname} | (not run: {b['error']}) |" + "  |" * (len(METHODS) + 3))
            continue
        for sname, sc in b["scenarios"].items():
            for k, row in sc["by_k"].items():
                m = row["methods"]
                ce = m["concept_edit"]
                lines.append(
                    f"| {bname} | {sname} | {k} | "
                    + " | ".join(_cell(m.get(x)) for x in METHODS)
                    + f" | {ce['max_source_drop_points']:.1f} | {ce['n_edited']['mean']:.1f} |"
                )
    lines += _ge5_table(results)
    lines += [
        "",
        "Largest source-accuracy drop over the draws, in points, on the held-out source test split (negative: a gain):",
        "",
        "| bundle | target | k | " + " | ".join(TITLES[m] for m in METHODS[1:]) + " |",
        "|---|---|---|" + "---|" * (len(METHODS) - 1),
    ]
    for bname, b in results["bundles"].items():
        for sname, sc in b.get("scenarios", {}).items():
            for k, row in sc["by_k"].items():
                m = row["methods"]
                cells = [
                    "n/a" if x not in m or "skipped" in m[x] else f"{m[x]['max_source_drop_points']:.1f}"
                    for x in METHODS[1:]
                ]
                lines.append(f"| {bname} | {sname} | {k} | " + " | ".join(cells) + " |")
    times = [
        row["methods"]["concept_edit"]["seconds"]["max"]
        for b in results["bundles"].values()
        if "scenarios" in b
        for sc in b["scenarios"].values()
        for row in sc["by_k"].values()
    ]
    if times:
        lines += ["", f"Slowest edit search (cached features, one core): {max(times):.3f} s."]
    lines.append(BLOCK[1])
    return "\n".join(lines)


def _ge5_table(results: dict[str, Any]) -> list[str]:
    """The same, over the classes with at least ``MIN_CLASS_IMAGES`` scored target images, for the targets where
    a class has fewer (a real site's rare classes)."""
    rows = []
    for bname, b in results["bundles"].items():
        for sname, sc in b.get("scenarios", {}).items():
            counts = sc.get("target_class_counts", {})
            if not counts or min(counts.values()) >= MIN_CLASS_IMAGES:
                continue
            for k, row in sc["by_k"].items():
                m = row["methods"]
                cells = [
                    _cell({"target_balanced_accuracy": m[x]["target_balanced_accuracy_ge5"]})
                    if x in m and "target_balanced_accuracy_ge5" in m[x]
                    else "n/a"
                    for x in METHODS
                ]
                rows.append(f"| {bname} | {sname} | {k} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        f"Balanced accuracy over the classes with at least {MIN_CLASS_IMAGES} target images (mean ± sd over draws):",
        "",
        "| bundle | target | k | " + " | ".join(TITLES[m] for m in METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
        *rows,
    ]


def update_docs(path: Path, block: str) -> bool:
    if not path.is_file():
        return False
    text = path.read_text()
    start, end = text.find(BLOCK[0]), text.find(BLOCK[1])
    if start < 0 or end < start:
        return False
    new = text[:start] + block + text[end + len(BLOCK[1]) :]
    if new != text:
        atomic_write_text(path, new)
    return True


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", nargs="+", default=list(DATASETS))
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--bundles-dir", type=Path, default=REPO / "bundles")
    ap.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: $MEDCBM_CACHE)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "adaptation.json")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "adapting.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if shared_data_root() is None:
        raise SystemExit("../shared/data is absent (set MEDCBM_SHARED_DATA): nothing to benchmark")
    cache = args.cache_dir or default_cache_dir()
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "script": "benchmarks/adaptation.py",
        "ks": args.ks,
        "draws": args.draws,
        "methods": list(METHODS),
        "support_rule": "min(k, n_c - 1) images per class c, drawn with numpy default_rng(draw); the rest is scored",
        "bundles_dir": _rel(args.bundles_dir),
        "bundles": {},
    }
    for name in args.bundles:
        try:
            results["bundles"][name] = evaluate_bundle(name, args.bundles_dir, cache, args.ks, args.draws)
        except Exception as e:  # one bundle that cannot load (e.g. mid-refit) must not hide the others
            results["bundles"][name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out.is_file():  # bundles run earlier keep their entries (one bundle can be re-run alone)
        earlier = json.loads(args.out.read_text()).get("bundles", {})
        names = sorted({*earlier, *results["bundles"]})
        results["bundles"] = {b: results["bundles"].get(b, earlier.get(b)) for b in names}
    atomic_write_json(args.out, results)
    update_docs(args.docs, docs_block(results, _rel(args.out)))
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
