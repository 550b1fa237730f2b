"""The ensemble report's reliability diagram (PNG, matplotlib); its confusion matrix is
:func:`lightning_modules.figures.model_figures.plot_confusion`, as in ``task=visualize``.

Drawn on a bare ``matplotlib.figure.Figure``: no pyplot, no GUI backend, nothing global.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_modules import metrics as M


def reliability_figure(
    path: Path,
    panels: dict[str, tuple[list[np.ndarray], np.ndarray]],
    targets: np.ndarray,
    *,
    member_labels: list[str],
) -> Path:
    """Accuracy against confidence (15 bins), members thin, ensemble bold; one panel per view.

    ``panels``: ``{title: (members' probabilities, ensemble probabilities)}``. Points sit at
    each bin's mean confidence; empty bins are skipped. The diagonal is perfect calibration.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, (members, ensemble)) in zip(axes, panels.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
        for label, probs in zip(member_labels, members, strict=True):
            bins = M.reliability(probs, targets)
            filled = bins["count"] > 0
            ece = M.ece(probs, targets)
            ax.plot(
                bins["confidence"][filled],
                bins["accuracy"][filled],
                marker=".",
                linewidth=1,
                alpha=0.6,
                label=f"{label} (ECE {ece:.3f})",
            )
        bins = M.reliability(ensemble, targets)
        filled = bins["count"] > 0
        x, y = bins["confidence"][filled], bins["accuracy"][filled]
        ax.plot(
            x, y, color="black", linewidth=2, label=f"ensemble (ECE {M.ece(ensemble, targets):.3f})"
        )
        # marker area grows with the bin's share of samples: nearly empty bins look it
        share = bins["count"][filled] / bins["count"].sum()
        ax.scatter(x, y, s=20 + 400 * share, color="black", zorder=3)
        ax.set(
            title=f"Reliability, {title}",
            xlabel="confidence (bin mean; dot area ∝ images)",
            ylabel="accuracy",
            xlim=(0, 1.01),
            ylim=(0, 1.03),
        )
        ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110)
    return path
