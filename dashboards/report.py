"""A study's report: one self-contained HTML file (figures inlined, no scripts, no network) and
the same figures as PNG files, also logged to the study's MLflow parent run.

    python dashboards/report.py STUDY_DIR [--out FILE] [--mlflow-url URL] [--samples N]
    omgseg report STUDY_DIR ...                          (the same)

Sections: summary, influence heatmaps (pair and leave-one-out), task correlation, every
trial's metric per target, cheap (TAG affinity) versus exhaustive influence, the run table
with links to the MLflow runs, and predictions on a few validation clips per task.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from omgseg.dashboards.figures import affinity_scatter, correlation_heatmap, influence_heatmap, metric_bars, png_bytes
from omgseg.platform.config import StudyConfig
from omgseg.platform.records import StudyState, StudySummary
from omgseg.platform.study.design import KINDS
from omgseg.platform.study.plan import targets
from omgseg.platform.study.results import TABLES

SECTIONS = ("summary", "influence", "correlation", "metrics", "affinity", "runs", "samples")
STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ccc; padding: 3px 7px; }
th { background: #f3f3f3; } td.num { text-align: right; } .failed { color: #b00; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; max-width: 900px; }
img { max-width: 100%; } .note { font-size: 0.85em; color: #555; }
"""


@dataclass
class Report:
    html: Path
    figures: dict[str, Path]  # name -> PNG file


class StudyTables:
    """A study folder's tables, summary and config, read once; errors name the missing file."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.state = StudyState.read(self.folder)
        self.config = StudyConfig.model_validate(self.state.config)
        self.tables = {}
        for name in TABLES:
            path = self.folder / f"{name}.parquet"
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: the study has not written its tables yet")
            self.tables[name] = pl.read_parquet(path)
        self.summary = StudySummary.read(self.folder)


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(frame: pl.DataFrame, links: dict[str, str] | None = None, link_column: str = "mlflow_run_id") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.iter_rows(named=True):
        cells = []
        for column, value in row.items():
            if isinstance(value, float):
                cells.append(f'<td class="num">{value:.3f}</td>')
            elif links and column == link_column and value in links:
                cells.append(f'<td><a href="{html.escape(links[value])}">{html.escape(str(value)[:8])}</a></td>')
            elif column == "status" and value != "finished":
                cells.append(f'<td class="failed">{html.escape(str(value))}</td>')
            else:
                text = ", ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, list) \
                    else ("" if value is None else str(value))
                cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _mlflow_links(study: StudyTables, base_url: str) -> tuple[dict[str, str], str | None]:
    """{run id: UI URL} of the trials and the parent's URL, when the tracking store can be read."""
    import mlflow

    base = base_url.rstrip("/")
    try:
        parent = mlflow.MlflowClient(study.state.tracking_uri).get_run(study.state.parent_run_id)
    except Exception as err:  # the report still works without a reachable store; it says so
        print(f"report: no MLflow links ({study.state.tracking_uri}: {err})", file=sys.stderr)
        return {}, None
    experiment = parent.info.experiment_id
    url = lambda run: f"{base}/#/experiments/{experiment}/runs/{run}"  # noqa: E731
    runs = study.tables["runs"]["mlflow_run_id"].drop_nulls().to_list()
    return {run: url(run) for run in runs}, url(study.state.parent_run_id)


def _sample_trial(study: StudyTables) -> dict | None:
    """The trial whose predictions are shown: a finished one that trained on every train data
    set (lowest seed), else the finished one with the most data sets."""
    runs = study.tables["runs"].filter(pl.col("status") == "finished")
    if runs.height == 0:
        return None
    return runs.sort(["n_datasets", "seed"], descending=[True, False]).row(0, named=True)


def _checkpoint(study: StudyTables, trial: dict) -> Path:
    path = study.folder / "trials" / trial["trial_id"] / trial["mlflow_run_id"] / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"trial {trial['trial_id']}: model checkpoint {path} does not exist")
    return path


def _samples_section(study: StudyTables, per_task: int, figures_dir: Path, figures: dict[str, Path]) -> str:
    from omgseg.dashboards.samples import picture_png, sample_pictures
    from omgseg.model.checkpoint import load_checkpoint

    trial = _sample_trial(study)
    if trial is None or per_task == 0:
        return '<p class="note">No finished trial to show predictions of.</p>' if per_task else \
            '<p class="note">Predictions were not asked for (--samples 0).</p>'
    clip = study.config.train.model.clip_checkpoint
    model, _ = load_checkpoint(_checkpoint(study, trial), clip_checkpoint=str(clip) if clip else None)
    evaluation = study.config.evaluated()
    shard_dirs = {name: study.config.data.shard_dir(name, "val") for name in evaluation}
    parts = [f'<p class="note">Trial <b>{html.escape(trial["trial_id"])}</b> on {per_task} val clip(s) per data set '
             "and task. Top row: ground truth; bottom row: prediction; one column per frame. Colours follow segment "
             "ids, so a track keeps its colour across frames. White dots: click prompts; white boxes: VOS box "
             "prompts.</p>"]
    for k, picture in enumerate(sample_pictures(model, shard_dirs, evaluation, per_task)):
        data = picture_png(picture)
        name = f"sample_{k:02d}_{picture.dataset}_{picture.task}"
        path = figures_dir / f"{name}.png"
        path.write_bytes(data)
        figures[name] = path
        parts.append(f"<figure>{_img(data, name)}<figcaption>{html.escape(picture.dataset)} / "
                     f"{html.escape(picture.task)}, clip {html.escape(picture.key)}</figcaption></figure>")
    return "\n".join(parts)


