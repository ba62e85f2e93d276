# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""How long the unlabelled-site fit takes on cached features (issue goal: under 5 s for 500 site images).

    python benchmarks/site_fit_speed.py [--bundle blood_cbm cxr_cbm derm_cbm] [--n 500] [--repeats 3] [--threads 1]
        [--out benchmarks/results/site_fit_speed.json]

The site sample is ``--n`` of the bundle's own unlabelled source training features (``reference.safetensors``),
turned into concept scores and given a fixed, seeded per-concept shift and scale, so that the calibration has
something to fit; the fit is :func:`medcbm.adaptation.fit_site_adaptation` with calibration and label shift, as
``adapt.yaml --site_images`` runs it after the images are encoded. Prints JSON (median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from medcbm.adaptation import ReferenceScores, fit_site_adaptation  # noqa: E402
from medcbm.bundle import LoadedBundle  # noqa: E402
from medcbm.io.atomic import atomic_write_json  # noqa: E402


def site_sample(bundle: LoadedBundle, n: int, seed: int = 0) -> np.ndarray:
    """``(n, K)`` shifted concept scores of ``n`` source training features (drawn with replacement if fewer)."""
    ref = bundle.reference
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ref.train_features), size=n, replace=len(ref.train_features) < n)
    with torch.no_grad():
        f = torch.as_tensor(ref.train_features[idx], dtype=torch.float32)
        s = bundle.network.concept_scores_from_features(f, edited=False).double().numpy()
    K = s.shape[1]
    return np.clip(s * rng.uniform(0.7, 1.3, K) + rng.normal(0, 0.1, K), 0.0, 1.0)


def measure(name: str, n: int, repeats: int) -> dict:
    bundle = LoadedBundle.load(REPO / "bundles" / name)
    if bundle.reference is None:
        return {"skipped": "the bundle ships no reference set"}
    S = site_sample(bundle, n)
    head, reference = bundle.head_arrays(), ReferenceScores.of_bundle(bundle)
    times, fit = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        fit = fit_site_adaptation(S, reference, head, bundle.class_names, bundle.concept_ids)
        times.append(time.perf_counter() - t0)
    return {
        "n_site": n,
        "n_reference": int(len(reference.labels)),
        "n_unlabelled_reference": int(len(reference.unlabelled)),
        "n_concepts": len(bundle.concept_ids),
        "seconds_median": round(statistics.median(times), 3),
        "seconds_max": round(max(times), 3),
        "rounds": fit.rounds,
        "n_calibrated": len(fit.calibration_dict().get("concepts", {})),
        "label_shift_applied": bool(fit.label_shift is not None and fit.label_shift.applied_),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", nargs="+", default=["blood_cbm", "cxr_cbm", "derm_cbm"])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {
        "script": "benchmarks/site_fit_speed.py",
        "threads": args.threads,
        "goal_seconds": 5.0,
        "bundles": {b: measure(b, args.n, args.repeats) for b in args.bundle},
    }
    if args.out:
        atomic_write_json(args.out, out)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
