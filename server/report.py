"""Human-readable views of a run folder: the per-site table printed at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path

from fedseg.server.outputs import RunFolder


def site_table(run_dir: str | Path) -> str:
    """Plain-text table: validation Dice per site per round, final Dice and HD95, mean and worst."""
    folder = RunFolder(run_dir)
    rounds = folder.read_rounds()
    summary = json.loads((folder.dir / "summary.json").read_text())
    info = folder.read_run_info()
    sites = info["training_sites"] + info["heldout_sites"]
    epsilon = summary.get("record_level_dp", {}).get("epsilon", {})
    head = ["site"] + [f"r{r['round']}" for r in rounds] + ["final dice", "final hd95"]
    head += ["epsilon"] if epsilon else []
    rows = []
    for site in sites:
        per_round = [_fmt(r["eval"].get(site, {}).get("dice")) for r in rounds]
        final = rounds[-1]["eval"].get(site, {}) if rounds else {}
        tag = " (held-out)" if site in info["heldout_sites"] else ""
        row = [site + tag] + per_round + [_fmt(final.get("dice")), _fmt(final.get("hd95"), 2)]
        rows.append(row + ([_fmt(epsilon.get(site), 2)] if epsilon else []))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head] + rows]
    fed = summary.get("in_federation", {})
    lines.append(f"mean dice {_fmt(fed.get('mean'))} | worst site {fed.get('worst_site')} "
                 f"({_fmt(fed.get('worst_dice'))}) | gap {_fmt(fed.get('gap'))}")
    if epsilon:
        delta = summary["record_level_dp"]["delta"]
        lines.append(f"record-level DP: epsilon per site at delta={delta:g} (Opacus RDP accountant)")
    if "client_level_dp" in summary:
        spent = summary["client_level_dp"]
        lines.append(f"client-level DP: epsilon {spent['epsilon']:.3f} at delta={spent['delta']:g} "
                     "(Flower RDP accountant, server-side noise)")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
