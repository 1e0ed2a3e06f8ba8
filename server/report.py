"""Human-readable views of a run folder: the printed per-site table and report.html + plots/*.png."""

from __future__ import annotations

import html
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedseg.common.atomic import atomic_write_bytes  # noqa: E402
from fedseg.common.model_kinds import AUTO_MODEL  # noqa: E402
from fedseg.common.records import NUM_EXAMPLES  # noqa: E402
from fedseg.server.html_page import fmt, img, para, png, page, table  # noqa: E402
from fedseg.server.run_folder import RunFolder  # noqa: E402
from fedseg.server.step_timing import duration_text  # noqa: E402
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
        per_round = [fmt(r["eval"].get(site, {}).get("dice")) for r in rounds]
        final = rounds[-1]["eval"].get(site, {}) if rounds else {}
        tag = " (held-out)" if site in info["heldout_sites"] else ""
        row = [site + tag] + per_round + [fmt(final.get("dice")), fmt(final.get("hd95"), 2)]
        row += [fmt(final.get(m)) for m in instance]
        rows.append(row + ([fmt(epsilon.get(site), 2)] if epsilon else []))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head] + rows]
    fed = summary.get("in_federation", {})
    lines.append(f"mean dice {fmt(fed.get('mean'))} | worst site {fed.get('worst_site')} "
                 f"({fmt(fed.get('worst_dice'))}) | gap {fmt(fed.get('gap'))}")
    if start := summary.get("pretrained_alone", {}).get("in_federation"):
        lines.append(f"the pretrained model alone (before round 1): mean dice {fmt(start.get('mean'))}")
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


GALLERY = Path("plots", "gallery")  # a simulation's gallery: NN.png + gallery.json (``simulations.gallery``)


