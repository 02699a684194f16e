"""docs/studies.md's measured tables, rendered from study folders, so that the numbers the docs
show are the numbers the code produced, and say which run and which commit they come from.

    python dashboards/doc_tables.py --default outputs/studies/default --planted outputs/studies/planted \
        [--sampled outputs/studies/planted-k8 ...] [--sweep outputs/studies/planted-sweep]
    python dashboards/doc_tables.py --run        # trains every study into fresh folders first (about 2 hours here)

Each table sits in docs/studies.md between `<!-- rendered NAME -->` and `<!-- end rendered -->`;
everything between the two markers is replaced by the table and a line that names the command,
the study folders and the commits they ran at. A block whose studies are not given is left as
it is. `--run` trains them all: the default and planted studies, the planted config with a
sampled design at each `--subsets` K, and its ratio sweep with its recommendations (anchor,
all) verified. A marker naming an unknown block, or a block missing from the docs, is an error
that names it, and the docs file is then left untouched.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from omgseg.dashboards.report import StudyTables
from omgseg.platform.records import PlantedCheck

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "studies.md"
CONFIGS = {"default": ROOT / "studies" / "configs" / "default.yaml", "planted": ROOT / "studies" / "configs" / "planted.yaml"}
BLOCK = re.compile(r"(<!-- rendered (?P<name>[\w/]+) -->\n)(?P<body>.*?)(<!-- end rendered -->)", re.S)


def _num(value: float | None, digits: int = 2, sign: bool = True) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _interval(low: float | None, high: float | None, digits: int = 2) -> str:
    return "–" if low is None else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1e}" if value < 0.001 else f"{value:.2g}"


def _significant(row: dict) -> str:
    if row["p_value"] is None:
        return f"no ({row['flag']})"
    return ("yes" if row["significant"] else "no") + (f" ({row['flag']})" if row["flag"] else "")


def _digits(row: dict) -> int:
    return 2 if row["metric"] != "val_loss" or abs(row["delta"]) >= 1 else 3


def _influence_rows(study: StudyTables, kind: str) -> list[dict]:
    rows = study.tables["influence"].filter(pl.col("kind") == kind)
    return rows.sort("family", "target_dataset", "task", "metric", "source_dataset").iter_rows(named=True)


def _target(row: dict) -> str:
    return f"{row['task']} {row['metric']}"


def default_pairs(study: StudyTables) -> str:
    lines = ["| family | source → target | target | delta | 95 % CI | adjusted CI | MDE | MDE adjusted | q | significant |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in _influence_rows(study, "pair"):
        d = _digits(r)
        lines.append(f"| {r['family']} | {r['source_dataset']} → {r['target_dataset']} | {_target(r)} | {_num(r['delta'], d)} "
                     f"| {_interval(r['ci_low'], r['ci_high'], d)} | {_interval(r['ci_low_adjusted'], r['ci_high_adjusted'], d)} "
                     f"| {_num(r['mde'], d, False)} | {_num(r['mde_adjusted'], d, False)} | {_p(r['q_value'])} "
                     f"| {_significant(r)} |")
    return "\n".join(lines)


def default_leave_one_out(study: StudyTables) -> str:
    lines = ["| family | source → target | target | with → without | delta | 95 % CI | adjusted CI | MDE | q | significant |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in _influence_rows(study, "leave_one_out"):
        d = _digits(r)
        combos = f"{'+'.join(r['with_datasets'])} → {'+'.join(r['without_datasets'])}"
        lines.append(f"| {r['family']} | {r['source_dataset']} → {r['target_dataset']} | {_target(r)} | {combos} "
                     f"| {_num(r['delta'], d)} | {_interval(r['ci_low'], r['ci_high'], d)} "
                     f"| {_interval(r['ci_low_adjusted'], r['ci_high_adjusted'], d)} | {_num(r['mde'], d, False)} "
                     f"| {_p(r['q_value'])} | {_significant(r)} |")
    return "\n".join(lines)


def _significance_lines(study: StudyTables) -> list[str]:
    summary = study.summary
    lines = []
    for key, counts in summary.significant.items():
        mde = counts.median_mde
        lines.append(f"- {key}: {counts.significant_after_correction} of {counts.tested} tested rows significant "
                     f"after correction" + ("" if mde is None else f"; median MDE {mde:.3g} before correction, "
                                            f"{counts.median_mde_adjusted:.3g} after (80 % power)"))
    for family, check in summary.null_check.items():
        if check.tests:
            lines.append(f"- A/A check, {family}: {check.significant_after_correction} of {check.tests} rows' "
                         f"seed halves differ after correction ({'passed' if check.passed else 'FAILED'})")
    return lines


def _cheap_lines(study: StudyTables) -> list[str]:
    estimates = study.summary.estimates
    if estimates.spearman is None:
        return ["- cheap estimate: no Spearman (too few pairs or no probing trial)"]
    low, high = estimates.bootstrap_95 or (None, None)
    reliability = estimates.reliability
    return [f"- cheap estimate (TAG) against the exhaustive pair influence over {estimates.n_pairs} ordered pairs: "
            f"Spearman {estimates.spearman:.2f} (permutation p {estimates.permutation_p:.2g}, bootstrap "
            f"{_interval(low, high)}), at {estimates.affinity_trial_hours:.3f} probing trial-hours against "
            f"{estimates.exhaustive_trial_hours:.3f} exhaustive (cost ratio {estimates.cost_ratio:.3f}); halves "
            f"agree at {_num(reliability['cheap'].spearman_brown, 2, False)} (cheap, Spearman-Brown) and "
            f"{_num(reliability['exhaustive'].spearman_brown, 2, False)} (exhaustive)"]


def default_summary(study: StudyTables) -> str:
    summary = study.summary
    runs = study.tables["runs"]
    wall = sum(summary.driver_seconds.values())
    lines = [f"- {summary.finished} of {summary.trials} trials finished, {summary.seeds} seeds; the driver "
             f"took {wall:.0f} s; median pairing ratio (primary pair rows) {_num(summary.pairing_ratio_median, 2, False)}",
             f"- trial-hours: {runs['wall_seconds'].sum() / 3600:.3f} in all"]
    return "\n".join(lines + _significance_lines(study) + _cheap_lines(study))


def _planted(study: StudyTables) -> PlantedCheck:
    if study.summary.planted is None:
        raise ValueError(f"{study.folder} is not a planted study: its summary.json has no planted check")
    return study.summary.planted


def planted_rows(study: StudyTables) -> str:
    planted = _planted(study)
    pair = {(r["source_dataset"], r["target_dataset"]): r for r in _influence_rows(study, "pair") if r["family"] == "primary"}
    lines = [f"| source → target | planted | {planted.kind} delta | 95 % CI | adjusted CI | q | MDE | agrees | pair delta |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in planted.pairs:
        other = pair.get((p.source, p.target))
        lines.append(f"| {p.source} → {p.target} | {p.truth} | {_num(p.delta, 3)} "
                     f"| {_interval(p.ci_low, p.ci_high, 3)} | {_interval(p.ci_low_adjusted, p.ci_high_adjusted, 3)} "
                     f"| {_p(p.q_value)} | {_num(p.mde, 2, False)} | {'yes' if p.agrees else '**no**'} "
                     f"| {_num(other['delta'] if other else None, 3)} |")
    return "\n".join(lines)


def planted_summary(study: StudyTables) -> str:
    summary = study.summary
    planted = _planted(study)
    recovered = planted.recovered
    lines = [f"- {planted.agree} of {planted.total} planted effects agree on the {planted.kind} rows: helps "
             f"{recovered['helps']}, hurts {recovered['hurts']}, none {recovered['none']} "
             f"({planted.false_positives_on_none} false positives on none)",
             f"- {summary.finished} of {summary.trials} trials finished, {summary.seeds} seeds; the driver "
             f"took {sum(summary.driver_seconds.values()):.0f} s"]
    return "\n".join(lines + _significance_lines(study) + _cheap_lines(study))


def planted_estimators(planted: StudyTables, sampled: list[StudyTables]) -> str:
    from omgseg.dashboards.estimators import estimator_table, markdown

    return markdown(estimator_table(planted, sampled))


def planted_recommendation(sweep: StudyTables) -> str:
    from omgseg.platform.study.recommend import describe

    recommendations = sweep.summary.recommendations
    if not recommendations:
        raise ValueError(f"{sweep.folder}: the study has no recommendation (omgseg recommend)")
    lines = []
    for rec in recommendations:
        lines += ["```", describe(rec), "```", ""]
        verification = rec.verification
        if verification is None:
            lines += [f"Not verified yet (`--verify --objective {rec.objective}`).", ""]
            continue
        folder = Path(verification.folder)
        shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
        lines += [f"Verification of {rec.objective!r} (`{shown}`; delta = baseline - recommended on the "
                  "objective, lower is better, so positive means the recommendation did better):", "",
                  "| baseline | shares | delta | 95 % CI | adjusted CI | q | MDE | beaten |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in verification.comparisons:
            shares = ", ".join(f"{n} {v:.2f}" for n, v in c.shares.items())
            lines.append(f"| {c.baseline} | {shares} | {_num(c.delta, 3)} | {_interval(c.ci_low, c.ci_high, 3)} "
                         f"| {_interval(c.ci_low_adjusted, c.ci_high_adjusted, 3)} | {_p(c.q_value)} "
                         f"| {_num(c.mde, 3, False)} | {'yes' if c.beaten else '**no**'} |")
        lines += ["", "**Confirmed**: it beats every baseline." if verification.confirmed else
                  f"**Not confirmed**: it did not beat {', '.join(verification.not_beaten)}.", ""]
    return "\n".join(lines).rstrip()


# name -> (the inputs it needs, how it renders them); inputs: default, planted, sweep (study folders), sampled (a list)
RENDERERS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "default/pairs": (("default",), default_pairs),
    "default/leave_one_out": (("default",), default_leave_one_out),
    "default/summary": (("default",), default_summary),
    "planted/rows": (("planted",), planted_rows),
    "planted/summary": (("planted",), planted_summary),
    "planted/estimators": (("planted", "sampled"), planted_estimators),
    "planted/recommendation": (("sweep",), planted_recommendation),
}


def _provenance(studies: list[StudyTables], command: str) -> str:
    ran = []
    for study in studies:
        commit = study.summary.commit
        ran.append(f"`{study.folder}` ran at " + ("an unknown commit (outside a git checkout)" if commit is None else
                   f"commit `{commit.removesuffix('-dirty')[:12]}`" + (" with uncommitted changes" if commit.endswith("-dirty")
                                                                      else "")))
    return f"Rendered by `{command}`; " + "; ".join(ran) + "."


def render(docs: str, inputs: dict, command: str) -> str:
    """`docs` with every block whose inputs are given replaced."""
    names = [m.group("name") for m in BLOCK.finditer(docs)]
    unknown = sorted(set(names) - set(RENDERERS))
    if unknown:
        raise ValueError(f"the docs name unknown rendered blocks {unknown} (known: {sorted(RENDERERS)})")
    ready = {n for n, (needs, _) in RENDERERS.items() if all(inputs.get(k) for k in needs)}
    missing = sorted(ready - set(names))
    if missing:
        raise ValueError(f"the docs have no block for {missing}: add `<!-- rendered NAME -->` ... `<!-- end rendered -->`")

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in ready:
            return match.group(0)
        needs, renderer = RENDERERS[name]
        args = [inputs[k] for k in needs]
        studies = [s for a in args for s in (a if isinstance(a, list) else [a])]
        body = f"{_provenance(studies, command)}\n\n{renderer(*args)}\n"
        return f"{match.group(1)}{body}{match.group(4)}"

    return BLOCK.sub(replace, docs)


SWEEP = ["combinations=[]", "control=null", "train.affinity.enabled=false", "seeds=[0, 1, 2]",
         "mixing.sampled={mixtures: 24, concentration: 1.0}", "recommend={objectives: [anchor, all]}"]


def _study(config: Path, out: Path, overrides: list[str], verify: list[str] = ()) -> Path:
    print(f"[doc_tables] running {config.relative_to(ROOT)} into {out} {' '.join(overrides)}", file=sys.stderr, flush=True)
    script = [sys.executable, str(ROOT / "studies" / "cotrain_matrix.py"), "--config", str(config), "--out", str(out), *overrides]
    for extra in [[], *(["--verify", "--objective", objective] for objective in verify)]:
        done = subprocess.run([*script, *extra], stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"the study {out} {' '.join(extra)} failed (exit {done.returncode}); its logs are in "
                               f"{out / 'logs'}")
    return out


def run_studies(folder: Path, subsets: list[int]) -> dict:
    """Every study the docs' blocks read, trained into fresh folders under `folder`, one after
    the other: the default and the planted studies, the planted config's sampled designs at
    each K of `subsets`, and its ratio sweep with its recommendations verified."""
    planted = CONFIGS["planted"]
    return {
        "default": _study(CONFIGS["default"], folder / "default", []),
        "planted": _study(planted, folder / "planted", []),
        "sampled": [_study(planted, folder / f"sampled-{k}", [f"combinations={{sampled: {{subsets: {k}, sizes: [2, 3]}}}}",
                                                                "train.affinity.enabled=false"]) for k in subsets],
        "sweep": _study(planted, folder / "sweep", SWEEP, verify=["anchor", "all"]),
    }


def build_parser(prog: str = "doc_tables.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--default", help="the folder of a study of studies/configs/default.yaml")
    parser.add_argument("--planted", help="the folder of a study of studies/configs/planted.yaml")
    parser.add_argument("--sampled", nargs="*", default=[], help="folders of planted.yaml studies with a sampled design")
    parser.add_argument("--sweep", help="the folder of a planted.yaml study with a ratio sweep and its recommendations")
    parser.add_argument("--run", action="store_true",
                        help="train every study into fresh folders under --runs first, then render from them")
    parser.add_argument("--subsets", default="8,12", help="with --run: the K of each sampled design (default 8,12)")
    parser.add_argument("--runs", default="outputs/doc-studies", help="where --run puts its study folders "
                        "(a new sub-folder per run; default outputs/doc-studies)")
    parser.add_argument("--docs", default=str(DOCS), help="the Markdown file to update (default docs/studies.md)")
    return parser


def main(argv: list[str] | None = None, prog: str = "doc_tables.py") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.run:
            folders = run_studies(Path(args.runs) / time.strftime("%Y%m%d-%H%M%S"),
                                  [int(k) for k in args.subsets.split(",")])
        else:
            folders = {"default": args.default, "planted": args.planted, "sweep": args.sweep, "sampled": args.sampled}
        folders = {k: v for k, v in folders.items() if v}
        if not folders:
            raise ValueError("give --default, --planted, --sampled or --sweep study folders, or --run")
        command = "python dashboards/doc_tables.py " + " ".join(
            f"--{name} {' '.join(map(str, folder)) if isinstance(folder, list) else folder}" for name, folder in folders.items())
        inputs = {k: [StudyTables(Path(f)) for f in v] if isinstance(v, list) else StudyTables(Path(v)) for k, v in folders.items()}
        docs = Path(args.docs)
        text = render(docs.read_text(), inputs, command)
        partial = docs.with_name(docs.name + ".partial")
        partial.write_text(text)
        partial.replace(docs)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"[doc_tables] rendered {', '.join(folders)} into {docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
