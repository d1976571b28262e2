"""The papers' figures drawn from run-store rows: one PNG per `PlotSpec`.

A row is one measured cell:

    {"params": the cell (nested dict), "metrics": {name: float},
     "series": {name: list[float]}, "paper": {metric: float}}   # paper: percent, maybe {}

Our accuracies (metric names ending in `accuracy` or `agreement`) are fractions and are drawn
in percent, next to the paper's numbers. Kinds (registered in `PLOTS`, looked up by name):

    tradeoff   MAD Fig. 3/4: x, y metrics; a line per `series` value through its operating
               points ordered by x; undefended cells (defense.name == none) as a disc, the
               ideal defense (chance-level attacker, undefended utility) as a cross
    curve      MAD Fig. A6: x a field path or metric (budget), y a metric, a line per series
    cdf        EDM Fig. 5: the empirical CDF of series[x] per cell
    histogram  MAD Fig. 6: a histogram of the raw values series[x] per series value
    bars       EDM Fig. 6/7 when series[x] is an array (a sorted index histogram: bars at
               1..n); otherwise the metric x as grouped bars (categories = `group`)
    regions    EDM Fig. 1 (task toy2d): per cell, target regions + data, queries, clone regions

`facet` makes one panel per value of that field path; `group` splits lines (line style) or
bar categories. The paper's number is a hollow marker at our point (or at the bar). Rows
without a value are skipped and counted in the panel's title; an empty panel says so.
Axes, panels and legends use the papers' names (`display`: "MNIST", "MAD-argmax",
"Acc(attacker) (%)"), not field paths; one legend per figure, outside the panels, with the
same colour for a series in every panel. A bar never silently averages cells that differ in
anything but their seed: such a panel says what it averaged over (filter with `where`).
Figures are `matplotlib.figure.Figure` objects written by the Agg canvas: no pyplot, no
display, no global state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import cycle
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from stealguard.data.loaders import DATASET_INFO
from stealguard.registry import Registry
from stealguard.reproduce.spec import PlotSpec, get_path

Row = Mapping[str, Any]
Palette = dict[str, str]  # series label -> colour, the same in every panel of a figure
Draw = Callable[[Axes, PlotSpec, list[Row], Palette], int]  # one panel, returns rows skipped

PLOTS: Registry[Callable[[PlotSpec, list[Row]], Figure]] = Registry("plot kind")
COLORS = [f"C{i}" for i in range(10)]
LINESTYLES = ["-", "--", ":", "-."]


# --- names as the papers write them ----------------------------------------------------

METRIC_NAMES = {
    "clone_accuracy": "Acc(attacker)", "defender_accuracy": "Acc(defender)",
    "victim_accuracy": "target accuracy", "agreement": "agreement with the target",
    "normalized_accuracy": "normalised clone accuracy", "l1_mean": "L1 distance ||ỹ - y||₁",
    "l2_mean": "L2 distance ||ỹ - y||₂", "kl_mean": "KL(y || ỹ)", "budget": "queries",
    "ratio": "defended / undefended time",
}
FIELD_NAMES = {
    "victim.dataset": "dataset", "victim.training": "target", "defense.name": "defense",
    "defense": "defense", "attack": "attack", "options.labels": "labels",
    "options.arch": "clone architecture", "clone.optimizer": "clone optimizer",
}
VALUE_NAMES = {
    "mnist": "MNIST", "fashionmnist": "FashionMNIST", "kmnist": "KMNIST", "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100", "svhn": "SVHN", "emnist-letters": "EMNIST letters",
    "knockoff": "KnockoffNets", "jbda": "JBDA", "jbda_tr": "JBDA-TR", "jb_top3": "JB-top3",
    "jb_self": "JB-self", "adaptive_averaging": "adaptive averaging",
    "mad": "MAD", "mad_argmax": "MAD-argmax", "reverse_sigmoid": "reverse-sigmoid",
    "random_noise": "random-noise", "dp_sgd": "DP-SGD", "topk": "top-k", "rounding": "rounding",
    "edm": "EDM", "standard": "undefended", "adaptive_misinformation": "Adaptive Misinformation",
    "soft": "soft labels", "hard": "hard labels",
}


def display(text: str) -> str:
    """A label as the papers write it: "mad_argmax(epsilon=0.5) / soft" ->
    "MAD-argmax(epsilon=0.5) / soft labels"; an image folder by its folder name."""
    parts = []
    for part in text.split(" / "):
        head, paren, rest = part.partition("(")
        if head.startswith("imagefolder:"):
            head = head.rstrip("/").rsplit("/", 1)[-1]
        parts.append(VALUE_NAMES.get(head, head) + paren + rest)
    return " / ".join(parts)


def axis_name(name: str) -> str:
    """An axis title for a metric or a field path: "Acc(attacker) (%)", "queries"."""
    text = METRIC_NAMES.get(name) or FIELD_NAMES.get(name) or name.rsplit(".", 1)[-1].replace(
        "_", " ")
    return f"{text} (%)" if is_accuracy(name) else text


# --- values -----------------------------------------------------------------------------

def is_accuracy(name: str) -> bool:
    return name.endswith(("accuracy", "agreement"))


def value(row: Row, name: str) -> float:
    """A metric (accuracies in percent) or a numeric field path of the cell; NaN if absent."""
    metrics = row.get("metrics") or {}
    if name in metrics:
        v = _float(metrics[name])
        return v * 100 if is_accuracy(name) else v
    return _float(get_path(row.get("params") or {}, name, None))


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def label(row: Row, path: str) -> str:
    """The value of field path `path` of the cell, as a legend label ("" without a path)."""
    if not path:
        return ""
    params = row.get("params") or {}
    v = get_path(params, path, "?")
    if path in ("defense", "defense.name") and (v == "none" or (
            isinstance(v, Mapping) and v.get("name") == "none")):
        training = get_path(params, "victim.training", "standard")
        if training != "standard":  # the victim's training is the defense (dp_sgd, edm, ...)
            return str(training)
    if isinstance(v, Mapping) and "name" in v:  # {name, params}: a defense
        params = v.get("params") or {}
        args = ",".join(f"{k}={p}" for k, p in sorted(params.items()))
        return f"{v['name']}({args})" if args else str(v["name"])
    return str(v)


def _order(keys: Sequence[str]) -> list[str]:
    """Numbers in numeric order, then text."""
    return sorted(set(keys), key=lambda k: (math.isnan(_float(k)), _float(k), k))


def _split(rows: Sequence[Row], path: str) -> list[tuple[str, list[Row]]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(label(r, path), []).append(r)
    return [(k, out[k]) for k in _order(list(out))]


def series_values(row: Row, name: str) -> np.ndarray:
    vals = np.asarray((row.get("series") or {}).get(name) or [], dtype=float)
    return vals[np.isfinite(vals)]


def _axis_label(name: str) -> str:
    return axis_name(name)


def _note(ax: Axes, text: str, *, y: float = 0.5) -> None:
    ax.text(0.5, y, text, transform=ax.transAxes, ha="center", va="center", fontsize=8,
            color="0.4")


# --- figures ----------------------------------------------------------------------------

def _faceted(draw: Draw) -> Callable[[PlotSpec, list[Row]], Figure]:
    """One panel per value of spec.facet, each drawn by `draw`."""

    def figure(spec: PlotSpec, rows: list[Row]) -> Figure:
        facets = _split(rows, spec.facet) if rows else [("", [])]
        ncols = min(len(facets), 3)
        nrows = math.ceil(len(facets) / ncols)
        fig = Figure(figsize=(4.4 * ncols + 1.8, 3.8 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
        palette = dict(zip(_order([label(r, spec.series) for r in rows]), cycle(COLORS)))
        for ax, (name, facet_rows) in zip(axes, facets):
            skipped = draw(ax, spec, facet_rows, palette) if facet_rows else 0
            title = [display(name)] if spec.facet else []
            if skipped:
                title.append(f"({skipped} cell(s) without values)")
            ax.set_title(" ".join(title), fontsize=9)
            if not ax.has_data():
                _note(ax, "no data" if rows else "no measured cells")
        for ax in axes[len(facets):]:
            ax.set_visible(False)
        _legend(fig, list(axes[:len(facets)]))
        return fig

    return figure


def _legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for the figure, to the right of the panels (never over the data); each
    label once, in the order first drawn."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(text, handle)
    if 0 < len(seen) <= 24:
        fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=8,
                   frameon=False)


def _lines(rows: Sequence[Row], spec: PlotSpec) -> list[tuple[str, str, list[Row]]]:
    """(label, linestyle/color key, rows) for each (series, group) value."""
    out = []
    for s_name, s_rows in _split(rows, spec.series):
        for g_name, g_rows in _split(s_rows, spec.group):
            out.append((" / ".join(n for n in (s_name, g_name) if n), s_name, g_rows))
    return out


def _draw_xy(ax: Axes, spec: PlotSpec, rows: list[Row], colors: Palette, *,
             skip: Callable[[Row], bool], marker: str) -> int:
    """Lines through (x, y) ordered by x, one per (series, group); paper values hollow."""
    styles = dict(zip(_order([label(r, spec.group) for r in rows]), cycle(LINESTYLES)))
    skipped = 0
    for name, s_name, line_rows in _lines([r for r in rows if not skip(r)], spec):
        pts = _points(line_rows, spec)
        skipped += len(line_rows) - len(pts)
        color = colors[s_name]
        style = styles[label(line_rows[0], spec.group)]
        if pts:
            xs, ys = zip(*[(x, y) for x, y, _ in pts])
            ax.plot(xs, ys, linestyle=style, marker=marker, color=color,
                    label=display(name) if name else None)
        _paper(ax, spec, line_rows, color)
    ax.set_xlabel(_axis_label(spec.x))
    ax.set_ylabel(_axis_label(spec.y))
    return skipped


def _points(rows: Sequence[Row], spec: PlotSpec) -> list[tuple[float, float, Row]]:
    pts = [(value(r, spec.x), value(r, spec.y), r) for r in rows]
    return sorted((p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])),
                  key=lambda p: p[0])


def _paper(ax: Axes, spec: PlotSpec, rows: Sequence[Row], color: str) -> None:
    """A hollow marker at the paper's (x, y), our value standing in for a missing one."""
    for r in rows:
        paper = r.get("paper") or {}
        if spec.x not in paper and spec.y not in paper:
            continue
        px = _float(paper[spec.x]) if spec.x in paper else value(r, spec.x)
        py = _float(paper[spec.y]) if spec.y in paper else value(r, spec.y)
        if math.isfinite(px) and math.isfinite(py):
            _hollow(ax, px, py, color)


