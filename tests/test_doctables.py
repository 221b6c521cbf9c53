"""Tables of a markdown document redrawn from stored results (curvinf.study.doctables)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from curvinf import Regularization, TrainingRecipe
from curvinf.cli import app
from curvinf.study import LDSSettings, Preset, run_grid
from curvinf.study.doctables import fill_tables
from curvinf.study.report import protocol_table, stored_results, tally_table

pytestmark = pytest.mark.filterwarnings("ignore::curvinf.groundtruth.RetrainingWarning")


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """Two tiny grids of one configuration each, as two protocols."""
    root = tmp_path_factory.mktemp("grids")
    for name, seed in (("one", 0), ("two", 1)):
        preset = Preset(
            name=name,
            dataset="diabetes",
            depths=(1,),
            widths=(4,),
            epochs=(3,),
            seeds=(seed,),
            recipe=TrainingRecipe(lr=0.01, batch_size=64),
            regularizations=(Regularization(damping=1e-3, eps=0.0),),
            lds=LDSSettings(num_subsets=8, num_seeds=2, num_queries=16, num_bootstrap=50),
        )
        run_grid(preset, root / name, progress=False)
    return root


def test_marked_tables_are_redrawn_and_the_rest_is_kept(grids):
    reg = "damp1e-03+eps0"
    doc = grids / "doc.md"
    text = (
        "# Title\n\nProse before.\n\n"
        f"<!-- table kind=tally dirs=one reg={reg} -->\n| stale |\n<!-- /table -->\n\n"
        "Prose between.\n\n"
        f"<!-- table kind=protocols dirs=one,two reg={reg} -->\n<!-- /table -->\nEnd.\n"
    )
    doc.write_text(text)
    assert fill_tables(doc, grids) == 2
    out = doc.read_text()
    tally = tally_table(stored_results(grids / "one")[1], reg)
    both = protocol_table(
        {"one": stored_results(grids / "one"), "two": stored_results(grids / "two")}, reg
    )
    assert out == (
        "# Title\n\nProse before.\n\n"
        f"<!-- table kind=tally dirs=one reg={reg} -->\n{tally}\n<!-- /table -->\n\n"
        "Prose between.\n\n"
        f"<!-- table kind=protocols dirs=one,two reg={reg} -->\n{both}\n<!-- /table -->\nEnd.\n"
    )
    assert "| stale |" not in out and "`one`: order by LDS" in out and "`two`" in out
    assert fill_tables(doc, grids) == 2 and doc.read_text() == out  # a second fill: same


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("kind=tally dirs=one", "needs kind=, dirs= and reg="),
        ("kind=nope dirs=one reg=damp1e-03+eps0", "unknown kind 'nope'"),
        ("kind=tally dirs=none reg=damp1e-03+eps0", "holds no results.jsonl"),
        ("kind=tally dirs=one reg=eps1e-04", "no row of one has the rule"),
        ("kind=lds dirs=one,two reg=damp1e-03+eps0", "reads one directory"),
        ("kind=lds dirs=one reg=damp1e-03+eps0 skip=slow", "skip='slow' is not known"),
        ("kind=protocols dirs=one,one reg=damp1e-03+eps0", "holds one preset twice"),
    ],
)
def test_a_bad_marker_is_refused_before_the_document_is_touched(grids, marker, message):
    doc = grids / "bad.md"
    good = "<!-- table kind=tally dirs=one reg=damp1e-03+eps0 -->\n| old |\n<!-- /table -->\n"
    text = good + f"<!-- table {marker} -->\n| old |\n<!-- /table -->\n"
    doc.write_text(text)
    with pytest.raises(ValueError, match=message):
        fill_tables(doc, grids)
    assert doc.read_text() == text
    res = CliRunner().invoke(app, ["fill-tables", str(doc), "--root", str(grids)])
    assert res.exit_code == 2 and message.split("'")[0] in res.output
    assert doc.read_text() == text


def test_a_document_without_markers_is_an_error(grids):
    doc = grids / "plain.md"
    doc.write_text("# nothing to fill\n")
    with pytest.raises(ValueError, match="has no '<!-- table"):
        fill_tables(doc, grids)


def test_skip_at_chance_leaves_out_the_models_that_learned_nothing(grids, tmp_path):
    """``skip=at-chance``: a grid whose base model is at chance (lr 1e-6, one epoch on
    digits) drops out of the table; the marker without it keeps the row."""
    preset = Preset(
        name="chance",
        dataset="digits",
        depths=(1,),
        widths=(4,),
        epochs=(1,),
        recipe=TrainingRecipe(lr=1e-6, batch_size=64),
        regularizations=(Regularization(damping=1e-3, eps=0.0),),
        rungs=("ggn", "kfac"),
        reference="ggn",
        lds=LDSSettings(num_subsets=8, num_seeds=2, num_queries=16, num_bootstrap=50),
    )
    run_grid(preset, tmp_path / "chance", progress=False)
    (tmp_path / "one").symlink_to(grids / "one")
    reg = "damp1e-03+eps0"
    doc = tmp_path / "doc.md"
    doc.write_text(
        f"<!-- table kind=protocols dirs=one,chance reg={reg} -->\n<!-- /table -->\n"
        f"<!-- table kind=protocols dirs=one,chance reg={reg} skip=at-chance -->\n"
        "<!-- /table -->\n"
    )
    fill_tables(doc, tmp_path)
    full, skipped = doc.read_text().split("skip=at-chance")
    assert "d1 w4 e1" in full and "d1 w4 e1" not in skipped  # the chance grid's row
    assert "d1 w4 e3" in full and "d1 w4 e3" in skipped  # the trained grid's row stays
