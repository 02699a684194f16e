"""The report's figures, drawn with matplotlib from a study's tables (Polars frames).

Each function returns a matplotlib Figure or None when its table has nothing to draw; the
report saves each as a PNG and embeds the same bytes in the HTML.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from omgseg.platform.records import Agreement  # noqa: E402

DIVERGING = "RdBu"  # red: the source hurts the target, blue: it helps


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def target_label(dataset: str, task: str, metric: str) -> str:
    return f"{dataset}\n{task}\n{metric}"


def influence_heatmap(influence: pl.DataFrame, kind: str, family: str = "primary") -> Figure | None:
    """Source data set (rows) x target (data set, task, metric) (columns); colour = relative
    delta (positive helps), clipped to +-100 %; the number is the delta. A cell that is not
    significant after correction is hatched and its number is followed by '?' (a flagged one
    by its flag): the sign is not established."""
    rows = influence.filter((pl.col("kind") == kind) & (pl.col("family") == family))
    if rows.height == 0:
        return None
    sources = sorted(rows["source_dataset"].unique().to_list())
    targets = rows.select("target_dataset", "task", "metric").unique().sort("target_dataset", "task", "metric").rows()
    grid = np.full((len(sources), len(targets)), np.nan)
    figure, axes = plt.subplots(figsize=(1.3 + 1.15 * len(targets), 1.2 + 0.7 * len(sources)))
    for r in rows.iter_rows(named=True):
        i, j = sources.index(r["source_dataset"]), targets.index((r["target_dataset"], r["task"], r["metric"]))
        rel = r["relative_delta"]
        grid[i, j] = np.nan if rel is None else max(-1.0, min(1.0, rel))
        uncertain = not r["significant"]
        text = f"{r['delta']:+.2g}" + (f"\n{r['flag']}" if r["flag"] else "?" if uncertain else "")
        dark = not np.isnan(grid[i, j]) and abs(grid[i, j]) > 0.6  # white on the saturated ends of the map
        axes.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        if uncertain:
            axes.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.55", lw=0))
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=DIVERGING, vmin=-1, vmax=1, aspect="auto")
    axes.set_xticks(range(len(targets)), [target_label(*t) for t in targets], fontsize=7)
    axes.set_yticks(range(len(sources)), sources, fontsize=8)
    axes.set_xlabel("target")
    axes.set_ylabel("source (added to training)")
    title = {"pair": "pair: {source, target} minus {target}",
             "controlled": "controlled: {source, target} minus {target, control}",
             "leave_one_out": "leave-one-out: all minus all-but-source",
             "surrogate": "surrogate: the source's coefficient over the sampled subsets",
             "surrogate_controlled": "surrogate, controlled: the source's coefficient minus the control's"}[kind]
    axes.set_title(f"Influence on {family} targets ({title})", fontsize=9)
    bar = figure.colorbar(image, ax=axes, fraction=0.04)
    bar.set_label("relative delta (clipped to +-1)", fontsize=8)
    return figure


def correlation_heatmap(correlation: pl.DataFrame, method: str = "spearman") -> Figure | None:
    """Target x target correlation across trials; grey where undefined (fewer than 3 trials
    or a constant metric)."""
    if correlation.height == 0:
        return None
    labels = correlation.select("dataset_a", "task_a", "metric_a").unique().sort("dataset_a", "task_a", "metric_a").rows()
    index = {t: k for k, t in enumerate(labels)}
    grid = np.full((len(labels), len(labels)), np.nan)
    for r in correlation.iter_rows(named=True):
        value = r[method]
        if value is not None:
            grid[index[(r["dataset_a"], r["task_a"], r["metric_a"])], index[(r["dataset_b"], r["task_b"], r["metric_b"])]] = value
    side = 1.5 + 0.75 * len(labels)
    figure, axes = plt.subplots(figsize=(side + 1, side))
    axes.set_facecolor("0.85")
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=DIVERGING, vmin=-1, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if not math.isnan(grid[i, j]):
                axes.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    names = [f"{d}/{t}/{m}" for d, t, m in labels]
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_title(f"Task correlation across trials ({method})", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.04)
    return figure


def metric_bars(metrics: pl.DataFrame, targets: list[tuple[str, str, str]]) -> Figure | None:
    """One panel per target: every trial's value, trials grouped by combination."""
    present = [t for t in targets if metrics.filter((pl.col("eval_dataset") == t[0]) & (pl.col("task") == t[1])
                                                    & (pl.col("metric") == t[2])).height]
    if not present:
        return None
    columns = min(3, len(present))
    rows = math.ceil(len(present) / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.2 * rows), squeeze=False)
    for k, (dataset, task, metric) in enumerate(present):
        axes = grid[k // columns][k % columns]
        values = (metrics.filter((pl.col("eval_dataset") == dataset) & (pl.col("task") == task) & (pl.col("metric") == metric))
                  .sort("combination", "seed"))
        combos = values["combination"].to_list()
        colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(dict.fromkeys(combos))}
        axes.bar(range(values.height), values["value"].to_list(), color=[colours[c] for c in combos])
        axes.set_xticks(range(values.height), [f"{c} s{s}" for c, s in zip(combos, values["seed"].to_list())],
                        rotation=60, ha="right", fontsize=6)
        axes.set_title(f"{dataset} / {task} / {metric}", fontsize=9)
        axes.set_ylabel(metric, fontsize=8)
    for k in range(len(present), rows * columns):
        grid[k // columns][k % columns].axis("off")
    figure.tight_layout()
    return figure


def affinity_scatter(estimates: Agreement) -> Figure | None:
    """Each ordered pair of train data sets: its mean TAG affinity against its pair influence."""
    pairs = estimates.pairs
    if not pairs:
        return None
    figure, axes = plt.subplots(figsize=(5.2, 4.2))
    x = [p.affinity for p in pairs]
    y = [p.influence for p in pairs]
    axes.scatter(x, y, color="tab:blue")
    for p in pairs:
        axes.annotate(f"{p.source_dataset} -> {p.target_dataset}", (p.affinity, p.influence), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    axes.axhline(0, color="0.6", lw=0.8)
    axes.axvline(0, color="0.6", lw=0.8)
    rho = estimates.spearman
    rho_text = "n/a (fewer than 3 pairs)" if rho is None else f"{rho:.2f}"
    axes.set_title(f"Cheap vs exhaustive: Spearman {rho_text} over {len(pairs)} pairs", fontsize=9)
    axes.set_xlabel("TAG look-ahead affinity (mean Z, one co-training run)")
    axes.set_ylabel("pair influence (mean relative delta)")
    return figure
