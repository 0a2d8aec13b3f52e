"""A training run's curves from its log records (cx.read_log of its log.jsonl): one matplotlib figure per
quantity, for the HTML report. The x axis is the optimizer step."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..training.loggers import scalars

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (figure name, y label, the scalars it draws: names or fnmatch patterns), in the order the report shows them.
CURVES = (
    ("loss", "loss (and its terms)", ("loss", "reconstruction", "aux", "l1")),
    ("fve", "fraction of variance explained", ("fve", "fve_per_model/*")),
    ("l0", "L0 (active latents per token)", ("l0",)),
    ("dead_fraction", "dead latents (fraction)", ("dead_fraction",)),
    ("threshold", "inference threshold theta", ("threshold",)),
    ("lr", "learning rate", ("lr",)),
    ("grad_norm", "gradient norm (before clipping)", ("grad_norm",)),
)


def curve_series(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """The series each curve draws: {figure name: {scalar name: (steps, values)}}; a curve none of whose
    scalars the log holds is left out.

    Args:
        records: Log records, in step order (each with a "step").

    Returns:
        The series per figure, in CURVES' order.
    """
    flat = [(r["step"], scalars(r)) for r in records]
    found: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for name, _, patterns in CURVES:
        series: dict[str, tuple[list[int], list[float]]] = {}
        for pattern in patterns:
            keys = sorted({k for _, values in flat for k in values if fnmatch.fnmatchcase(k, pattern)})
            for key in keys:
                points = [(step, values[key]) for step, values in flat if key in values]
                series[key] = ([s for s, _ in points], [v for _, v in points])
        if series:
            found[name] = series
    return found


def curve_figures(records: Sequence[Mapping[str, Any]]) -> dict[str, Figure]:
    """One figure per curve of the run's log (see CURVES), the caller closes them.

    Args:
        records: Log records, in step order.

    Returns:
        {figure name: matplotlib Figure}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    labels = {name: label for name, label, _ in CURVES}
    for name, series in curve_series(records).items():
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        for key, (steps, values) in series.items():
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, lw=1.2, label=key.replace("_per_model", ""))
        every_value = [v for _, values in series.values() for v in values]
        if name == "loss" and every_value and min(every_value) > 0:
            ax.set_yscale("log")  # the loss falls over orders of magnitude early in a run
        ax.set_xlabel("step")
        ax.set_ylabel(labels[name])
        if len(series) > 1:
            ax.legend(fontsize=7)
        figures[name] = fig
    return figures
