"""Settings against each other: is the difference between two settings real?

For the settings of a grid multirun (``-m augment=none,light seed=1,2,3``), or any runs given
to ``python run.py task=compare compare.runs=<sweep dir>``: per setting its members' mean ± std
and its ensemble, each with a bootstrap interval over the test images; and for every pair of
settings tested on the same images, the **paired** difference (same resamples for both, so
image difficulty cancels) of the ensembles and of the mean members, marked distinguishable when
its interval excludes 0. Written as ``compare.json``, ``compare.md`` and ``compare.png``.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.errors import UserError
from lightning_modules import bootstrap as B
from lightning_modules import metrics as M
from lightning_modules.run_outputs import write_json, write_text

log = logging.getLogger(__name__)

METRICS = ("acc", "nll", "ece", "brier")
SPLITS = {"test": "single view", "test_tta": "TTA"}
MODELS = ("ensemble", "mean member")


def compare(
    settings: list[tuple[str, dict[str, list[dict[str, np.ndarray]]]]],
    out_dir: Path,
    *,
    resamples: int = B.DEFAULT_RESAMPLES,
    level: float = B.DEFAULT_LEVEL,
    seed: int = 0,
    plots: bool = True,
) -> dict[str, Any]:
    """``settings``: ``(name, predictions per split)`` of each setting (its members' arrays).

    Returns the comparison (also written to ``out_dir``).
    """
    if len(settings) < 2:
        raise UserError("A comparison needs at least two settings: give runs of a grid multirun.")
    rows, samples, ids = [], {}, {}
    for name, preds in settings:
        ids[name] = preds["test"][0]["ids"].tolist()
        entry: dict[str, Any] = {"setting": name, "members": len(preds["test"])}
        # the same test images give the same resamples (same count, same seed): settings
        # tested on the same images are paired
        counts = B.resample_counts(len(ids[name]), n_boot=resamples, seed=seed)
        for split in SPLITS:
            if split in preds:
                entry[split], samples[(name, split)] = _score(preds[split], counts, level=level)
        rows.append(entry)
    result = {
        "settings": rows,
        "differences": _differences(rows, samples, ids, level=level),
        "bootstrap": {"resamples": resamples, "level": level, "seed": seed, "over": "test images"},
        "test_images": len(ids[settings[0][0]]),
    }
    write_json(out_dir / "compare.json", result)
    write_text(out_dir / "compare.md", markdown(result))
    if plots:
        from lightning_modules.figures.compare_figure import compare_figure

        compare_figure(out_dir / "compare.png", result)
    log.info("Comparison of %d settings: %s", len(rows), out_dir / "compare.md")
    return result


def _score(members: list[dict], counts: np.ndarray, *, level: float) -> tuple[dict, dict]:
    """A setting's members (mean, std), its mean member and ensemble with intervals
    (:func:`tasks.verdict.intervals`); and the bootstrap samples and values of the latter two
    (for paired differences)."""
    from tasks.verdict import intervals

    targets = members[0]["targets"]
    probs = [p["probs"] for p in members]
    scores = [M.summarize(p, targets) for p in probs]
    spread = {
        k: {
            "mean": float(np.mean([s[k] for s in scores])),
            "std": float(np.std([s[k] for s in scores], ddof=1)) if len(scores) > 1 else 0.0,
        }
        for k in METRICS
    }
    ensemble = np.mean(np.stack([p.astype(np.float64) for p in probs]), axis=0)
    table, samples = intervals(
        {"ensemble": ensemble, "mean member": probs}, targets, counts, level=level
    )
    entry = {"members": spread, **table}
    values = {m: {k: table[m][k]["value"] for k in METRICS} for m in MODELS}
    return entry, {m: (samples[m], values[m]) for m in MODELS}


def _differences(rows: list[dict], samples: dict, ids: dict, *, level: float) -> list[dict]:
    """Every pair of settings (second − first), per split and model, paired when both were
    tested on the same images."""
    out = []
    for a, b in itertools.combinations(rows, 2):
        for split, views in SPLITS.items():
            if split not in a or split not in b:
                continue
            for model in MODELS:
                item = {"a": a["setting"], "b": b["setting"], "views": views, "model": model}
                if ids[a["setting"]] != ids[b["setting"]]:
                    item["note"] = "not paired: the settings were tested on different images"
                else:
                    (sb, vb), (sa, va) = (
                        samples[(b["setting"], split)][model],
                        samples[(a["setting"], split)][model],
                    )
                    item["difference"] = B.difference(sb, sa, vb, va, level=level)
                out.append(item)
    return out


def _cell(metric: str, cell: dict, *, signed: bool = False) -> str:
    from tasks.report_text import fmt

    text = (
        f"{fmt(metric, cell['value'], signed=signed)} "
        f"[{fmt(metric, cell['lo'], signed=signed)}, {fmt(metric, cell['hi'], signed=signed)}]"
    )
    return text + (" ✓" if cell.get("distinguishable") else "")


def markdown(result: dict) -> str:
    from tasks.report_text import fmt

    b = result["bootstrap"]
    lines = [
        f"# {len(result['settings'])} settings compared",
        "",
        f"Test set: {result['test_images']} images. Intervals: {b['level'] * 100:g} % bootstrap "
        f"over the test images ({b['resamples']} resamples, seed {b['seed']}); differences are "
        "paired (the same resamples for both settings). ✓: the interval excludes 0.",
        "",
        "| setting | views | members | member acc % (mean ± std) | mean member acc % | "
        "ensemble acc % | ensemble NLL | ensemble ECE |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["settings"]:
        for split, views in SPLITS.items():
            if split not in row:
                continue
            s = row[split]
            m = s["members"]["acc"]
            lines.append(
                f"| {row['setting']} | {views} | {row['members']} | "
                f"{fmt('acc', m['mean'])} ± {fmt('acc', m['std'])} | "
                f"{_cell('acc', s['mean member']['acc'])} | {_cell('acc', s['ensemble']['acc'])} | "
                f"{_cell('nll', s['ensemble']['nll'])} | {_cell('ece', s['ensemble']['ece'])} |"
            )
    lines += [
        "",
        "## Differences (second − first)",
        "",
        "| second − first | views | model | acc % | NLL | ECE |",
        "|---|---|---|---:|---:|---:|",
    ]
    for d in result["differences"]:
        if "difference" not in d:
            lines.append(f"| {d['b']} − {d['a']} | {d['views']} | {d['model']} | {d['note']} | | |")
            continue
        cells = " | ".join(_cell(k, d["difference"][k], signed=True) for k in ("acc", "nll", "ece"))
        lines.append(f"| {d['b']} − {d['a']} | {d['views']} | {d['model']} | {cells} |")
    lines.append("")
    return "\n".join(lines)


def compare_task(cfg) -> tuple[dict, dict]:
    """``task=compare``: compare the settings among ``compare.runs`` (in the run directory)."""
    from tasks.ensemble import runs_option, setting_predictions

    settings = setting_predictions(runs_option(cfg, "compare"))
    if len(settings) < 2:
        raise UserError(
            f"compare.runs holds {len(settings)} setting(s) with at least two finished members: "
            "a comparison needs two; give a grid multirun (-m augment=none,light seed=1,2,3)."
        )
    b = cfg.compare
    result = compare(
        settings,
        Path(cfg.paths.output_dir),
        resamples=int(b.get("bootstrap", B.DEFAULT_RESAMPLES)),
        level=float(b.get("level", B.DEFAULT_LEVEL)),
        seed=int(b.get("bootstrap_seed", 0)),
        plots=bool(b.get("plots", True)),
    )
    return {"compare": str(Path(cfg.paths.output_dir) / "compare.md")}, {"compare": result}
