"""`stealguard reproduce`: specs validated before anything runs, a quick spec end to end on
tiny image-folder data (table, CSV and plot files), resume, the run store's version check,
and the table generator on stored rows."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from tests.synthetic import quadrant_images

from stealguard.errors import ConfigError, UnknownNameError
from stealguard.reproduce.runner import plan, reproduce
from stealguard.reproduce.spec import Spec, expand, load_spec, spec_names
from stealguard.reproduce.store import RunRecord, RunStore, StoreVersionError
from stealguard.reproduce.tables import rows_for, table_records


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _write_folder(root: Path, n: int, seed: int) -> Path:
    """Quadrant images as <root>/<split>/<class>/<i>.png (an image-folder dataset)."""
    for split, s in (("train", seed), ("test", seed + 1)):
        x, y = quadrant_images(n, seed=s)
        for i in range(n):
            d = root / split / f"c{int(y[i])}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0].numpy()).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("quad")
    return (f"imagefolder:{_write_folder(root / 'victim', 240, 0)}",
            f"imagefolder:{_write_folder(root / 'queries', 240, 10)}")


def _spec(tmp_path: Path, folders: tuple[str, str], **over: object) -> Path:
    victim, queries = folders
    spec = {
        "name": "tiny", "paper": "mad", "ref": "test", "title": "tiny", "task": "steal",
        "defaults": {
            "victim": {"dataset": victim, "arch": "conv3",
                       "train": {"epochs": 4, "batch_size": 32, "lr": 0.05}},
            "queries": queries, "budget": 200,
            "clone": {"epochs": 4, "batch_size": 32, "lr": 0.05},
        },
        "grid": [{"defense": [{"name": "none"}, {"name": "topk", "params": {"k": 1}}],
                  "options": {"labels": ["soft"]}}],
        "scales": {"quick": {"set": {"budget": 160}}},
        "table": {"columns": {"defense": "defense.name"},
                  "metrics": ["clone_accuracy", "defender_accuracy"],
                  "compare": {"path": "defense.name", "baseline": "none",
                              "ignore": ["defense.params"]}},
        "paper_values": [{"match": {"defense.name": "none"}, "clone_accuracy": 90.0},
                         {"match": {"defense.name": "topk"}, "clone_accuracy": 80.0}],
        "plots": [{"kind": "tradeoff", "x": "clone_accuracy", "y": "defender_accuracy",
                   "series": "defense.name"}],
    }
    spec.update(over)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ---- specs ----------------------------------------------------------------------------------


def test_grid_expands_products_and_zipped_alternatives() -> None:
    block = {"each": [{"victim": {"dataset": "mnist"}, "queries": "fashionmnist"},
                      {"victim": {"dataset": "fashionmnist"}, "queries": "mnist"}],
             "victim.training": ["standard", "edm"], "options": {"labels": ["soft", "hard"]}}
    cells = list(expand(block))
    assert len(cells) == 8
    pairs = {(c["victim"]["dataset"], c["queries"]) for c in cells}
    assert pairs == {("mnist", "fashionmnist"), ("fashionmnist", "mnist")}


@pytest.mark.parametrize(("field", "value", "match"), [
    ("attack", "knockof", "unknown attack 'knockof'"),
    ("queries", "imagenette", "unknown dataset 'imagenette'"),
    ("defense", {"name": "mad", "params": {"epsilon": -1}}, "epsilon"),
    ("defense", {"name": "nope"}, "unknown defense 'nope'"),
    ("budgett", 5, "budgett: unknown field"),
    ("victim", {"dataset": "mnist", "arch": "conv4"}, "unknown model 'conv4'"),
])
def test_bad_spec_fails_before_anything_runs(tmp_path: Path, folders: tuple[str, str],
                                             field: str, value: object, match: str) -> None:
    spec = load_spec(_spec(tmp_path, folders))
    spec.grid[0][field] = value  # the grid entry wins over defaults
    with pytest.raises(ConfigError, match=match):
        reproduce(spec, results=tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "runs.db").exists() or not RunStore(
        tmp_path / "r" / "runs.db").all()


def test_unknown_spec_and_scale_are_named(tmp_path: Path, folders: tuple[str, str]) -> None:
    with pytest.raises(UnknownNameError, match="edm-table3"):
        load_spec("edm-tabel3")
    with pytest.raises(ConfigError, match="unknown scale 'huge'"):
        load_spec(_spec(tmp_path, folders)).cells("huge")


def test_packaged_specs_validate_at_both_scales() -> None:
    names = spec_names()
    assert "edm-table3" in names
    for name in names:
        s = load_spec(name)
        assert s.cells("quick"), f"{name}: no quick cells"
        assert len(s.cells("full")) >= len(s.cells("quick")) or name.startswith("edm-fig1")


# ---- end to end, resume, store --------------------------------------------------------------


def test_quick_spec_end_to_end_then_resume(tmp_path: Path, folders: tuple[str, str]) -> None:
    path = _spec(tmp_path, folders)
    results = tmp_path / "results"
    first = reproduce(path, results=results, progress=False, threads=1)
    assert (first.cells, first.ran, first.failed) == (2, 2, [])
    out = results / "quick" / "tiny"
    md = (out / "table.md").read_text()
    assert "| none |" in md and "| topk |" in md and "90.00" in md
    assert (out / "table.csv").read_text().count("\n") == 3  # header + 2 cells
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    store = RunStore(results / "runs.db")
    rows = store.all()
    assert len(rows) == 2 and all(r.version and r.device.startswith("cpu") for r in rows)
    none = next(r for r in rows if r.params["defense"]["name"] == "none")
    assert none.metrics["clone_accuracy"] > 0.5  # the quadrant task is easy to steal
    assert none.params["budget"] == 160  # the quick scale's set
    # resume: nothing runs again, the rows are untouched
    again = reproduce(path, results=results, progress=False, threads=1)
    assert (again.ran, again.skipped_stored) == (0, 2)
    assert [r.created_at for r in RunStore(results / "runs.db").all()] == \
        [r.created_at for r in rows]


def test_interrupted_run_leaves_no_row(tmp_path: Path, folders: tuple[str, str]) -> None:
    path = _spec(tmp_path, folders)
    seen: list[str] = []

    def stop(res: object) -> None:
        seen.append(res.job.kind)  # type: ignore[attr-defined]
        if res.job.kind == "cell":  # type: ignore[attr-defined]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reproduce(path, results=tmp_path / "r", progress=False, threads=1, on_result=stop)
    assert RunStore(tmp_path / "r" / "runs.db").all() == []
    # the victim was cached: the next run reuses it and measures both cells
    rep = reproduce(path, results=tmp_path / "r", progress=False, threads=1)
    assert rep.ran == 2 and len(list((tmp_path / "r" / "artifacts" / "victims").iterdir())) == 1


def test_store_from_another_version_is_reported_not_overwritten(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    RunStore(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(StoreVersionError, match="schema version 0"):
        RunStore(db)
    assert db.read_bytes() == before
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE users (id INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(StoreVersionError, match="not a run store"):
        RunStore(other)


def test_store_never_overwrites_a_key(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.db")
    rec = RunRecord("k1", "s", "quick", "steal", {"a": 1}, 0, {"clone_accuracy": 0.5})
    assert store.add(rec) is True
    assert store.add(RunRecord("k1", "s", "quick", "steal", {}, 0, {"x": 1.0})) is False
    assert store.get_many(["k1"])["k1"].metrics == {"clone_accuracy": 0.5}


# ---- the table generator on stored rows -----------------------------------------------------


def test_table_from_stored_rows_compares_with_the_paper(tmp_path: Path,
                                                        folders: tuple[str, str]) -> None:
    spec = load_spec(_spec(tmp_path, folders))
    store = RunStore(tmp_path / "runs.db")
    p = plan(spec, "quick", store, data_root=None)
    # hand-written rows: undefended clone 85 %, defended 40 % (paper: 90 -> 80)
    for key, cell, acc in zip(p.keys, p.cells, (0.85, 0.40)):
        store.add(RunRecord(key, "tiny", "quick", "steal", cell.model_dump(mode="json"), 0,
                            {"clone_accuracy": acc, "normalized_accuracy": acc / 0.95,
                             "defender_accuracy": 0.95}))
    header, recs = table_records(spec, rows_for(plan(spec, "quick", store, data_root=None),
                                                store))
    assert header[:3] == ["defense", "clone_accuracy (ours)", "clone_accuracy (paper)"]
    none, topk = recs
    assert none["clone_accuracy (ours)"] == "85.00 (0.89x)"
    assert topk["gap (ours)"] == "-45.0" and topk["gap (paper)"] == "-10.0"
    assert topk["same sign"] == "yes"
    assert "differs from the paper by -40.0 points" in topk["note"]
    assert none["note"] == ""


def test_missing_data_is_listed_not_run(tmp_path: Path, folders: tuple[str, str]) -> None:
    victim, _ = folders
    path = _spec(tmp_path, folders, grid=[{"queries": [f"imagefolder:{tmp_path}/nope"]}])
    rep = reproduce(path, results=tmp_path / "r", progress=False)
    assert (rep.cells, rep.ran, rep.missing_data) == (1, 0, 1)
    md = (tmp_path / "r" / "quick" / "tiny" / "table.md").read_text()
    assert "needs data: imagefolder:" in md


def test_cli_reproduce_dry_run_and_json(tmp_path: Path, folders: tuple[str, str]) -> None:
    from typer.testing import CliRunner

    from stealguard.cli import app

    path = _spec(tmp_path, folders)
    r = CliRunner().invoke(app, ["reproduce", str(path), "--results", str(tmp_path / "r"),
                                 "--dry-run"])
    assert r.exit_code == 0 and "2 cells, 0 stored, 0 need data, 2 to run" in r.output
    r = CliRunner().invoke(app, ["specs", "--json"])
    assert r.exit_code == 0 and "edm-table3" in {s["name"] for s in json.loads(r.output)["specs"]}


def test_spec_model_refuses_unknown_top_level_field() -> None:
    with pytest.raises(Exception, match="extra"):
        Spec.model_validate({"name": "x", "paper": "edm", "ref": "r", "title": "t",
                             "tabel": {}})


def test_rekey_finds_rows_stored_in_an_older_cell_shape(tmp_path) -> None:
    """A cell stored before attack settings moved into `options` (a `preset` beside them) is
    the same experiment: `stealguard rekey` gives it the key today's spec computes, so a run
    resumes from it and its table shows it; a row of no current cell keeps its key."""
    import json as _json

    from stealguard.reproduce.runner import plan, rekey_store
    from stealguard.reproduce.spec import load_spec
    from stealguard.reproduce.store import RunRecord, RunStore, cell_key

    spec = load_spec("edm-table3")
    cell = next(c for c in spec.cells("quick") if c.model_dump()["attack"] == "knockoff")
    legacy = {**cell.model_dump(mode="json"), "preset": "edm"}  # the old shape
    old_key = cell_key(spec.task, _json.dumps(legacy))
    store = RunStore(tmp_path / "runs.db")
    store.add(RunRecord(old_key, "edm-table3", "quick", spec.task, legacy, 0,
                        {"clone_accuracy": 0.5}))
    store.add(RunRecord("gone", "edm-table3", "quick", spec.task,
                        {**legacy, "budget": 123}, 0, {"clone_accuracy": 0.1}))
    assert len(plan(spec, "quick", store, data_root=None).stored) == 0
    assert rekey_store(store) == 1 and rekey_store(store) == 0  # once, then nothing to do
    p = plan(spec, "quick", store, data_root=None)
    assert p.stored == {cell_key(spec.task, cell.model_dump_json())}
    assert store.get_many(["gone"])["gone"].metrics["clone_accuracy"] == 0.1
    store.close()