def _hollow(ax: Axes, x: float, y: float, color: str, marker: str = "o") -> None:
    """The paper's number; the first one on a panel gets the legend entry "paper"."""
    first = "paper" not in ax.get_legend_handles_labels()[1]
    ax.plot([x], [y], marker=marker, markersize=8, markerfacecolor="none",
            markeredgecolor=color, linestyle="none", label="paper" if first else None)


def undefended(row: Row) -> bool:
    """No output defense on a plainly trained victim (an EDM or an AM victim is a defense)."""
    params = row.get("params") or {}
    return (get_path(params, "defense.name", None) == "none"
            and get_path(params, "victim.training", "standard") == "standard")


def chance(rows: Sequence[Row]) -> float:
    """Chance-level accuracy in percent (1 / classes), NaN when the classes are unknown."""
    for r in rows:
        c = (r.get("metrics") or {}).get("chance_accuracy")
        if c is not None:
            return 100 * _float(c)
        dataset = get_path(r.get("params") or {}, "victim.dataset", None)
        info = DATASET_INFO.get(dataset) if isinstance(dataset, str) else None
        if info is not None:  # an image folder's classes are unknown here: no ideal point
            return 100 / info.num_classes
    return math.nan


def _draw_tradeoff(ax: Axes, spec: PlotSpec, rows: list[Row], colors: Palette) -> int:
    skipped = _draw_xy(ax, spec, rows, colors, skip=undefended, marker="x")
    base = _points([r for r in rows if undefended(r)], spec)
    if base:
        ax.plot([p[0] for p in base], [p[1] for p in base], "o", color="k", markersize=7,
                label="undefended", linestyle="none")
        _paper(ax, spec, [p[2] for p in base], "k")
    # ideal defense: the attacker at chance, the defender's utility of the undefended model
    if is_accuracy(spec.y):
        own = [value(r, "victim_accuracy") for r in rows] + [p[1] for p in base]
        own = [v for v in own if math.isfinite(v)]
        y_ideal = float(np.mean(own)) if own else math.nan
    else:
        y_ideal = 0.0  # no perturbation
    x_ideal = chance(rows) if is_accuracy(spec.x) else math.nan
    if math.isfinite(x_ideal) and math.isfinite(y_ideal):
        ax.plot([x_ideal], [y_ideal], "X", color="c", markersize=9, label="ideal defense",
                linestyle="none")
    return skipped


