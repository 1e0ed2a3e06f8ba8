"""Human-readable views of a run folder: the printed per-site table and report.html + plots/*.png."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedseg.common.atomic import atomic_write_bytes  # noqa: E402
from fedseg.common.records import NUM_EXAMPLES  # noqa: E402
from fedseg.server.run_folder import RunFolder  # noqa: E402
from fedseg.server.summary import INSTANCE_METRICS  # noqa: E402

log = logging.getLogger(__name__)


def site_table(run_dir: str | Path) -> str:
    """Plain-text table: validation Dice per site per round, final Dice and HD95, mean and worst."""
    folder = RunFolder(run_dir)
    rounds = folder.read_rounds()
    summary = json.loads((folder.dir / "summary.json").read_text())
    info = folder.read_run_info()
    sites = info["training_sites"] + info["heldout_sites"]
    epsilon = summary.get("record_level_dp", {}).get("epsilon", {})
    instance = [m for m in INSTANCE_METRICS if rounds and any(m in e for e in rounds[-1]["eval"].values())]
    head = ["site"] + [f"r{r['round']}" for r in rounds] + ["final dice", f"final hd95 ({distance_unit(info)})"]
    head += [f"final {m}" for m in instance] + (["epsilon"] if epsilon else [])
    rows = []
    for site in sites:
        per_round = [_fmt(r["eval"].get(site, {}).get("dice")) for r in rounds]
        final = rounds[-1]["eval"].get(site, {}) if rounds else {}
        tag = " (held-out)" if site in info["heldout_sites"] else ""
        row = [site + tag] + per_round + [_fmt(final.get("dice")), _fmt(final.get("hd95"), 2)]
        row += [_fmt(final.get(m)) for m in instance]
        rows.append(row + ([_fmt(epsilon.get(site), 2)] if epsilon else []))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head] + rows]
    fed = summary.get("in_federation", {})
    lines.append(f"mean dice {_fmt(fed.get('mean'))} | worst site {fed.get('worst_site')} "
                 f"({_fmt(fed.get('worst_dice'))}) | gap {_fmt(fed.get('gap'))}")
    if start := summary.get("pretrained_alone", {}).get("in_federation"):
        lines.append(f"the pretrained model alone (before round 1): mean dice {_fmt(start.get('mean'))}")
    if epsilon:
        delta = summary["record_level_dp"]["delta"]
        lines.append(f"record-level DP: epsilon per site at delta={delta:g} (Opacus RDP accountant)")
    if "client_level_dp" in summary:
        spent = summary["client_level_dp"]
        lines.append(f"client-level DP: epsilon {spent['epsilon']:.3f} at delta={spent['delta']:g} "
                     "(Flower RDP accountant, server-side noise)")
    return "\n".join(lines)


UNIT_WORDS = {"mm": "millimetres (NIfTI voxel spacing)", "px": "pixels",
              "mm or px": "millimetres for NIfTI sites and pixels for PNG/JPEG sites"}


def label_names(info: dict[str, Any]) -> dict[str, str]:
    """Label value (as in ``dice-<value>``) -> the name the sites' dataset.json gives it."""
    reported = next((s.get("label-names") for s in info.get("sites", {}).values() if s.get("label-names")), [])
    return {str(value): name for value, name in enumerate(reported)}


def distance_unit(info: dict[str, Any]) -> str:
    """HD95's unit as the sites report it: mm for NIfTI spacing, px for PNG/JPEG."""
    units = {s.get("distance-unit") for s in info.get("sites", {}).values()} - {None}
    return units.pop() if len(units) == 1 else "mm or px"


def write_gallery(run_dir: str | Path, items: list[dict[str, Any]]) -> None:
    """Keep a gallery (simulation only, see ``simulations.gallery``) in the run folder, so that
    every later ``write_report`` shows it: ``plots/gallery/NN.png`` plus ``gallery.json``.

    Args:
        run_dir: the run folder.
        items: dicts with ``title``, ``caption`` and ``png`` bytes.
    """
    folder = Path(run_dir) / "plots" / "gallery"
    index = []
    for i, item in enumerate(items):
        name = f"{i:02d}.png"
        atomic_write_bytes(folder / name, item["png"])
        index.append({"title": item["title"], "caption": item["caption"], "file": name})
    atomic_write_bytes(folder / "gallery.json", json.dumps(index, indent=1).encode())


