# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The audit report: one self-contained HTML file (no external resources; images are base64 PNGs).

Order: the overview first (what the model relies on, where it disagrees with the prior, which concepts it
cannot ground, checks against concept labels, explanation size, faithfulness), then one card per image
(image, concept maps, contribution chart, what-if), then a table of every image. Large audits show the
first ``max_cards`` cards and list the rest in the table only.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["ImageCard", "render_report", "write_report", "png_base64"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f6f8;color:#1d2733;
 font-size:15px;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:20px;margin:28px 0 10px;\
border-bottom:2px solid #d5dde5;padding-bottom:4px}
h3{font-size:16px;margin:0 0 8px}
.sub{color:#5a6978;margin:0 0 16px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:14px}
.box{background:#fff;border:1px solid #d5dde5;border-radius:8px;padding:14px 16px}
.kpi{font-size:24px;font-weight:600} .kpil{color:#5a6978;font-size:13px}
.warn{background:#fff4e5;border:1px solid #f0b36b;border-radius:8px;padding:10px 14px;margin:10px 0}
.ok{color:#1f7a3a} .bad{color:#b3261e} .muted{color:#5a6978}
table{border-collapse:collapse;width:100%;font-size:14px;background:#fff}
th,td{border-bottom:1px solid #e3e8ee;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.card{background:#fff;border:1px solid #d5dde5;border-radius:8px;padding:14px 16px;margin:14px 0;break-inside:avoid}
.cardhead{display:flex;justify-content:space-between;flex-wrap:wrap;gap:8px;margin-bottom:8px}
.pred{font-size:18px;font-weight:600}
.tag{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;background:#eef2f6;margin-left:6px}
.tag.err{background:#fde7e7;color:#b3261e} .tag.right{background:#e6f4ea;color:#1f7a3a}
.tag.wrong{background:#fde7e7;color:#b3261e}
.maps{display:flex;gap:10px;flex-wrap:wrap}
.maps figure{margin:0;text-align:center;font-size:13px;width:170px}
.maps img{width:170px;height:170px;image-rendering:auto;border-radius:4px;border:1px solid #d5dde5}
.cardbody{display:grid;grid-template-columns:minmax(360px,1fr) minmax(300px,1fr);gap:14px}
img.plot{max-width:100%}
details summary{cursor:pointer;color:#1d5fa8}
code{background:#eef2f6;padding:0 4px;border-radius:3px}
"""


@dataclass
class ImageCard:
    """What one per-image card shows.

    Attributes:
        image: the image as the user gave it (never a DICOM header value).
        prediction, probability: the predicted class and its probability.
        label: the given class label, if any.
        picture: (H, W, 3) float image in [0, 1] as the model saw it.
        maps: ``(title, score text, overlay (H, W, 3))`` per top concept.
        contributions: concept label -> contribution to the predicted class.
        bias: the predicted class's bias (logit at neutral concepts).
        what_if: rows with ``change``, ``prediction``, ``probability``, ``p_original``.
        shift_score: site-shift score, if the bundle has one; ``shift_flag`` whether it is flagged.
        n_effective: concepts carrying 95% of the contribution.
    """

    image: str
    prediction: str
    probability: float
    picture: np.ndarray | None = None
    label: str | None = None
    maps: list[tuple[str, str, np.ndarray]] = field(default_factory=list)
    contributions: dict[str, float] = field(default_factory=dict)
    bias: float = 0.0
    what_if: list[dict[str, Any]] = field(default_factory=list)
    shift_score: float | None = None
    shift_flag: bool | None = None
    n_effective: int | None = None


def png_base64(fig: Any) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _array_png(arr: np.ndarray) -> str:
    from PIL import Image

    a = np.clip(np.asarray(arr, dtype=np.float32), 0, 1)
    img = Image.fromarray((a * 255).round().astype(np.uint8))
    if max(img.size) < 170:  # small model inputs: enlarge for the eye (the data stays as the model saw it)
        f = int(np.ceil(170 / max(img.size)))
        img = img.resize((img.size[0] * f, img.size[1] * f), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    try:
        return f"{float(x):.{nd}f}"
    except (TypeError, ValueError):
        return _e(x)


# ---------------------------------------------------------------------------------------------- plots
def _bar_chart(
    values: dict[str, float], title: str, xlabel: str, signed: bool = True, height: float | None = None
) -> str:
    plt = _plt()
    items = list(values.items())[::-1]
    n = max(len(items), 1)
    fig, ax = plt.subplots(figsize=(5.6, height or (0.5 + 0.32 * n)))
    names = [k for k, _ in items]
    vals = [v for _, v in items]
    colors = ["#2f7ebf" if v >= 0 else "#d0533c" for v in vals] if signed else ["#2f7ebf"] * len(vals)
    ax.barh(range(len(vals)), vals, color=colors)
    ax.set_yticks(range(len(vals)))
    ax.set_yticklabels(names, fontsize=9)
    ax.axvline(0, color="#444", lw=0.8)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return png_base64(fig)


def _deletion_plot(d: dict[str, Any]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    x = d["fraction_removed"]
    ax.plot(
        x, d["contribution_order"], color="#d0533c", lw=2, label=f"by contribution (area {_f(d['auc_contribution'])})"
    )
    ax.plot(x, d["random_order"], color="#777", lw=2, ls="--", label=f"random order (area {_f(d['auc_random'])})")
    ax.set_xlabel("fraction of concepts removed (set to neutral)", fontsize=9)
    ax.set_ylabel("probability of predicted class", fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, frameon=False)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return png_base64(fig)


# ---------------------------------------------------------------------------------------------- sections
def _overview(audit: dict[str, Any], title: str, meta: dict[str, Any]) -> list[str]:
    """Everything above the image cards: the headline numbers and sections 1 to 5."""
    out = _headline(audit, title, meta)
    out += _reliance(audit)
    out += _prior_disagreement(audit.get("prior_agreement", {}))
    out += _grounding(audit, meta)
    out += _label_checks(audit)
    out += _location(audit.get("concept_location"))
    out += _size_and_faithfulness(audit.get("effective_concepts", {}), audit.get("deletion"))
    return out


def _headline(audit: dict[str, Any], title: str, meta: dict[str, Any]) -> list[str]:
    """Title, what the page checks, the key numbers and the audit's warnings."""
    out = [f"<h1>{_e(title)}</h1>"]
    out.append(
        "<p class='sub'>Audit of a concept bottleneck model: the model scores human-readable concepts and "
        "adds up their contributions to decide. This page checks which concepts it relies on, whether it uses "
        "them the way medical knowledge says, and whether it can see them.</p>"
    )
    n_ok, n_err = meta.get("n_ok", 0), meta.get("n_errors", 0)
    pa = audit.get("prior_agreement", {})
    eff = audit.get("effective_concepts", {})
    kpis = [
        (str(n_ok), "images audited" + (f" ({n_err} unreadable)" if n_err else "")),
        *([(_f(meta["accuracy"], 2), "accuracy on the given labels")] if meta.get("accuracy") is not None else []),
        (_f(pa.get("sign_agreement"), 2), "agreement with the medical prior"),
        (str(pa.get("n_contradictions", "–")), "weights contradicting the prior"),
        (_f((eff.get("n_mass") or {}).get("median"), 0), "concepts per decision (median, 95%)"),
    ]
    out.append("<div class='grid'>")
    for v, label in kpis:
        out.append(f"<div class='box'><div class='kpi'>{_e(v)}</div><div class='kpil'>{_e(label)}</div></div>")
    out.append("</div>")
    for w in meta.get("warnings", []):
        out.append(f"<div class='warn'>&#9888; {_e(w)}</div>")
    return out


def _reliance(audit: dict[str, Any]) -> list[str]:
    """Section 1: the concepts that move decisions most, and whether their weights fit the prior and the labels."""
    gi = audit.get("global_importance", {}).get("concepts", [])
    out = ["<h2>1. What the model relies on</h2>"]
    if not gi:
        return out
    key = audit["global_importance"].get("ranked_by", "weight_spread")
    top = gi[:15]
    vals = {d["concept"]: float(d.get(key) or 0.0) for d in top}
    label = "mean |contribution| to the predicted class" if key == "mean_abs_contribution" else "spread of head weights"
    out.append("<div class='cardbody'><div>")
    out.append(
        "<img class='plot' alt='global importance' src='"
        f"{_bar_chart(vals, 'Concepts that move decisions most', label, signed=False)}'>"
    )
    out.append(
        "</div><div><table><tr><th>concept</th><th>pushes towards</th><th>fits prior</th><th>fits labels</th></tr>"
    )
    for d in top:
        cp = d.get("cgim_prior")
        cl = d.get("cgim_labels")
        cls_p = "ok" if (cp or 0) > 0.3 else ("bad" if cp is not None and cp < 0 else "muted")
        cls_l = "ok" if (cl or 0) > 0.3 else ("bad" if cl is not None and cl < 0 else "muted")
        out.append(
            f"<tr><td>{_e(d['concept'])}</td><td>{_e(d.get('strongest_class', ''))}</td>"
            f"<td class='num {cls_p}'>{_f(cp, 2)}</td><td class='num {cls_l}'>{_f(cl, 2)}</td></tr>"
        )
    out.append(
        "</table><p class='muted'>fits prior / fits labels: CGIM, the correlation (−1 to 1) over classes "
        "between the concept's weights and the prior or the label frequency; – = not known.</p></div></div>"
    )
    return out


def _prior_disagreement(pa: dict[str, Any]) -> list[str]:
    """Section 2: sign agreement with the prior and the learned weights that contradict it (30 at most)."""
    out = ["<h2>2. Where the model disagrees with medical knowledge</h2>"]
    if not pa:
        return out
    out.append(
        f"<p>The prior states {pa.get('n_prior_pairs')} concept–class expectations; "
        "the model's weights agree in sign "
        f"with {pa.get('n_agree')} ({_f(pa.get('sign_agreement'), 2)}), cosine {_f(pa.get('cosine'), 2)}.</p>"
    )
    contra = pa.get("contradictions", [])
    if not contra:
        out.append("<p class='ok'>No learned weight contradicts the prior.</p>")
        return out
    out.append("<table><tr><th>class</th><th>concept</th><th>prior says</th><th>model weight</th></tr>")
    for c in contra[:30]:
        says = "present" if c["prior"] > 0 else "absent"
        out.append(
            f"<tr><td>{_e(c['class'])}</td><td>{_e(c['concept'])}</td><td>{says}</td>"
            f"<td class='num bad'>{_f(c['weight'], 3)}</td></tr>"
        )
    out.append("</table>")
    if len(contra) > 30:
        out.append(f"<p class='muted'>… and {len(contra) - 30} more in model_audit.json.</p>")
    return out


def _grounding(audit: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Section 3: concepts dropped at fitting time, and those no better than chance on the labelled images here."""
    out = ["<h2>3. Concepts the model cannot ground</h2>"]
    dropped = meta.get("dropped_concepts") or {}
    ca = (audit.get("concept_auroc") or {}).get("concepts", {})
    weak = {k: v for k, v in ca.items() if v.get("auroc") is not None and not v.get("better_than_chance")}
    if dropped:
        out.append("<p>Dropped at fitting time (no better than chance on validation data, or no labels):</p><ul>")
        for cid, why in dropped.items():
            out.append(f"<li><b>{_e(cid)}</b>: {_e(why)}</li>")
        out.append("</ul>")
    if weak:
        out.append("<p>On the labelled images audited here, these concept scores are not better than chance:</p><ul>")
        for cid, v in weak.items():
            out.append(f"<li><b>{_e(cid)}</b>: AUROC {_f(v['auroc'])} [{_f(v['ci_low'])}, {_f(v['ci_high'])}]</li>")
        out.append("</ul>")
    if not dropped and not weak:
        out.append(
            "<p class='ok'>Every concept the model uses was grounded better than chance when it was fitted"
            + (" and on the labelled images here." if ca else ".")
            + "</p>"
        )
    return out


def _label_checks(audit: dict[str, Any]) -> list[str]:
    """Section 4: per-concept AUROC and the concept existence check, when the input gave concept labels."""
    out = ["<h2>4. Checks against concept labels</h2>"]
    ca = (audit.get("concept_auroc") or {}).get("concepts", {})
    if not ca:
        out.append(
            "<p class='muted'>No concept labels were given (add <code>concept_&lt;id&gt;</code> columns with 1/0 "
            "to the input CSV to check them).</p>"
        )
        return out
    out += _auroc_table(ca)
    out.append("</table></div><div>")
    out += _existence_table(audit.get("concept_existence"))
    out.append("</div></div>")
    return out


def _auroc_table(ca: dict[str, Any]) -> list[str]:
    """The rows of the concept AUROC table, best first (the closing tags are the caller's)."""
    out = [
        "<div class='cardbody'><div><h3>Can the model see each concept? (AUROC, 95% CI)</h3>"
        "<table><tr><th>concept</th><th>n +/−</th><th>AUROC</th><th>95% CI</th><th>&gt; chance</th></tr>"
    ]
    for cid, v in sorted(ca.items(), key=lambda kv: -(kv[1].get("auroc") or 0)):
        if v.get("auroc") is None:
            out.append(
                f"<tr><td>{_e(cid)}</td><td>{v['n_positive']}/{v['n_negative']}</td><td colspan=3 class='muted'>"
                f"{_e(v.get('reason', ''))}</td></tr>"
            )
            continue
        good = "ok" if v["better_than_chance"] else "bad"
        out.append(
            f"<tr><td>{_e(cid)}</td><td>{v['n_positive']}/{v['n_negative']}</td>"
            f"<td class='num'>{_f(v['auroc'])}</td>"
            f"<td class='num'>{_f(v['ci_low'])}–{_f(v['ci_high'])}</td>"
            f"<td class='{good}'>{_f(v['better_than_chance'])}</td></tr>"
        )
    return out


def _existence_table(cem: dict[str, Any] | None) -> list[str]:
    """The concept existence (CEM) table at top-1, 3 and 5; nothing without it."""
    if not cem:
        return []
    out = [
        "<h3>Are the concepts behind each decision really there? (CEM)</h3><table>"
        "<tr><th>top-l</th><th>claims confirmed</th><th>annotated present</th><th>images</th></tr>"
    ]
    for top_l in (1, 3, 5):
        if f"cem_at_{top_l}" in cem:
            out.append(
                f"<tr><td>{top_l}</td><td class='num'>{_f(cem[f'cem_at_{top_l}'], 2)}</td>"
                f"<td class='num'>{_f(cem[f'present_at_{top_l}'], 2)}</td>"
                f"<td class='num'>{cem[f'n_images_at_{top_l}']}</td></tr>"
            )
    out.append(
        "</table><p class='muted'>A concept that counts because it is <i>absent</i> (shown as "
        "“not …”) is confirmed by a label saying absent.</p>"
    )
    return out


def _size_and_faithfulness(eff: dict[str, Any], dl: dict[str, Any] | None) -> list[str]:
    """Section 5: how many concepts carry each decision, and the deletion test with its curves."""
    out = ["<h2>5. Explanation size and faithfulness</h2><div class='cardbody'><div>"]
    if eff:
        nm = eff.get("n_mass") or {}
        out.append(
            f"<p>Concepts carrying 95% of each decision: median {_f(nm.get('median'), 0)}, max {_f(nm.get('max'), 0)} "
            f"(readable limit {eff.get('limit')}). Effective number (exp-entropy): mean "
            f"{_f((eff.get('exp_entropy') or {}).get('mean'), 1)}.</p>"
        )
        if eff.get("warning"):
            out.append(f"<div class='warn'>&#9888; {_e(eff['warning'])}</div>")
    if dl and dl.get("n"):
        gap = dl.get("auc_gap") or 0.0
        verdict = (
            "faithful: removing the top concepts lowers the probability faster than removing random ones"
            if gap > 0
            else "not faithful: removing the top concepts does not lower the probability faster than random ones"
        )
        out.append(f"<p class='{'ok' if gap > 0 else 'bad'}'>Deletion test — {verdict} (area gap {_f(gap)}).</p>")
        out.append("</div><div>")
        out.append(f"<img class='plot' alt='deletion curves' src='{_deletion_plot(dl)}'>")
    out.append("</div></div>")
    return out


def _location(loc: dict[str, Any] | None) -> list[str]:
    """The concept-location table: CLM / coverage / precision next to the baselines, and per concept."""
    if not loc:
        return []
    if "clm_at_1" not in loc:
        return [f"<p class='muted'>Concept location: {_e(loc.get('note', 'not computed'))}</p>"]
    boxes = loc.get("boxes") or {}
    used = boxes.get("fully_visible", 0) + boxes.get("partly_visible_used", 0)
    cut = sum(v for k, v in boxes.items() if k.startswith("excluded") or k == "outside_image")
    out = [
        "<h3>Where the concepts come from (boxes)</h3>",
        f"<p>{loc.get('n')} maps (top concepts of {loc.get('n_images_used')} images) checked against {used} annotated "
        f"boxes; {cut} boxes were not counted because the model's crop does not show at least "
        f"{_f(loc.get('min_visible'), 2)} of them. <b>Coverage</b>: share of the box among the map's top pixels "
        "(a random map gets α/12); <b>CLM</b>: the top pixels touch the box at all; <b>precision</b>: share of the "
        "top pixels inside the box.</p>",
        "<table><tr><th>α (top α/12 of the image)</th><th>coverage</th><th>CLM</th><th>precision</th>"
        "<th>random map</th><th>centre map</th><th>other image's map</th></tr>",
    ]
    base = loc.get("baselines") or {}
    for a in (1, 3, 6):
        cells = "".join(
            f"<td class='num'>{_f((base.get(b) or {}).get(f'coverage_at_{a}'), 2)}</td>"
            for b in ("random_smooth", "centre", "shuffled")
        )
        out.append(
            f"<tr><td>{a}</td><td class='num'><b>{_f(loc.get(f'coverage_at_{a}'), 2)}</b></td>"
            f"<td class='num'>{_f(loc.get(f'clm_at_{a}'), 2)}</td><td class='num'>{_f(loc.get(f'precision_at_{a}'), 2)}"
            f"</td>{cells}</tr>"
        )
    out.append("</table><p class='muted'>Baseline columns are coverage.</p>")
    per = loc.get("by_concept") or {}
    if per:
        out.append(
            "<details><summary>Per concept</summary><table><tr><th>concept</th><th>maps</th>"
            "<th>coverage@1</th><th>CLM@1</th></tr>"
        )
        for cid, v in sorted(per.items(), key=lambda kv: -(kv[1].get("coverage_at_1") or 0.0)):
            out.append(
                f"<tr><td>{_e(cid)}</td><td class='num'>{v.get('n')}</td>"
                f"<td class='num'>{_f(v.get('coverage_at_1'), 2)}</td>"
                f"<td class='num'>{_f(v.get('clm_at_1'), 2)}</td></tr>"
            )
        out.append("</table></details>")
    return out


def _card(card: ImageCard) -> list[str]:
    out = ["<div class='card'>", "<div class='cardhead'>"]
    tag = ""
    if card.label:
        right = card.label.lower() == card.prediction.lower()
        tag = f"<span class='tag {'right' if right else 'wrong'}'>label: {_e(card.label)}</span>"
    shift = ""
    if card.shift_score is not None:
        shift = (
            f"<span class='tag {'err' if card.shift_flag else ''}'>site shift {_f(card.shift_score, 2)}"
            + (" (flagged)" if card.shift_flag else "")
            + "</span>"
        )
    out.append(
        f"<div><div class='pred'>{_e(card.prediction)} "
        f"<span class='muted'>{card.probability:.0%}</span>{tag}{shift}</div>"
        f"<div class='muted'>{_e(card.image)}</div></div>"
    )
    if card.n_effective is not None:
        out.append(f"<div class='muted'>{card.n_effective} concepts carry 95% of this decision</div>")
    out.append("</div><div class='maps'>")
    if card.picture is not None:
        out.append(
            f"<figure><img alt='image' src='{_array_png(card.picture)}'>"
            "<figcaption>image (model input)</figcaption></figure>"
        )
    for title, score, ov in card.maps:
        out.append(
            f"<figure><img alt='{_e(title)}' src='{_array_png(ov)}'><figcaption><b>{_e(title)}</b><br>{_e(score)}"
            "</figcaption></figure>"
        )
    out.append("</div><div class='cardbody'><div>")
    if card.contributions:
        items = sorted(card.contributions.items(), key=lambda kv: -abs(kv[1]))[:10]
        chart = _bar_chart(
            dict(items),
            f"Why {card.prediction}? (bias {card.bias:+.2f})",
            "contribution to the logit (blue: for, red: against)",
        )
        out.append(f"<img class='plot' alt='contributions' src='{chart}'>")
    out.append("</div><div>")
    if card.what_if:
        out.append(
            "<h3>What if…</h3><table><tr><th>change</th><th>prediction</th><th>p</th>"
            f"<th>p({_e(card.prediction)})</th></tr>"
        )
        for w in card.what_if:
            changed = w["prediction"] != card.prediction
            out.append(
                f"<tr><td>{_e(w['change'])}</td><td class='{'bad' if changed else ''}'>{_e(w['prediction'])}</td>"
                f"<td class='num'>{_f(w['probability'], 2)}</td><td class='num'>{_f(w['p_original'], 2)}</td></tr>"
            )
        out.append("</table>")
    out.append("</div></div></div>")
    return out


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["<table><tr><th>#</th><th>image</th><th>prediction</th><th>p</th><th>label</th><th>top concepts</th></tr>"]
    for i, r in enumerate(rows, 1):
        if r.get("status") == "error":
            out.append(
                f"<tr><td>{i}</td><td>{_e(r['image'])}</td><td colspan=4><span class='tag err'>error</span> "
                f"{_e(r.get('error', ''))}</td></tr>"
            )
            continue
        out.append(
            f"<tr><td>{i}</td><td>{_e(r['image'])}</td><td>{_e(r['prediction'])}</td>"
            f"<td class='num'>{_f(r['probability'], 2)}</td><td>{_e(r.get('label') or '')}</td>"
            f"<td>{_e(', '.join(r.get('top', [])))}</td></tr>"
        )
    out.append("</table>")
    return out


def render_report(
    audit: dict[str, Any],
    cards: Sequence[ImageCard],
    rows: Sequence[dict[str, Any]],
    title: str = "Concept audit",
    meta: dict[str, Any] | None = None,
) -> str:
    """The report as an HTML string.

    Args:
        audit: the content of ``model_audit.json``.
        cards: per-image cards (the first images of the audit).
        rows: one summary row per input (``image``, ``status``, ``prediction``, ``probability``, ``label``,
            ``top``: concept labels; or ``error``), shown as the full table.
        title: page title.
        meta: ``n_ok``, ``n_errors``, ``accuracy``, ``warnings`` (list), ``dropped_concepts`` (id -> reason),
            ``model`` (dict shown at the end), ``map_method``.
    """
    meta = dict(meta or {})
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
    ]
    parts += _overview(audit, title, meta)
    parts.append(f"<h2>6. Images ({len(cards)} shown of {len(rows)})</h2>")
    method = meta.get("map_method")
    if method:
        parts.append(
            "<p class='muted'>Concept maps: red = where the concept's score comes from, blue = where it is lowest "
            f"(method <code>{_e(method)}</code>; scaled per map, so compare places, not colours across maps). "
            "“absent” / “not X”: the concept counts for the prediction because its score is below its usual "
            "(source-site average) value.</p>"
        )
    for c in cards:
        parts += _card(c)
    if len(rows) > len(cards):
        parts.append(
            f"<p class='muted'>{len(rows) - len(cards)} more images are listed in the table below and in "
            "explanations.jsonl.</p>"
        )
    parts.append("<h2>7. All images</h2><details open><summary>table of every input</summary>")
    parts += _table(rows)
    parts.append("</details>")
    model = meta.get("model") or {}
    if model:
        parts.append("<h2>Model</h2><table>")
        for k, v in model.items():
            parts.append(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>")
        parts.append("</table>")
    parts.append(
        "<p class='muted'>Definitions of every number: docs/auditing.md. Machine-readable results: "
        "model_audit.json and explanations.jsonl next to this file.</p>"
    )
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, *args: Any, **kwargs: Any) -> Path:
    """:func:`render_report` written atomically to ``path``."""
    from ..io.atomic import atomic_write_text

    return atomic_write_text(path, render_report(*args, **kwargs))
