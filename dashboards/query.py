"""SQL over study tables: `omgseg query "SQL" [--tables STUDY_DIR ...] [--out FILE]`.

The tables runs, metrics, influence, correlation and affinity are registered under their
names in a Polars SQL context. Several study folders can be given: their tables are stacked,
and the `study` column tells them apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from omgseg.platform.study.results import SCHEMAS, TABLES

EXAMPLES = """example queries:
  # the influence matrix of pair runs, strongest effects first
  omgseg query "SELECT source_dataset, target_dataset, task, metric, delta, ci_low, ci_high
                FROM influence WHERE kind = 'pair' ORDER BY abs(delta) DESC"

  # mean PQ per combination (metrics joined with runs)
  omgseg query "SELECT r.combination, avg(m.value) AS pq FROM metrics m JOIN runs r ON m.trial_id = r.trial_id
                WHERE m.task = 'panoptic' AND m.metric = 'PQ' GROUP BY r.combination ORDER BY pq DESC"

  # where Ray's time goes
  omgseg query "SELECT trial_id, wall_seconds, train_seconds, wall_seconds - train_seconds AS other FROM runs"

  # two studies side by side
  omgseg query "SELECT study, count(*) AS trials FROM runs GROUP BY study" --tables outputs/studies/a outputs/studies/b

  # to a file (.csv or .parquet)
  omgseg query "SELECT * FROM influence" --out influence.csv
"""


class QueryError(ValueError):
    """A bad statement or table folder; the message says which."""


def load_tables(folders: list[Path]) -> dict[str, pl.DataFrame]:
    """Every table of every study folder, stacked per table name."""
    if not folders:
        raise QueryError("no study folder given (--tables DIR)")
    out: dict[str, list[pl.DataFrame]] = {name: [] for name in TABLES}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise QueryError(f"study folder {folder} does not exist")
        found = False
        for name in TABLES:
            path = folder / f"{name}.parquet"
            if path.is_file():
                found = True
                frame = pl.read_parquet(path)
                if dict(frame.schema) != SCHEMAS[name]:
                    raise QueryError(f"{path}: its columns are not those of the {name} table (written by another version?)")
                out[name].append(frame)
        if not found:
            raise QueryError(f"{folder}: no result tables ({', '.join(f'{t}.parquet' for t in TABLES)})")
    return {name: pl.concat(frames) if frames else pl.DataFrame(schema=SCHEMAS[name]) for name, frames in out.items()}


def run_query(sql: str, tables: dict[str, pl.DataFrame]) -> pl.DataFrame:
    context = pl.SQLContext(frames=tables, eager=True)
    try:
        return context.execute(sql)
    except pl.exceptions.PolarsError as err:  # syntax, unknown table or column, bad types: all the user's SQL
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QueryError(f"the SQL statement failed: {first} (tables: {', '.join(TABLES)}; "
                         f"columns: `omgseg query \"SELECT * FROM runs LIMIT 1\"`)") from None


def write(frame: pl.DataFrame, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    if out.suffix == ".csv":
        flat = frame.with_columns([pl.col(c).cast(pl.List(pl.String)).list.join(",") for c, t in frame.schema.items()
                                   if isinstance(t, pl.List)])
        flat.write_csv(partial)
    elif out.suffix == ".parquet":
        frame.write_parquet(partial)
    else:
        raise QueryError(f"--out {out}: write .csv or .parquet")
    partial.replace(out)


def build_parser(prog: str = "omgseg query") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Polars SQL over study result tables: runs, metrics, "
                                     "influence, correlation, affinity.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sql", help="the SQL statement")
    parser.add_argument("--tables", nargs="+", default=["outputs/studies/default"], metavar="STUDY_DIR",
                        help="study folders (default: outputs/studies/default)")
    parser.add_argument("--out", help="write the result to a .csv or .parquet file instead of printing it")
    parser.add_argument("--rows", type=int, default=50, help="rows to print (default 50)")
    return parser


def main(argv: list[str] | None = None, prog: str = "omgseg query") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        frame = run_query(args.sql, load_tables([Path(p) for p in args.tables]))
        if args.out:
            write(frame, Path(args.out))
            print(f"{frame.height} rows x {frame.width} columns -> {args.out}")
            return 0
    except QueryError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    with pl.Config(tbl_rows=args.rows, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=40):
        print(frame)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="query.py"))