def build_report(folder: Path, *, out: Path | None = None, mlflow_url: str = "http://127.0.0.1:5000",
                 samples: int = 2, log_to_mlflow: bool = True) -> Report:
    study = StudyTables(folder)
    out = Path(out) if out is not None else study.folder / "report" / "index.html"
    figures_dir = out.parent / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    tables = study.tables
    rendered = _draw_figures(study, figures_dir)
    figures = {name: figures_dir / f"{name}.png" for name in rendered}

    def figure_or_note(name: str, caption: str) -> str:
        if name not in rendered:
            return f'<p class="note">Nothing to draw for {html.escape(name)}: its table is empty.</p>'
        return f"<figure>{_img(rendered[name], name)}<figcaption>{caption}</figcaption></figure>"

    links, parent_url = _mlflow_links(study, mlflow_url)
    runs = tables["runs"]
    body = {
        "summary": _summary_html(study, parent_url),
        "influence": "".join(figure_or_note(f"influence_{family}_{kind}", INFLUENCE_CAPTION)
                             for family in ("primary", "secondary") for kind in KINDS
                             if f"influence_{family}_{kind}" in rendered)
        + _table(tables["influence"].drop("study")),
        "correlation": figure_or_note("correlation", "Spearman correlation of two targets' values across trials; grey "
                                      "where fewer than 3 trials have both or a metric is constant."),
        "metrics": figure_or_note("metrics", "Every trial's value of each target metric, coloured by combination."),
        "affinity": figure_or_note("affinity_vs_influence", "Each ordered pair of train data sets: the mean TAG "
                                   "look-ahead affinity measured inside the all-data-set trials against the exhaustive "
                                   "pair influence.") + _table(tables["affinity"].drop("study")),
        "runs": _table(runs.drop("study", "error"), links),
        "samples": _samples_section(study, samples, figures_dir, figures),
    }
    titles = {"summary": "Summary", "influence": "Influence", "correlation": "Task correlation",
              "metrics": "Metrics of every trial", "affinity": "Cheap versus exhaustive estimate", "runs": "Runs",
              "samples": "Predictions on validation clips"}
    sections = "\n".join(f'<section id="{s}"><h2>{titles[s]}</h2>\n{body[s]}\n</section>' for s in SECTIONS)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>omgseg study "
            f"{html.escape(study.config.name)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>omgseg study: {html.escape(study.config.name)}</h1>\n{sections}\n</body></html>\n")
    partial = out.with_name(out.name + ".partial")
    partial.write_text(page)
    partial.replace(out)
    if log_to_mlflow:
        _log(study, out, figures)
    return Report(html=out, figures=figures)


INFLUENCE_CAPTION = ("Colour: relative delta of the target when the source data set is added, signed so that blue "
                     "helps and red hurts whatever the metric's direction (clipped to +-100 %). Number: the delta "
                     "(validation loss, or metric points). Hatched cells marked '?': not significant after "
                     "Benjamini-Hochberg correction; 'floor'/'ceiling': the metric sits at its bound, untestable.")


def _draw_figures(study: StudyTables, figures_dir: Path) -> dict[str, bytes]:
    """Every figure with something to draw, written as figures_dir/<name>.png; {name: PNG bytes}."""
    tables = study.tables
    drawn = {
        f"influence_{family}_{kind}": influence_heatmap(tables["influence"], kind, family)
        for family in ("primary", "secondary") for kind in KINDS
    }
    drawn |= {
        "correlation": correlation_heatmap(tables["correlation"]),
        "metrics": metric_bars(tables["metrics"], [(t.dataset, t.task, t.metric) for t in targets(study.config)]),
        "affinity_vs_influence": affinity_scatter(study.summary.estimates),
    }
    rendered = {}
    for name, figure in drawn.items():
        if figure is not None:
            rendered[name] = png_bytes(figure)
            (figures_dir / f"{name}.png").write_bytes(rendered[name])
    return rendered