def _read_gallery(run_dir: Path) -> list[dict[str, Any]]:
    folder = run_dir / "plots" / "gallery"
    if not (folder / "gallery.json").is_file():
        return []
    return [{**item, "png": (folder / item["file"]).read_bytes()}
            for item in json.loads((folder / "gallery.json").read_text())]


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` (self-contained, plots and the run's gallery embedded) and
    ``plots/*.png`` for a run."""
    folder = RunFolder(run_dir)
    gallery = _read_gallery(folder.dir)
    info, rounds = folder.read_run_info(), folder.read_rounds()
    summary = json.loads((folder.dir / "summary.json").read_text())
    training, heldout = info["training_sites"], info["heldout_sites"]
    plots = folder.dir / "plots"
    start = {site: scores["dice"] for site, scores in info.get("pretrained_alone", {}).get("sites", {}).items()
             if scores.get("dice") is not None}  # round 0: the pretrained model alone
    figures = {
        "dice.png": _curves(rounds, training + heldout, "eval", "dice",
                            "validation Dice (round 0: the pretrained model alone)" if start
                            else "validation Dice", start),
        "loss.png": _curves(rounds, training, "train", "train-loss", "training loss"),
    }
    for metric in INSTANCE_METRICS:
        if any(metric in e for r in rounds for e in r["eval"].values()):
            figures[f"{metric}.png"] = _curves(rounds, training + heldout, "eval", metric,
                                               f"validation {metric.upper()}")
    if summary.get("record_level_dp"):
        figures["epsilon.png"] = _curves(rounds, training, "train", "epsilon", "epsilon (record-level)")
    for name, png in figures.items():
        atomic_write_bytes(plots / name, png)

    cfg = info["config"]
    mirrored = ("" if "flip_axes" not in info else  # runs before fedseg recorded it
                f"patches mirrored along {'axes ' + ', '.join(map(str, info['flip_axes'])) if info['flip_axes'] else 'no axis'}, ")
    body = [f"<h1>fedseg run {html.escape(str(cfg.get('run-name', folder.dir.name)))}</h1>",
            _para(f"strategy {cfg['strategy']}, local layers {cfg['local-layers']}, {mirrored}"
                  f"{summary.get('rounds', 0)} round(s), dp {cfg['dp']}, seed {cfg['seed']}; "
                  f"started {info.get('started')}, ended {info.get('ended')}")]
    fed = summary.get("in_federation", {})
    body.append("<h2>Summary</h2>")
    body.append(_table(["", "mean Dice", "worst site", "worst Dice", "max-min gap", "spread (std)"],
                       [["in federation", fed.get("mean"), fed.get("worst_site"), fed.get("worst_dice"),
                         fed.get("gap"), fed.get("std")]]
                       + ([["held-out", *(summary["heldout_summary"].get(k) for k in
                                          ("mean", "worst_site", "worst_dice", "gap", "std"))]]
                          if heldout else [])
                       + [[f"pretrained model alone, {group} (before round 1)", *(spread.get(k) for k in
                           ("mean", "worst_site", "worst_dice", "gap", "std"))]
                          for group, key in (("in federation", "in_federation"), ("held-out", "heldout_summary"))
                          if (spread := summary.get("pretrained_alone", {}).get(key))]))
    body.append(_para("Every site scores the model it would use (global shared weights + its own "
                      "local layers) on its own validation split; only these scalars left the sites."))
    body.append("<h2>Training curves</h2>")
    body += [_img(png, name) for name, png in figures.items()]
    body.append("<h2>Per-site results (final round)</h2>")
    final = rounds[-1]["eval"] if rounds else {}
    labels = sorted({k for m in final.values() for k in m if k.startswith("dice-")},
                    key=lambda k: int(k.removeprefix("dice-")))  # dice-<label value>, in label order
    names, unit = label_names(info), distance_unit(info)
    body.append(_table(["site", "validation cases", "Dice", f"HD95 ({unit})"]
                       + [f"Dice {names.get(k.removeprefix('dice-'), k)}" for k in labels],
                       [[s, final.get(s, {}).get(NUM_EXAMPLES), final.get(s, {}).get("dice"),
                         final.get(s, {}).get("hd95")]
                        + [final.get(s, {}).get(k) for k in labels] for s in training]))
    body.append(_para(f"Dice and HD95 are means over the foreground labels; HD95 is the 95th "
                      f"percentile Hausdorff distance in {UNIT_WORDS.get(unit, UNIT_WORDS['mm or px'])} "
                      f"(a dash: no case where both the model and the ground truth have the label)."))
    if heldout:
        body.append("<h2>Held-out sites (never trained)</h2>")
        body.append(_para("Scored plain (under FedBN with the unseen-site norm set the server "
                          "averaged from the training sites' norms), after test-time adaptation "
                          "on the site's own unlabeled images: BatchNorm statistics, then the norm "
                          "layers' scales and shifts by entropy minimization (a few bounded steps; "
                          "no label used, nothing sent), and with run-config heldout-ensemble as "
                          "the average of the last rounds' models."))
        rows = [[s, final.get(s, {}).get("dice"), final.get(s, {}).get("tta-dice"),
                 _delta(final.get(s, {}).get("tta-dice"), final.get(s, {}).get("dice")),
                 final.get(s, {}).get("hd95"), final.get(s, {}).get(NUM_EXAMPLES)] for s in heldout]
        header = ["site", "Dice", "Dice after adaptation", "change", f"HD95 ({unit})", "cases"]
        members = max((final.get(s, {}).get("ensemble-models") or 0 for s in heldout), default=0)
        if members:
            header.insert(4, f"Dice, ensemble of the last {members:g} rounds' models")
            for row, s in zip(rows, heldout):
                row.insert(4, final.get(s, {}).get("ensemble-dice"))
        body.append(_table(header, rows))
        if all(row[2] is None for row in rows):
            body.append(_para("Adaptation does not apply to this model: it has no BatchNorm statistics "
                              "to re-estimate and no per-pixel class distribution whose entropy could "
                              "be lowered (a detector such as Mask R-CNN), so only the plain Dice is "
                              "shown."))
        hurt = [row[0] for row in rows if row[3] is not None and row[3] < 0]
        if hurt:
            body.append(_para(f"Adaptation lowered the Dice at {', '.join(hurt)}: use the plain model "
                              "there."))
    groups = [(s, k.split(":", 1)[1], v) for s, m in final.items() for k, v in m.items()
              if k.startswith("group-dice:")]
    if groups:
        worst = min(groups, key=lambda g: g[2] if g[2] is not None else 2.0)
        body.append("<h2>Fairness groups</h2>")
        body.append(_para(f"Dice per group (only groups with at least {cfg.get('min-group-cases', 5)} "
                          f"cases are reported by a site). Worst group: {html.escape(worst[1])} at "
                          f"{html.escape(worst[0])} ({_fmt(worst[2])})."))
        body.append(_table(["site", "group", "Dice", "cases"],
                           [[s, g, v, final[s].get(f"group-cases:{g}")] for s, g, v in groups]))
        federation = summary.get("groups", {})
        if federation:
            body.append(_para(f"Across the federation (each group's Dice over the sites that report "
                              f"it, weighted by cases): worst group "
                              f"{html.escape(federation['worst_group'])} ({_fmt(federation['worst_dice'])}), "
                              f"best-worst gap {_fmt(federation['gap'])}."))
            body.append(_table(["group", "Dice", "cases", "sites"],
                               [[g, e["dice"], e["cases"], ", ".join(e["sites"])]
                                for g, e in federation["per_group"].items()]))
    if summary.get("record_level_dp"):
        dp = summary["record_level_dp"]
        body.append("<h2>Privacy</h2>")
        body.append(_para(f"Record-level DP (one case = one patient), Opacus RDP accountant, "
                          f"delta = {dp['delta']:g}. Each site's ledger stays in its state folder."))
        body.append(_table(["site", "epsilon spent"], [[s, e] for s, e in dp["epsilon"].items()]))
    if summary.get("client_level_dp"):
        spent = summary["client_level_dp"]
        body.append(_para(f"Client-level DP (Flower): epsilon {spent['epsilon']:.3f} at delta "
                          f"{spent['delta']:g}."))
    if gallery:
        body.append("<h2>Gallery (simulation only)</h2>")
        body.append(_para("Best and worst validation case per site: image, ground truth, prediction, "
                          "and MONAI's explanation maps: occlusion sensitivity (how much hiding each "
                          "region lowers the predicted foreground; 2D) and SmoothGrad gradient "
                          "saliency. Shown only in simulation, where images may be seen."))
        for item in gallery:
            body.append(f"<h3>{html.escape(item['title'])}</h3>{_para(item['caption'])}"
                        f"{_img(item['png'], item['title'])}")
    path = folder.dir / "report.html"
    atomic_write_bytes(path, _page(f"fedseg {folder.dir.name}", body).encode())
    return path


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
            _para("Every baseline had the same optimizer-step budget and seed"
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
            _table(heads, [[row[c] for c in cols] for row in comparison])]
    if rising:
        body.append(_para(f"Warning: {', '.join(rising)} still improved in the last round: the budget is "
                          "too short for a fair ranking; give the study more rounds or local epochs."))
    site_cols = [c for c in cols if c.startswith("dice:")]
    if site_cols:
        bars = _site_bars(comparison, site_cols)
        atomic_write_bytes(out_dir / "plots" / "per_site.png", bars)
        body += ["<h2>Dice at every site, per baseline</h2>", _img(bars, "per-site Dice per baseline")]
    if matrix:
        heat = _heatmap(matrix)
        atomic_write_bytes(out_dir / "plots" / "cross_site.png", heat)
        body += ["<h2>Cross-site matrix (local-only models)</h2>",
                 _para("Row: the site a model was trained at, alone. Column: the site it was scored at."),
                 _img(heat, "cross-site matrix")]
    path = out_dir / "study.html"
    atomic_write_bytes(path, _page("fedseg study", body).encode())
    return path


def curve_points(rounds: list[dict[str, Any]], site: str, part: str, key: str,
                 start: dict[str, float] | None = None) -> list[tuple[int, float]]:
    """(round, value) of one site's curve; ``start``: values before round 1, drawn at round 0."""
    points = [(r["round"], r[part][site][key]) for r in rounds
              if site in r[part] and r[part][site].get(key) is not None]
    return ([(0, start[site])] if start and site in start else []) + points


def _curves(rounds: list[dict[str, Any]], sites: list[str], part: str, key: str, title: str,
            start: dict[str, float] | None = None) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for site in sites:
        points = curve_points(rounds, site, part, key, start)
        if points:
            ax.plot(*zip(*points), marker="o", label=site)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return _png(fig)


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
    return _png(fig)


def _heatmap(matrix: dict[str, Any]) -> bytes:
    rows, cols, values = matrix["trained_at"], matrix["scored_at"], matrix["dice"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.6 * len(rows)), dpi=100)
    grid = [[v if v is not None else float("nan") for v in row] for row in values]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, _fmt(v, 2), ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.05, label="Dice")
    ax.set_xlabel("scored at")
    ax.set_ylabel("trained at")
    ax.set_title("local-only model trained at (row), scored at (column)", fontsize=8)
    return _png(fig)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _para(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _page(title: str, body: list[str]) -> str:
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
             "th{background:#f0f0f0}img{max-width:100%;display:block;margin:0.5em 0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _delta(after: float | None, before: float | None) -> float | None:
    return after - before if after is not None and before is not None else None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
