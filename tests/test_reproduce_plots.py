"""Plots of `stealguard reproduce` from hand-made rows, and the toy2d task (EDM Figure 1)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.image import imread

from stealguard.errors import UnknownNameError
from stealguard.reproduce.plots import PLOTS, chance, plot, plot_all, value
from stealguard.reproduce.spec import PlotSpec, load_spec
from stealguard.reproduce.tasks import TASKS, RunContext
from stealguard.reproduce.tasks.toy2d import Toy2dCell

torch.set_num_threads(1)


def _row(params: dict[str, Any], metrics: dict[str, float], series: dict[str, list[float]],
         paper: dict[str, float] | None = None) -> dict[str, Any]:
    return {"params": params, "metrics": metrics, "series": series, "paper": paper or {}}


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    rng = random.Random(0)
    out = [_row({"victim": {"dataset": "mnist"}, "defense": {"name": "none", "params": {}}},
                {"clone_accuracy": 0.95, "defender_accuracy": 0.99, "victim_accuracy": 0.99},
                {}, {"clone_accuracy": 99.1})]
    for name in ("mad", "reverse_sigmoid"):
        for eps in (1.0, 0.1, 0.5):  # not in x order: lines must sort by x
            out.append(_row(
                {"victim": {"dataset": "mnist"}, "defense": {"name": name, "params": {"eps": eps}},
                 "budget": int(eps * 1000)},
                {"clone_accuracy": 0.9 - 0.5 * eps, "defender_accuracy": 0.99 - 0.05 * eps,
                 "l1_mean": eps, "victim_accuracy": 0.99},
                {"coherence": [rng.random() for _ in range(50)],
                 "angle": [rng.gauss(30, 10) for _ in range(50)],
                 "sorted_hist": [0.6, 0.3, 0.1]},
                {"clone_accuracy": 60.0} if eps == 0.5 else None))
    # a cell whose metrics are NaN and whose series are empty
    out.append(_row({"victim": {"dataset": "mnist"}, "defense": {"name": "mad", "params": {}}},
                    {"clone_accuracy": math.nan, "defender_accuracy": math.nan},
                    {"coherence": [], "angle": [], "sorted_hist": []}))
    return out


KINDS = [
    PlotSpec(kind="tradeoff", x="clone_accuracy", y="defender_accuracy", series="defense.name",
             facet="victim.dataset"),
    PlotSpec(kind="tradeoff", x="clone_accuracy", y="l1_mean", series="defense.name"),
    PlotSpec(kind="curve", x="budget", y="clone_accuracy", series="defense.name"),
    PlotSpec(kind="cdf", x="coherence", series="defense", facet="victim.dataset"),
    PlotSpec(kind="histogram", x="angle", series="defense.name"),
    PlotSpec(kind="bars", x="sorted_hist", series="defense.name"),
    PlotSpec(kind="bars", x="clone_accuracy", series="defense.name", group="victim.dataset"),
]


def _png_ok(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.mark.parametrize("spec", KINDS, ids=lambda s: f"{s.kind}-{s.x}-{s.y}")
def test_each_kind_writes_a_png_with_nan_and_empty_rows(spec, rows, tmp_path):
    out = plot(spec, rows, tmp_path / "sub" / "fig.png", title="t")
    assert out == tmp_path / "sub" / "fig.png"
    _png_ok(out)


@pytest.mark.parametrize("kind", sorted(PLOTS.names()))
def test_every_kind_draws_no_rows_as_an_empty_plot(kind, tmp_path):
    _png_ok(plot(PlotSpec(kind=kind, x="clone_accuracy", y="defender_accuracy"), [],
                 tmp_path / f"{kind}.png"))


def test_unknown_kind_is_refused_with_the_valid_kinds(tmp_path):
    bad = PlotSpec.model_construct(kind="pie", x="clone_accuracy")
    with pytest.raises(UnknownNameError, match=r"unknown plot kind 'pie'.*regions.*tradeoff"):
        plot(bad, [], tmp_path / "pie.png")
    assert not (tmp_path / "pie.png").exists()


def _lines_by_label(fig) -> dict[str, Any]:
    return {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}


def test_tradeoff_marks_undefended_ideal_and_paper_and_orders_by_x(rows):
    spec = KINDS[0]
    fig = PLOTS.get("tradeoff")(spec, rows)
    lines = _lines_by_label(fig)
    assert list(lines["undefended"].get_xydata()[0]) == pytest.approx([95.0, 99.0])
    # ideal defense: chance-level attacker (MNIST: 10 classes), undefended defender accuracy
    assert list(lines["ideal defense"].get_xydata()[0]) == pytest.approx([10.0, 99.0])
    mad = lines["MAD"].get_xydata()  # the paper's name, not the registry's "mad"
    assert list(mad[:, 0]) == pytest.approx([40.0, 65.0, 85.0])  # sorted, NaN row left out
    hollow = sorted(tuple(ln.get_xydata()[0]) for ln in fig.axes[0].get_lines()
                    if ln.get_markerfacecolor() == "none")
    # the paper's clone accuracy at our defender accuracy: mad and reverse_sigmoid at eps 0.5,
    # and the undefended cell
    assert hollow == [pytest.approx((60.0, 96.5))] * 2 + [pytest.approx((99.1, 99.0))]


def test_values_are_percent_for_accuracies_and_field_paths_for_the_rest(rows):
    r = rows[1]
    assert value(r, "clone_accuracy") == pytest.approx(40.0)
    assert value(r, "l1_mean") == pytest.approx(1.0)
    assert value(r, "budget") == 1000.0
    assert math.isnan(value(r, "no_such_metric"))
    assert chance(rows) == pytest.approx(10.0)


def test_plot_all_names_files_after_the_spec(rows, tmp_path):
    specs = [KINDS[0], PlotSpec(kind="cdf", x="coherence", file="coherence-cdf")]
    paths = plot_all(specs, rows, tmp_path, spec_name="mad-fig3")
    assert paths == [tmp_path / "mad-fig3-tradeoff-0.png", tmp_path / "coherence-cdf.png"]
    for p in paths:
        _png_ok(p)


# --- toy2d (EDM Figure 1) ------------------------------------------------------------------

# the paper's setting (binary, two members) at a size that runs in ~2 s; on seeds 0-4 the EDM
# clone reached 55 / 49 / 61 / 89 / 63 % against 99-100 % for the undefended target's clone
QUICK = {"classes": 2, "members": 2, "n_train": 200, "n_queries": 200, "epochs": 150,
         "clone_epochs": 200, "grid_size": 30, "n_show": 100, "seed": 1}


@pytest.fixture(scope="module")
def toy_rows(tmp_path_factory) -> dict[str, dict[str, Any]]:
    task = TASKS.get("toy2d")
    ctx = RunContext(device=torch.device("cpu"), artifacts=tmp_path_factory.mktemp("art"))
    out = {}
    for training in ("standard", "edm"):
        cell = Toy2dCell(training=training, **QUICK)
        res = task.run(cell, ctx)
        out[training] = _row(cell.model_dump(), res.metrics, res.series)
    return out


def test_toy2d_metrics_and_series_are_consistent(toy_rows):
    for r in toy_rows.values():
        m, s = r["metrics"], r["series"]
        for k in ("target_accuracy", "clone_accuracy", "agreement"):
            assert 0.0 <= m[k] <= 1.0
        assert len(s["extent"]) == 4
        for g in ("target_grid", "clone_grid", "hash_grid"):
            assert len(s[g]) == QUICK["grid_size"] ** 2
            assert set(s[g]) <= set(range(QUICK["members" if g == "hash_grid" else "classes"]))
        assert len(s["train_x"]) == len(s["train_y"]) == len(s["train_label"]) == QUICK["n_show"]
        assert len(s["query_x"]) == len(s["query_y"]) == len(s["query_label"]) == m["queries"]
        assert m["queries"] > 0.9 * QUICK["n_queries"]
        # the queries are OOD: none within query_margin (0.3) of a training point
        q = torch.tensor([s["query_x"], s["query_y"]]).T
        train = torch.tensor([s["train_x"], s["train_y"]]).T
        assert torch.cdist(q, train).min() > 0.3
    assert set(toy_rows["standard"]["series"]["hash_grid"]) == {0.0}  # one model answers


def test_toy2d_edm_keeps_accuracy_but_its_clone_is_worse(toy_rows):
    std, edm = toy_rows["standard"]["metrics"], toy_rows["edm"]["metrics"]
    assert std["target_accuracy"] > 0.95 and edm["target_accuracy"] > 0.95
    assert std["clone_accuracy"] > 0.95  # the undefended target is stolen
    assert edm["clone_accuracy"] < std["clone_accuracy"] - 0.15


def test_toy2d_is_deterministic():
    task = TASKS.get("toy2d")
    ctx = RunContext(device=torch.device("cpu"), artifacts=Path("unused"))
    cell = Toy2dCell(training="edm", n_train=50, n_queries=40, epochs=5, clone_epochs=5,
                     grid_size=4, seed=3)
    a, b = task.run(cell, ctx), task.run(cell, ctx)
    assert a.metrics == b.metrics and a.series == b.series


def test_regions_draws_the_toy_rows(toy_rows, tmp_path):
    spec = load_spec("edm-fig1")
    assert [c.training for c in spec.cells("quick")] == ["standard", "edm"]
    (regions,) = [p for p in spec.plots if p.kind == "regions"]
    rows = [toy_rows["standard"], toy_rows["edm"], _row({"training": "edm"}, {}, {})]
    _png_ok(plot(regions, rows, tmp_path / "fig1.png"))
    fig = PLOTS.get("regions")(regions, rows)
    assert len(fig.axes) == 9  # three panels per row, the row without series says "no data"


# --- reading like the paper: names, one legend outside, no silent averaging ---------------


def test_labels_are_the_papers_names_and_the_legend_is_outside_the_panels(rows):
    fig = PLOTS.get("tradeoff")(KINDS[0], rows)
    ax = fig.axes[0]
    assert ax.get_title().startswith("MNIST (")  # not "victim.dataset = mnist"
    assert ax.get_xlabel() == "Acc(attacker) (%)" and ax.get_ylabel() == "Acc(defender) (%)"
    assert ax.get_legend() is None and len(fig.legends) == 1  # one figure legend, outside
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "MAD" in texts and "reverse-sigmoid" in texts and "undefended" in texts


def test_the_dp_sgd_series_is_named_dp_sgd_not_none(rows):
    dp = _row({"victim": {"dataset": "mnist", "training": "dp_sgd"},
               "defense": {"name": "none", "params": {}}},
              {"clone_accuracy": 0.5, "defender_accuracy": 0.7, "victim_accuracy": 0.7}, {})
    fig = PLOTS.get("tradeoff")(KINDS[0], [*rows, dp])
    lines = _lines_by_label(fig)
    assert "DP-SGD" in lines and "none" not in lines
    assert list(lines["DP-SGD"].get_xydata()[0]) == pytest.approx([50.0, 70.0])


def test_edm_table3_bars_never_average_soft_and_hard_labels():
    spec = load_spec("edm-table3")
    bars = [p for p in spec.plots if p.kind == "bars"]
    assert sorted(tuple(p.where.get("options.labels", [])) for p in bars) == [("hard",),
                                                                             ("soft",)]
    rows = [_row({"victim": {"dataset": "mnist", "training": "edm"}, "attack": "knockoff",
                  "options": {"labels": lab}}, {"clone_accuracy": acc}, {},
                 {"clone_accuracy": paper})
            for lab, acc, paper in (("soft", 0.40, 51.34), ("hard", 0.20, 30.0))]
    soft = [r for r in rows if r["params"]["options"]["labels"] == "soft"]
    fig = PLOTS.get("bars")(bars[0] if bars[0].where["options.labels"] == ["soft"] else bars[1],
                            soft)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [pytest.approx(40.0)]  # the soft value, next to the paper's soft diamond
    # a bar whose cells differ in more than the seed says so on the panel
    fig = PLOTS.get("bars")(PlotSpec(kind="bars", x="clone_accuracy", series="victim.training",
                                     group="attack"), rows)
    assert "options.labels" in fig.axes[0].get_xlabel()