def _draw_curve(ax: Axes, spec: PlotSpec, rows: list[Row], colors: Palette) -> int:
    return _draw_xy(ax, spec, rows, colors, skip=lambda r: False, marker=".")


def _draw_cdf(ax: Axes, spec: PlotSpec, rows: list[Row], colors: Palette) -> int:
    skipped = 0
    cycle_ = cycle(COLORS)
    for r in rows:
        v = np.sort(series_values(r, spec.x))
        if v.size == 0:
            skipped += 1
            continue
        name = " / ".join(n for n in (label(r, spec.series), label(r, spec.group)) if n)
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", color=next(cycle_),
                label=display(name) if name else None)
    ax.set_xlabel(axis_name(spec.x))
    ax.set_ylabel("CDF")
    ax.set_ylim(0, 1.02)
    return skipped


def _draw_histogram(ax: Axes, spec: PlotSpec, rows: list[Row], colors: Palette) -> int:
    skipped = 0
    for name, s_rows in _split(rows, spec.series):
        color = colors.get(name, "C0")
        parts = [series_values(r, spec.x) for r in s_rows]
        skipped += sum(p.size == 0 for p in parts)
        v = np.concatenate(parts) if parts else np.empty(0)
        if v.size:
            ax.hist(v, bins=30, alpha=0.5, color=color, label=display(name) if name else None)
    ax.set_xlabel(axis_name(spec.x))
    ax.set_ylabel("count")
    return skipped