def _read_gallery(run_dir: Path) -> list[dict[str, Any]]:
    folder = run_dir / GALLERY
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
    for name, figure in figures.items():
        atomic_write_bytes(plots / name, figure)

    cfg = info["config"]
    mirrored = ("" if "flip_axes" not in info else  # runs before fedseg recorded it
                f"patches mirrored along {'axes ' + ', '.join(map(str, info['flip_axes'])) if info['flip_axes'] else 'no axis'}, ")
    body = [f"<h1>fedseg run {html.escape(str(cfg.get('run-name', folder.dir.name)))}</h1>",
            para(f"strategy {cfg['strategy']}, local layers {cfg['local-layers']}, {mirrored}"
                  f"{summary.get('rounds', 0)} round(s){_scored_every(cfg)}, dp {cfg['dp']}, seed {cfg['seed']}; "
                  f"started {info.get('started')}, ended {info.get('ended')}")]
    if (planned := _planned(folder.dir, info)):
        body.append(para(planned))
    if (timing := _timing(info, rounds)):
        body.append(para(timing))
    fed = summary.get("in_federation", {})
    body.append("<h2>Summary</h2>")
    body.append(table(["", "mean Dice", "worst site", "worst Dice", "max-min gap", "spread (std)"],
                       [["in federation", fed.get("mean"), fed.get("worst_site"), fed.get("worst_dice"),
                         fed.get("gap"), fed.get("std")]]
                       + ([["held-out", *(summary["heldout_summary"].get(k) for k in
                                          ("mean", "worst_site", "worst_dice", "gap", "std"))]]
                          if heldout else [])
                       + [[f"pretrained model alone, {group} (before round 1)", *(spread.get(k) for k in
                           ("mean", "worst_site", "worst_dice", "gap", "std"))]
                          for group, key in (("in federation", "in_federation"), ("held-out", "heldout_summary"))
                          if (spread := summary.get("pretrained_alone", {}).get(key))]))
    body.append(para("Every site scores the model it would use (global shared weights + its own "
                      "local layers) on its own validation split; only these scalars left the sites."))
    body.append("<h2>Training curves</h2>")
    body += [img(png, name) for name, png in figures.items()]
    body.append("<h2>Per-site results (final round)</h2>")
    final = rounds[-1]["eval"] if rounds else {}
    labels = sorted({k for m in final.values() for k in m if k.startswith("dice-")},
                    key=lambda k: int(k.removeprefix("dice-")))  # dice-<label value>, in label order
    names, unit = label_names(info), distance_unit(info)
    body.append(table(["site", "validation cases", "Dice", f"HD95 ({unit})"]
                       + [f"Dice {names.get(k.removeprefix('dice-'), k)}" for k in labels],
                       [[s, final.get(s, {}).get(NUM_EXAMPLES), final.get(s, {}).get("dice"),
                         final.get(s, {}).get("hd95")]
                        + [final.get(s, {}).get(k) for k in labels] for s in training]))
    body.append(para(f"Dice and HD95 are means over the foreground labels; HD95 is the 95th "
                      f"percentile Hausdorff distance in {UNIT_WORDS.get(unit, UNIT_WORDS['mm or px'])} "
                      f"(a dash: no case where both the model and the ground truth have the label)."))
    if heldout:
        body.append("<h2>Held-out sites (never trained)</h2>")
        body.append(para("Scored plain (under FedBN with the unseen-site norm set the server "
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
        body.append(table(header, rows))
        if all(row[2] is None for row in rows):
            body.append(para("Adaptation does not apply to this model: it has no BatchNorm statistics "
                              "to re-estimate and no per-pixel class distribution whose entropy could "
                              "be lowered (a detector such as Mask R-CNN), so only the plain Dice is "
                              "shown."))
        hurt = [row[0] for row in rows if row[3] is not None and row[3] < 0]
        if hurt:
            body.append(para(f"Adaptation lowered the Dice at {', '.join(hurt)}: use the plain model "
                              "there."))
    groups = [(s, k.split(":", 1)[1], v) for s, m in final.items() for k, v in m.items()
              if k.startswith("group-dice:")]
    if groups:
        worst = min(groups, key=lambda g: g[2] if g[2] is not None else 2.0)
        body.append("<h2>Fairness groups</h2>")
        body.append(para(f"Dice per group (only groups with at least {cfg.get('min-group-cases', 5)} "
                          f"cases are reported by a site). Worst group: {html.escape(worst[1])} at "
                          f"{html.escape(worst[0])} ({fmt(worst[2])})."))
        body.append(table(["site", "group", "Dice", "cases"],
                           [[s, g, v, final[s].get(f"group-cases:{g}")] for s, g, v in groups]))
        federation = summary.get("groups", {})
        if federation:
            body.append(para(f"Across the federation (each group's Dice over the sites that report "
                              f"it, weighted by cases): worst group "
                              f"{html.escape(federation['worst_group'])} ({fmt(federation['worst_dice'])}), "
                              f"best-worst gap {fmt(federation['gap'])}."))
            body.append(table(["group", "Dice", "cases", "sites"],
                               [[g, e["dice"], e["cases"], ", ".join(e["sites"])]
                                for g, e in federation["per_group"].items()]))
    if summary.get("record_level_dp"):
        dp = summary["record_level_dp"]
        body.append("<h2>Privacy</h2>")
        body.append(para(f"Record-level DP (one case = one patient), Opacus RDP accountant, "
                          f"delta = {dp['delta']:g}. Each site's ledger stays in its state folder."))
        body.append(table(["site", "epsilon spent"], [[s, e] for s, e in dp["epsilon"].items()]))
    if summary.get("client_level_dp"):
        spent = summary["client_level_dp"]
        body.append(para(f"Client-level DP (Flower): epsilon {spent['epsilon']:.3f} at delta "
                          f"{spent['delta']:g}."))
    if gallery:
        body.append("<h2>Gallery (simulation only)</h2>")
        body.append(para("Best and worst validation case per site: image, ground truth, prediction, "
                          "and MONAI's explanation maps: occlusion sensitivity (how much hiding each "
                          "region lowers the predicted foreground; 2D) and SmoothGrad gradient "
                          "saliency. Shown only in simulation, where images may be seen."))
        for item in gallery:
            body.append(f"<h3>{html.escape(item['title'])}</h3>{para(item['caption'])}"
                        f"{img(item['png'], item['title'])}")
    path = folder.dir / "report.html"
    atomic_write_bytes(path, page(f"fedseg {folder.dir.name}", body).encode())
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
    drawn: set[int] = set()
    for site in sites:
        points = curve_points(rounds, site, part, key, start)
        if points:
            ax.plot(*zip(*points), marker="o", label=site)
            drawn |= {x for x, _ in points}
    round_axis(ax, drawn)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return png(fig)


def _planned(run_dir: Path, info: dict[str, Any]) -> str:
    """One sentence on plan.json: what nnU-Net's rules plan from the sites' fingerprints, and
    whether the run trains it (``info``: run.json; "" if there is no plan)."""
    path = run_dir / "plan.json"
    if not path.is_file():
        return ""
    saved = json.loads(path.read_text())
    plans, units = saved["configurations"], saved["fingerprint"].get("units", "mm")

    def x(values: list[float], digits: int = 0) -> str:
        return "x".join(f"{v:.{digits}f}" for v in values)

    parts = [f"{name}: patches of {x(p['patch_size'])}" + (f" at {x(p['spacing'], 2)} mm" if units == "mm" else "")
             + f", batch {p['batch_size']}, {len(p['features'])} stages of {p['features'][0]}-{p['features'][-1]} "
             f"features, {', '.join(sorted(set(p['normalization'])))} normalization" for name, p in plans.items()]
    cfg = info.get("config", {})
    trains = (f"this run trains its {info['model']['spatial_dims']}d configuration at the run's batch size, "
              f"{cfg.get('batch-size')}" if cfg.get("model") == AUTO_MODEL else "this run trains the configured network")
    spacing = info.get("spacing") or []
    grid = (f" Every site resamples its images to {x(spacing, 2)} mm for the network; scores and predictions are "
            "in each image's own geometry." if spacing else
            " The network sees each image on its own grid" + (" (run-config spacing=native)."
                                                             if cfg.get("spacing") == "native" else "."))
    return (f"nnU-Net's rules on the training sites' merged dataset fingerprints (plan.json; {trains}) plan "
            + "; ".join(parts) + "." + grid)


def _timing(info: dict[str, Any], rounds: list[dict[str, Any]]) -> str:
    """One sentence setting the training time expected before round 1 (run.json's ``expected``)
    beside what the rounds took ("" for a run without an expectation)."""
    expected = info.get("expected")
    if not expected:
        return ""
    took = [r["seconds"] for r in rounds if isinstance(r.get("seconds"), (int, float))]
    text = (f"Expected training time before round 1: {duration_text(expected['round_seconds'])} per round, "
            f"from {len(expected['seconds_per_step'])} site(s) timing their steps")
    return text + (f"; the rounds took {duration_text(statistics.median(took))} on median (training, scoring "
                   f"and messages; {duration_text(min(took))} to {duration_text(max(took))})." if took else ".")


def round_axis(ax: plt.Axes, rounds: set[int]) -> None:
    """Whole-numbered round ticks; a curve of one or two rounds gets exactly those (matplotlib's
    integer locator gives up on a one-point range and ticks 0.95, 1.00, 1.05)."""
    ax.set_xlabel("round")
    if len(rounds) <= 2:
        ax.set_xticks(sorted(rounds))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _scored_every(cfg: dict[str, Any]) -> str:
    """", scored every K rounds and the last" for a run with ``evaluate-every`` K > 1."""
    every = int(cfg.get("evaluate-every", 1))
    return f", scored every {every} rounds and the last" if every > 1 else ""


def _delta(after: float | None, before: float | None) -> float | None:
    return after - before if after is not None and before is not None else None


