"""A setting's ensemble report as text: ``report.md`` and the table printed when it is written.

Three tables, from the ``report.json`` dict that :func:`tasks.ensemble.build_report` makes:

1. **models**: every member, their mean ± std, the best member (chosen on validation), the
   soups, the ensemble raw and calibrated, with their forward passes per image;
2. **calibration**: each member's and the ensemble's temperature (fitted on validation) and
   their test NLL / ECE / Brier before → after;
3. **intervals**: the bootstrap interval of each model's accuracy / NLL / ECE, and the paired
   interval of each gain, marked ✓ when it excludes 0 (the difference is distinguishable).
"""

from __future__ import annotations

import math
from typing import Any

METRICS = ("acc", "nll", "ece", "brier")
SPLITS = {"test": "single view", "test_tta": "TTA"}
HEAD = {"acc": "acc %", "nll": "NLL", "ece": "ECE", "brier": "Brier"}
# rows of the models table after the members (interval names in the report), and their cost
SUMMARY_ROWS = ("best member", "uniform soup", "greedy soup", "ensemble", "ensemble, calibrated")


def fmt(metric: str, value: float | None, *, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    sign = "+" if signed else ""
    if metric.startswith("acc"):
        return f"{value * 100:{sign}.2f}"
    return f"{value:{sign}.4f}"


def passes(report: dict, name: str) -> str:
    """Forward passes per image of a row (single view; TTA multiplies them by its views)."""
    if name in ("ensemble", "ensemble, calibrated"):
        return str(len(report["members"]))
    return "1"


def row_label(report: dict, name: str) -> str:
    if name == "best member" and report.get("best_member"):
        return f"best member ({report['best_member']['label']}, by val acc)"
    if name.endswith("soup") and report["soups"].get(name.split()[0]):
        kept = report["soups"][name.split()[0]]["members"]
        return f"{name} ({', '.join(kept)})"
    if name == "ensemble, calibrated":
        temps = [
            f"{'TTA ' if split == 'test_tta' else ''}{c['ensemble']['temperature']:.3f}"
            for split, c in report["calibration"].items()
            if c["ensemble"]["temperature"] is not None
        ]
        return f"ensemble, calibrated (T={' / '.join(temps)})"
    return name


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the models table."""
    splits = [s for s in SPLITS if s in report]
    header = ["model", "passes"]
    for split in splits:
        suffix = "" if split == "test" else " TTA"
        header += [f"{HEAD[k]}{suffix}" for k in METRICS]
    rows = []
    for i, member in enumerate(report["members"]):
        row = [f"seed {member['seed']}", "1"]
        for split in splits:
            row += [fmt(k, report[split]["members"][i][k]) for k in METRICS]
        rows.append(row)
    mean_row = ["mean ± std", "1"]
    for split in splits:
        s = report[split]
        mean_row += [f"{fmt(k, s['mean'][k])} ± {fmt(k, s['std'][k])}" for k in METRICS]
    rows.append(mean_row)
    test_rows = report.get("intervals", {}).get("test", {})
    for name in SUMMARY_ROWS:
        if name not in test_rows:
            continue
        row = [row_label(report, name), passes(report, name)]
        for split in splits:
            table = report["intervals"].get(split, {})
            row += [fmt(k, table[name][k]["value"]) if name in table else "-" for k in METRICS]
        rows.append(row)
    gain_row = ["ensemble − mean member", ""]
    for split in splits:
        gain_row += [fmt(k, report[split]["gain"][k], signed=True) for k in METRICS]
    rows.append(gain_row)
    return header, rows


def calibration_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the calibration table (one block per split with validation)."""
    header = ["model", "views", "T", "NLL", "ECE", "Brier"]
    rows = []
    for split, views in SPLITS.items():
        cal = report.get("calibration", {}).get(split)
        if cal is None:
            continue
        raw = report[split]
        entries = [
            (f"seed {m['seed']}", raw["members"][i], cal["members"][i])
            for i, m in enumerate(report["members"])
        ]
        entries.append(("ensemble", raw["ensemble"], cal["ensemble"]))
        for name, before, after in entries:
            if after["temperature"] is None:  # refused: no minimum inside the bounds
                rows.append([name, views, "-", after["reason"], "", ""])
                continue
            rows.append(
                [name, views, f"{after['temperature']:.3f}"]
                + [f"{fmt(k, before[k])} → {fmt(k, after[k])}" for k in ("nll", "ece", "brier")]
            )
    return header, rows


def interval_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the intervals table: models, then paired gains."""
    header = ["", "views", *(HEAD[k] for k in ("acc", "nll", "ece"))]
    rows = []
    for split, views in SPLITS.items():
        for name, cells in report.get("intervals", {}).get(split, {}).items():
            if name.startswith("seed "):
                continue
            rows.append([name, views, *(_interval(k, cells[k]) for k in ("acc", "nll", "ece"))])
    for block, gains in report.get("gains", {}).items():
        views = SPLITS.get(block, "")
        for name, cells in gains.items():
            rows.append(
                [name, views, *(_interval(k, cells[k], signed=True) for k in ("acc", "nll", "ece"))]
            )
    return header, rows


def _interval(metric: str, cell: dict, *, signed: bool = False) -> str:
    text = (
        f"{fmt(metric, cell['value'], signed=signed)} "
        f"[{fmt(metric, cell['lo'], signed=signed)}, {fmt(metric, cell['hi'], signed=signed)}]"
    )
    if signed and cell.get("distinguishable"):
        text += " ✓"
    return text


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def markdown(report: dict) -> str:
    test = report["test_set"]
    seeds = ", ".join(str(s) for s in report["seeds"])
    lines = [f"# Ensemble of {len(report['members'])} members (seeds {seeds})", ""]
    if report["setting"]:
        name = report.get("name") or title(report["setting"])
        lines += [f"Setting: `{name}`", ""]
        if name != title(report["setting"]):  # a preset: the keys it changes
            changed = ", ".join(f"`{k}={v}`" for k, v in report["setting"].items())
            lines += [f"Its configuration differs from the other settings in {changed}.", ""]
    lines += [
        f"Test set: {test['samples']} images, {test['classes']} classes, "
        f"split_seed {test['split_seed']}.",
        "",
        *_md_table(*table_rows(report)),
    ]
    for split, name in SPLITS.items():
        if split in report:
            d = report[split]["disagreement"]
            lines.append(
                f"- Diversity ({name}): members disagree on {d['mean'] * 100:.2f} % of the test "
                "images (mean over pairs)."
            )
    if report["tta"]:
        lines.append(f"- TTA: {tta_text(report['tta'])}; its passes are × its views.")
    lines.append(f"- Soups: {soup_text(report['soups'])}.")
    for run in report["left_out"]:
        lines.append(f"- Left out: seed {run['seed']} (run {run['path']}): {run['reason']}")
    lines += _calibration_section(report) + _interval_section(report)
    lines += [report["notes"], ""]
    return "\n".join(lines)


def _calibration_section(report: dict) -> list[str]:
    lines: list[str] = []
    header, rows = calibration_rows(report)
    if rows:
        cal = report["calibration"]["test"]
        lines += [
            "",
            "## Calibration",
            "",
            "Temperature scaling, fitted on the validation images (the ensemble's on its pooled "
            "probabilities); test metrics before → after. Accuracy does not change.",
            "",
            *_md_table(header, rows),
            f"For the ensemble (single view), {cal['better']} is better here (test NLL)"
            + (
                "."
                if cal["ensemble"]["temperature"] is not None
                else ": no temperature could be fitted."
            ),
            "",
        ]
    return lines


def _interval_section(report: dict) -> list[str]:
    lines: list[str] = []
    header, rows = interval_rows(report)
    if rows:
        b = report["bootstrap"]
        lines += [
            "",
            f"## {b['level'] * 100:g} % intervals",
            "",
            f"Bootstrap over the test images ({b['resamples']} resamples, seed {b['seed']}), the "
            "same resamples for every model, so gains are paired. ✓: the interval excludes 0.",
            "",
            *_md_table(header, rows),
        ]
    return lines


def soup_text(soups: dict) -> str:
    if not soups["soupable"] or not any(k in soups for k in ("uniform", "greedy")):
        return soups["reason"]
    parts = []
    for kind in ("uniform", "greedy"):
        if kind in soups:
            bn = soups[kind].get("bn_reestimated") or 0
            note = f", BatchNorm re-estimated in {bn} layers" if bn else ""
            parts.append(
                f"{kind} of {', '.join(soups[kind]['members'])}{note}: {soups[kind]['checkpoint']}"
            )
    return "; ".join(parts)


def tta_text(tta: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in tta.items() if k != "interpolation")


def title(label: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in label.items())


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(report)
    seeds = ", ".join(str(s) for s in report["seeds"])
    name = f"Ensemble of {len(report['members'])} members (seeds {seeds})"
    if report["setting"]:
        name += " - " + (report.get("name") or title(report["setting"]))
    caption = "TTA: " + tta_text(report["tta"]) if report["tta"] else None
    table = Table(title=name, caption=caption)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row, style="bold" if row[0].startswith("ensemble") else None)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table into 80 columns
        console = Console(width=220)
    console.print(table)
