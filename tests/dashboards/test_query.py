"""omgseg query: Polars SQL over the tables of one or several studies, and its errors."""

import polars as pl
import pytest

from omgseg.dashboards.query import QueryError, load_tables, main, run_query
from omgseg.platform.records import DatasetEvaluation, Evaluation, TrialRecord
from omgseg.platform.study.design import StudyDesign
from omgseg.platform.study.plan import Target
from omgseg.platform.study.results import build_tables, write_tables


def _study(folder, name: str, bonus: float) -> None:
    records = []
    for combo, seed, pq in (("a", 0, 10.0), ("a", 1, 12.0), ("a+b", 0, 13.0 + bonus), ("a+b", 1, 17.0 + bonus)):
        datasets = combo.split("+")
        records.append(TrialRecord(trial_id=f"{combo}-s{seed}", combination=combo, datasets=datasets,
                                   ratios=[1 / len(datasets)] * len(datasets), seed=seed, steps=5, status="finished",
                                   mlflow_run_id=f"{name}-{combo}-{seed}", wall_seconds=60.0, seconds={"train": 20.0},
                                   metrics=Evaluation({"a": DatasetEvaluation({"panoptic": {"PQ": pq}})})))
    design = StudyDesign(train=("a", "b"), combinations=(("a",), ("b",), ("a", "b")))
    write_tables(build_tables(name, records, design, [Target("a", "panoptic", "PQ", "higher", False)]), folder)


@pytest.fixture
def studies(tmp_path):
    _study(tmp_path / "one", "one", 0.0)
    _study(tmp_path / "two", "two", 10.0)
    return tmp_path / "one", tmp_path / "two"


def test_a_join_across_tables(studies):
    tables = load_tables([studies[0]])
    out = run_query("SELECT r.combination, avg(m.value) AS pq FROM metrics m JOIN runs r ON m.trial_id = r.trial_id "
                    "WHERE m.metric = 'PQ' GROUP BY r.combination ORDER BY r.combination", tables)
    assert out.rows() == [("a", 11.0), ("a+b", 15.0)]  # (10 + 12) / 2, (13 + 17) / 2


def test_several_studies_are_told_apart_by_the_study_column(studies):
    tables = load_tables(list(studies))
    out = run_query("SELECT study, delta FROM influence WHERE kind = 'pair' ORDER BY study", tables)
    assert [r[0] for r in out.rows()] == ["one", "two"]
    assert [r[1] for r in out.rows()] == pytest.approx([4.0, 14.0])
    assert run_query("SELECT count(*) AS n FROM runs", tables)["n"].item() == 8


def test_cli_prints_writes_csv_and_parquet(studies, tmp_path, capsys):
    assert main(["SELECT trial_id, wall_seconds - train_seconds AS other FROM runs ORDER BY trial_id", "--tables",
                 str(studies[0])]) == 0
    printed = capsys.readouterr().out
    assert "a+b-s1" in printed and "40.0" in printed
    assert main(["SELECT * FROM runs", "--tables", str(studies[0]), "--out", str(tmp_path / "runs.csv")]) == 0
    csv = pl.read_csv(tmp_path / "runs.csv")
    assert csv.height == 4 and csv.filter(pl.col("trial_id") == "a+b-s0")["train_datasets"].item() == "a,b"  # lists joined
    assert main(["SELECT * FROM influence", "--tables", str(studies[0]), "--out", str(tmp_path / "i.parquet")]) == 0
    assert pl.read_parquet(tmp_path / "i.parquet").height == 2


def test_bad_sql_and_bad_folders_give_one_clear_line(studies, tmp_path, capsys):
    assert main(["SELEC * FROM runs", "--tables", str(studies[0])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("omgseg query: error: the SQL statement failed:") and len(err.splitlines()) == 1
    assert main(["SELECT nope FROM runs", "--tables", str(studies[0])]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["SELECT * FROM kitti", "--tables", str(studies[0])]) == 1
    assert "kitti" in capsys.readouterr().err
    assert main(["SELECT 1", "--tables", str(tmp_path / "nowhere")]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(QueryError, match="no result tables"):
        load_tables([tmp_path / "empty"])
    assert main(["SELECT * FROM runs", "--tables", str(studies[0]), "--out", str(tmp_path / "x.json")]) == 1
    assert "write .csv or .parquet" in capsys.readouterr().err