def _draw_bars(ax: Axes, spec: PlotSpec, rows: list[Row], colors: Palette) -> int:
    if any(spec.x in (r.get("series") or {}) for r in rows):
        return _draw_index_bars(ax, spec, rows, colors)
    return _draw_metric_bars(ax, spec, rows, colors)


def _draw_index_bars(ax: Axes, spec: PlotSpec, rows: list[Row], colors: Palette) -> int:
    """series[x] (a sorted histogram) as bars at 1..n, side by side per series value."""
    groups = [(n, [series_values(r, spec.x) for r in rs]) for n, rs in _split(rows, spec.series)]
    skipped = sum(v.size == 0 for _, vs in groups for v in vs)
    width = 0.8 / max(len(groups), 1)
    for i, (name, vs) in enumerate(groups):
        color = colors.get(name, "C0")
        vs = [v for v in vs if v.size]
        if not vs:
            continue
        n = max(v.size for v in vs)
        mean = np.nanmean([np.pad(v, (0, n - v.size), constant_values=np.nan) for v in vs], 0)
        pos = np.arange(1, n + 1) + (i - (len(groups) - 1) / 2) * width
        ax.bar(pos, np.nan_to_num(mean), width=width, color=color,
               label=display(name) if name else None)
    ax.set_xlabel(f"{axis_name(spec.x)} (rank)")
    ax.set_ylabel(spec.y or "value")
    return skipped


