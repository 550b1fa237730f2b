"""The comparison of settings as a picture (``compare.png``, :mod:`tasks.compare`).

Left: per setting, its members' accuracy (mean ± std over seeds, thin) and its ensemble's with
the bootstrap interval (bold). Right: each paired difference between settings with its
interval; a filled marker when the interval excludes 0. Drawn on a bare
``matplotlib.figure.Figure`` (no pyplot).
"""

from __future__ import annotations

import os
from pathlib import Path


def compare_figure(path: Path, result: dict) -> Path:
    from matplotlib.figure import Figure

    path = Path(path)
    settings = [r for r in result["settings"] if "test" in r]
    diffs = [d for d in result["differences"] if "difference" in d and d["views"] == "single view"]
    fig = Figure(figsize=(11, 0.5 * max(len(settings), len(diffs), 4) + 1.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, row in enumerate(settings):
        s = row["test"]
        m = s["members"]["acc"]
        left.errorbar(
            m["mean"] * 100,
            i + 0.15,
            xerr=m["std"] * 100,
            fmt="o",
            color="C0",
            capsize=3,
            label="members: mean ± std" if i == 0 else None,
        )
        e = s["ensemble"]["acc"]
        left.errorbar(
            e["value"] * 100,
            i - 0.15,
            xerr=[[(e["value"] - e["lo"]) * 100], [(e["hi"] - e["value"]) * 100]],
            fmt="s",
            color="C3",
            capsize=3,
            linewidth=2,
            label=f"ensemble, {result['bootstrap']['level'] * 100:g} % interval"
            if i == 0
            else None,
        )
    left.set_yticks(range(len(settings)), [r["setting"] for r in settings])
    left.invert_yaxis()
    left.set_xlabel("test accuracy %")
    left.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize="small", ncols=2)
    for i, d in enumerate(diffs):
        c = d["difference"]["acc"]
        color = "C3" if d["model"] == "ensemble" else "C0"
        right.errorbar(
            c["value"] * 100,
            i,
            xerr=[[(c["value"] - c["lo"]) * 100], [(c["hi"] - c["value"]) * 100]],
            fmt="o",
            color=color,
            capsize=3,
            markerfacecolor=color if c["distinguishable"] else "white",
        )
    right.axvline(0, color="0.5", linestyle="--", linewidth=1)
    right.set_yticks(range(len(diffs)), [f"{d['b']} − {d['a']} ({d['model']})" for d in diffs])
    right.invert_yaxis()
    right.set_xlabel("paired acc difference (points)\nfilled: excludes 0")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    return path