def _summary_rows(study: StudyTables) -> list[tuple[str, str]]:
    """The summary table's (label, text) rows, from summary.json's typed record."""
    summary, config, runs = study.summary, study.config, study.tables["runs"]
    estimates, rho = summary.estimates, summary.estimates.spearman
    finished = runs.filter(pl.col("status") == "finished").height
    significant = "; ".join(f"{key}: {v.significant_after_correction} of {v.tested} tested"
                            + ("" if v.median_mde is None else f" (median MDE {v.median_mde:.3g} before correction, "
                                                               f"{v.median_mde_adjusted:.3g} after)")
                            for key, v in summary.significant.items())
    null = "; ".join(f"{family}: {v.significant_after_correction} of {v.tests} ({'passed' if v.passed else 'FAILED'})"
                     for family, v in summary.null_check.items() if v.tests)
    rows = [
        ("study", config.name), ("trials", f"{finished} finished of {runs.height}"),
        ("train data sets", ", ".join(config.trained())),
        ("seeds", ", ".join(map(str, config.seeds))),
        ("budget", f"{config.budget}: {config.train.steps} steps per data set" if config.budget == "per_dataset"
         else f"total: {config.train.steps} steps per trial"),
        ("rows significant after correction (BH, q <= 0.05)", significant or "n/a"),
        ("A/A null check: split-seed contrasts significant", null or "n/a (needs 4 seeds)"),
        ("affinity vs influence (Spearman)", "n/a" if rho is None else f"{rho:.3f} over {estimates.n_pairs} pairs"),
        ("cost: exhaustive / affinity trial-hours",
         f"{estimates.exhaustive_trial_hours:.3f} / {estimates.affinity_trial_hours:.3f}"),
        ("MLflow", study.state.tracking_uri),
    ]
    if summary.planted is not None:
        planted = summary.planted
        rows.insert(6, ("planted effects recovered", f"{planted.agree} of {planted.total} agree on the "
                        f"{planted.kind} rows; {planted.false_positives_on_none} false positives on 'none'"))
    for rec in summary.recommendations:
        low, high = rec.predicted_ci
        shares = ", ".join(f"{n} {v:.2f}" for n, v in rec.shares.items() if v > 0)
        text = (f"{' + '.join(rec.subset)} at {shares}; predicted {rec.predicted:.4g} [{low:.4g}, {high:.4g}] "
                f"({rec.source})")
        if rec.verification is not None:
            v = rec.verification
            text += ("; verified: beats " + ", ".join(c.baseline for c in v.comparisons) if v.confirmed
                     else f"; not confirmed: did not beat {', '.join(v.not_beaten)}")
        rows.append((f"recommended for {rec.objective!r} (a prediction from a fit)", text))
    for fit in summary.surrogate:
        quality = "n/a" if fit.r2 is None else f"R^2 {fit.r2:.2f}, RMSE {fit.rmse:.3g}"
        rows.append((f"surrogate of {fit.dataset} {fit.task} on held-out subsets",
                     f"{quality} ({fit.parameters} parameters, {fit.subsets} subsets)"))
    return rows


def _summary_html(study: StudyTables, parent_url: str | None) -> str:
    out = "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                              for k, v in _summary_rows(study)) + "</table>"
    if parent_url:
        out += f'<p><a href="{html.escape(parent_url)}">The study\'s parent run in the MLflow UI</a> ' \
               f'(start it with <code>omgseg ui {html.escape(str(study.folder))}</code>).</p>'
    failed = study.tables["runs"].filter(pl.col("status") != "finished")
    if failed.height:
        out += '<p class="failed">Failed trials: ' + html.escape(", ".join(failed["trial_id"].to_list())) + "</p>"
    return out


def _log(study: StudyTables, page: Path, figures: dict[str, Path]) -> None:
    import mlflow

    client = mlflow.MlflowClient(study.state.tracking_uri)
    for path in [page, *figures.values()]:
        client.log_artifact(study.state.parent_run_id, str(path), artifact_path="report")


def build_parser(prog: str = "omgseg report") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Write a study's HTML report and PNG figures "
                                     "(also logged to the study's MLflow parent run).")
    parser.add_argument("study_dir", help="the study folder (the --out of the study)")
    parser.add_argument("--out", help="HTML file to write (default: STUDY_DIR/report/index.html; figures beside it)")
    parser.add_argument("--mlflow-url", default="http://127.0.0.1:5000", help="MLflow UI address the run links point to")
    parser.add_argument("--samples", type=int, default=2, help="val clips per data set and task to show predictions of (0: none)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to the study's parent run")
    return parser


def main(argv: list[str] | None = None, prog: str = "omgseg report") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        report = build_report(Path(args.study_dir), out=Path(args.out) if args.out else None, mlflow_url=args.mlflow_url,
                              samples=args.samples, log_to_mlflow=not args.no_mlflow)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"html": str(report.html), "figures": {k: str(v) for k, v in report.figures.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="report.py"))