def _draw_metric_bars(ax: Axes, spec: PlotSpec, rows: list[Row], colors: Palette) -> int:
    """The metric x per category (group value), one bar per series value; paper hollow.
    A bar is the mean over its cells' seeds; if its cells differ in anything else, the
    panel's axis says what was averaged over (the spec should filter it with `where`)."""
    cats = _order([label(r, spec.group) for r in rows])
    names = _order([label(r, spec.series) for r in rows])
    width = 0.8 / max(len(names), 1)
    skipped, mixed = 0, set()
    for i, name in enumerate(names):
        color = colors.get(name, "C0")
        legend = display(name) if name else None
        for j, cat in enumerate(cats):
            cell = [r for r in rows if label(r, spec.series) == name and label(r, spec.group) == cat]
            ours = [v for v in (value(r, spec.x) for r in cell) if math.isfinite(v)]
            skipped += len(cell) - len(ours)
            mixed |= differing_fields(cell, ignore=(spec.series, spec.group, spec.facet))
            pos = j + (i - (len(names) - 1) / 2) * width
            if ours:
                ax.bar([pos], [float(np.mean(ours))], width=width, color=color, label=legend)
                legend = None  # one legend entry per series value
            paper = [_float((r.get("paper") or {}).get(spec.x)) for r in cell]
            paper = [p for p in paper if math.isfinite(p)]
            if paper:
                _hollow(ax, pos, paper[0], "k", marker="D")
    ax.set_xticks(range(len(cats)), [display(c) for c in cats], fontsize=8,
                  rotation=20 if len(cats) > 3 else 0)
    ax.set_ylabel(_axis_label(spec.x))
    if mixed:
        ax.set_xlabel(f"each bar averages over {', '.join(sorted(mixed))}", fontsize=7,
                      color="C3")
    return skipped


def differing_fields(rows: Sequence[Row], *, ignore: Sequence[str] = ()) -> set[str]:
    """The leaf field paths whose values differ among `rows` (seeds and `ignore`d paths, and
    anything below them, left out)."""
    flat = [_flatten(r.get("params") or {}) for r in rows]
    keys = set().union(*flat) if flat else set()
    skip = [p for p in ignore if p]
    out = set()
    for k in keys:
        if k == "seed" or k.endswith(".seed") or any(k == p or k.startswith(p + ".")
                                                      for p in skip):
            continue
        if len({repr(f.get(k)) for f in flat}) > 1:
            out.add(k)
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _draw_lines(ax: Axes, spec: PlotSpec, rows: list[Row], colors: Palette) -> int:
    """series[y] against series[x], one line per row (e.g. the attacker's test loss over
    training steps, MAD Fig. 7)."""
    skipped = 0
    for r, color in zip(rows, cycle(COLORS)):
        xs, ys = series_values(r, spec.x), series_values(r, spec.y)
        if xs.size == 0 or xs.size != ys.size:
            skipped += 1
            continue
        name = " / ".join(n for n in (label(r, spec.series), label(r, spec.group)) if n)
        ax.plot(xs, ys, color=color, label=display(name) if name else None)
    ax.set_xlabel(axis_name(spec.x))
    ax.set_ylabel(axis_name(spec.y))
    return skipped


PLOTS.register("lines")(_faceted(_draw_lines))
PLOTS.register("tradeoff")(_faceted(_draw_tradeoff))
PLOTS.register("curve")(_faceted(_draw_curve))
PLOTS.register("cdf")(_faceted(_draw_cdf))
PLOTS.register("histogram")(_faceted(_draw_histogram))
PLOTS.register("bars")(_faceted(_draw_bars))


# --- regions (EDM Figure 1, task toy2d) ---------------------------------------------------

REGION_PANELS = ("(a) target: training data and decisions", "(b) surrogate queries",
                 "(c) clone: decisions and training data")


