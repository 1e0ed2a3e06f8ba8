"""``study.html`` for ``fedseg study``: the budget, the ranked baselines, a per-site bar chart and
the cross-site heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedseg.common.atomic import atomic_write_bytes  # noqa: E402
from fedseg.server.html_page import fmt, img, page, para, png, table  # noqa: E402


STUDY_HEADERS = {"baseline": "baseline", "mean_dice": "mean Dice (in federation)", "worst_site": "worst site",
                 "worst_dice": "worst-site Dice", "gap": "max-min gap", "heldout_mean_dice": "held-out Dice",
                 "heldout_adapted_dice": "held-out Dice, adapted",
                 "heldout_ensemble_dice": "held-out Dice, last-3-rounds ensemble", "rank": "rank"}


def write_study_report(out_dir: Path, comparison: list[dict[str, Any]], matrix: dict[str, Any] | None,
                       budget: dict[str, Any] | None = None, rising: list[str] | None = None) -> Path:
    """``study.html`` for ``fedseg study``: the budget, the ranked baselines with readable
    headers, a per-site bar chart, the cross-site heatmap, and a warning for baselines that were
    still improving when their budget ran out."""
    cols = list(comparison[0]) if comparison else []
    heads = [STUDY_HEADERS.get(c, c.replace("dice:", "Dice ").replace("mean_", "mean ")
                               .replace("heldout_", "held-out ")) for c in cols]
    steps = (budget or {}).get("steps per site", {})
    body = ["<h1>fedseg study</h1>",
            para("Every baseline had the same optimizer-step budget and seed"
                  + (f": {budget['rounds']} round(s) x {budget['local epochs']} local epoch(s), batch "
                     f"{budget['batch size']}, so {_span(steps.values())} optimizer steps per site "
                     "(local-only and pooled models take the same passes over their cases)"
                     if steps else "")
                  + ". In-federation Dice is each site's validation split; held-out sites never trained. "
                  "Federated models are scored there plain, after adapting their norm layers to the "
                  "site's own unlabeled images (adapted), and as the average of their last three "
                  "rounds' models (run-config heldout-ensemble = 3: the held-out site averages the "
                  "class probabilities; fedseg predict --last-rounds builds such ensembles at a new "
                  "hospital)."),
            "<h2>Baselines, ranked by mean in-federation Dice</h2>",
            table(heads, [[row[c] for c in cols] for row in comparison])]
    if rising:
        body.append(para(f"Warning: {', '.join(rising)} still improved in the last round: the budget is "
                          "too short for a fair ranking; give the study more rounds or local epochs."))
    site_cols = [c for c in cols if c.startswith("dice:")]
    if site_cols:
        bars = _site_bars(comparison, site_cols)
        atomic_write_bytes(out_dir / "plots" / "per_site.png", bars)
        body += ["<h2>Dice at every site, per baseline</h2>", img(bars, "per-site Dice per baseline")]
    if matrix:
        heat = _heatmap(matrix)
        atomic_write_bytes(out_dir / "plots" / "cross_site.png", heat)
        body += ["<h2>Cross-site matrix (local-only models)</h2>",
                 para("Row: the site a model was trained at, alone. Column: the site it was scored at."),
                 img(heat, "cross-site matrix")]
    path = out_dir / "study.html"
    atomic_write_bytes(path, page("fedseg study", body).encode())
    return path


def _span(values: Any) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _site_bars(comparison: list[dict[str, Any]], site_cols: list[str]) -> bytes:
    sites = [c.split(":", 1)[1] for c in site_cols]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(sites), 3.2), dpi=100)
    width = 0.8 / max(len(comparison), 1)
    for i, row in enumerate(comparison):
        values = [row[c] if row[c] is not None else 0.0 for c in site_cols]
        ax.bar([j + i * width for j in range(len(sites))], values, width, label=row["baseline"])
    ax.set_xticks([j + width * (len(comparison) - 1) / 2 for j in range(len(sites))], sites,
                  rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=min(len(comparison), 5))
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def _heatmap(matrix: dict[str, Any]) -> bytes:
    rows, cols, values = matrix["trained_at"], matrix["scored_at"], matrix["dice"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.6 * len(rows)), dpi=100)
    grid = [[v if v is not None else float("nan") for v in row] for row in values]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, fmt(v, 2), ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.05, label="Dice")
    ax.set_xlabel("scored at")
    ax.set_ylabel("trained at")
    ax.set_title("local-only model trained at (row), scored at (column)", fontsize=8)
    return png(fig)
