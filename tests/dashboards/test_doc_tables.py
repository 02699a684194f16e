"""docs/studies.md's rendered tables: every block the renderer knows is in the docs, a study
folder renders into its blocks with the command and the commit, a second render changes
nothing, and a docs file with an unknown block is refused and left as it was."""

from pathlib import Path

import pytest

from omgseg.dashboards.doc_tables import BLOCK, DOCS, RENDERERS, main


def test_the_docs_hold_every_block_once():
    names = [m.group("name") for m in BLOCK.finditer(DOCS.read_text())]
    assert sorted(names) == sorted(RENDERERS)


def test_a_study_folder_renders_into_its_blocks(small_study, tmp_path):
    _, result = small_study
    docs = tmp_path / "studies.md"
    original = DOCS.read_text()
    docs.write_text(original)
    assert main(["--default", str(result.out), "--docs", str(docs)]) == 0
    text = docs.read_text()
    blocks = {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
    pairs = blocks["default/pairs"]
    assert f"Rendered by `python dashboards/doc_tables.py --default {result.out}`; `{result.out}` ran at" in pairs
    commit = result.summary.commit
    assert commit is None or f"commit `{commit[:12]}`" in pairs
    assert "| primary | davis → coco | object_queries val_loss |" in pairs
    assert "| coco+davis → coco |" in blocks["default/leave_one_out"]
    assert "6 of 6 trials finished" in blocks["default/summary"]
    original_blocks = {m.group("name"): m.group("body") for m in BLOCK.finditer(original)}
    assert blocks["planted/rows"] == original_blocks["planted/rows"]  # no planted study given: kept
    assert main(["--default", str(result.out), "--docs", str(docs)]) == 0
    assert docs.read_text() == text


def test_an_unknown_block_is_refused_and_the_docs_kept(small_study, tmp_path, capsys):
    _, result = small_study
    docs = tmp_path / "studies.md"
    docs.write_text(DOCS.read_text() + "\n<!-- rendered default/typo -->\nold\n<!-- end rendered -->\n")
    before = docs.read_text()
    assert main(["--default", str(result.out), "--docs", str(docs)]) == 1
    assert "unknown rendered blocks ['default/typo']" in capsys.readouterr().err
    assert docs.read_text() == before


@pytest.mark.parametrize("args, message", [([], "give --default, --planted, --sampled or --sweep"),
                                           (["--default", "/nonexistent/study"], "/nonexistent/study")])
def test_bad_arguments_are_one_line(args, message, tmp_path, capsys):
    assert main([*args, "--docs", str(tmp_path / "x.md")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not Path(tmp_path / "x.md").exists()