@PLOTS.register("regions")
def regions(spec: PlotSpec, rows: list[Row]) -> Figure:
    """One figure row per cell: target regions + data, the queries, clone regions + data."""
    rows = rows or [{}]
    fig = Figure(figsize=(12, 3.6 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for ax_row, r in zip(axes, rows):
        s = r.get("series") or {}
        name = label(r, spec.series) if r else ""
        if not _has_regions(s):
            for ax in ax_row:
                _note(ax, "no data")
            continue
        extent = [float(v) for v in s["extent"]]
        k = int(max(max(s[g], default=0) for g in
                    ("target_grid", "clone_grid", "train_label", "query_label"))) + 1
        cmap = ListedColormap(COLORS[:max(k, 2)])
        for ax, grid_name, title in ((ax_row[0], "target_grid", REGION_PANELS[0]),
                                     (ax_row[2], "clone_grid", REGION_PANELS[2])):
            _regions(ax, s[grid_name], extent, cmap, k)
            ax.scatter(s["train_x"], s["train_y"], c=s["train_label"], cmap=cmap, vmin=-0.5,
                       vmax=k - 0.5, s=10, edgecolors="k", linewidths=0.4)
            ax.set_title(title, fontsize=9)
        ax_row[1].scatter(s["query_x"], s["query_y"], s=12, facecolors="none", linewidths=0.8,
                          edgecolors=[cmap(int(v)) for v in s["query_label"]])
        ax_row[1].set_title(REGION_PANELS[1], fontsize=9)
        ax_row[0].set_ylabel(display(name) if name else "cell")
        for ax, metric in ((ax_row[0], "target_accuracy"), (ax_row[2], "clone_accuracy")):
            v = value(r, metric)
            if math.isfinite(v):
                _note(ax, f"{metric} {v:.1f}%", y=0.04)
        for ax in ax_row:
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
            ax.set_aspect("equal")
    return fig


def _has_regions(s: Mapping[str, Any]) -> bool:
    need = ("extent", "target_grid", "clone_grid", "train_x", "train_y", "train_label",
            "query_x", "query_y", "query_label")
    return all(s.get(n) is not None for n in need) and len(s["extent"]) == 4 and all(
        _is_square(s[g]) for g in ("target_grid", "clone_grid"))


def _is_square(v: Sequence[float]) -> bool:
    n = math.isqrt(len(v))
    return n > 0 and n * n == len(v)


def _regions(ax: Axes, flat: Sequence[float], extent: list[float], cmap: ListedColormap,
             k: int) -> None:
    n = math.isqrt(len(flat))
    img = np.asarray(flat, dtype=float).reshape(n, n)  # row 0 at y0
    x0, x1, y0, y1 = extent
    ax.imshow(img, origin="lower", extent=(x0, x1, y0, y1), cmap=cmap, vmin=-0.5, vmax=k - 0.5,
              alpha=0.35, interpolation="nearest", aspect="auto")


# --- entry points -----------------------------------------------------------------------

def plot(spec: PlotSpec, rows: Sequence[Row], out: Path, *, title: str = "") -> Path:
    """Draw `rows` as `spec.kind` into the PNG `out` (parents created); returns `out`."""
    make = PLOTS.get(spec.kind)  # UnknownNameError naming the valid kinds
    fig = make(spec, list(rows))
    if title or spec.title:
        fig.suptitle(title or spec.title, fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return out


def plot_all(spec_plots: Sequence[PlotSpec], rows: Sequence[Row], out_dir: Path, *,
             spec_name: str) -> list[Path]:
    """Every plot of a spec: `<out_dir>/<file or spec_name-kind-i>.png`."""
    paths = []
    for i, ps in enumerate(spec_plots):
        name = ps.file or f"{spec_name}-{ps.kind}-{i}"
        if not name.endswith(".png"):
            name += ".png"
        keep = [r for r in rows if all(get_path(r.get("params") or {}, p, None) in vals
                                       for p, vals in ps.where.items())]
        paths.append(plot(ps, keep, Path(out_dir) / name, title=ps.title or spec_name))
    return paths
