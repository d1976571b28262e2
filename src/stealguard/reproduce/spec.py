"""Experiment specs: one YAML file per table or figure of the two papers.

    name: edm-table3
    paper: edm                      # edm | mad
    ref: Table 3                    # where in the paper
    title: KnockoffNets, JBDA, JBDA-TR against undefended and EDM targets
    base: _edm                      # optional: deep-merge this spec over specs/_edm.yaml
                                    # (mappings merge, lists are replaced, except `rules`
                                    # and each scale's `rules`: the child's follow the base's)
    task: steal                     # a registered task (stealguard.reproduce.tasks)
    defaults: {...}                 # fields every cell starts from
    rules:                          # overrides for the matching cells, at every scale
      - {where: {attack: [jbda]}, set: {options.preset: mad}}
    grid:                           # blocks; each expands to the product of its lists
      - each:                       # alternatives merged one at a time (zipped fields)
          - {victim: {dataset: mnist}, queries: fashionmnist}
          - {victim: {dataset: fashionmnist}, queries: mnist}
        victim: {training: [standard, edm]}
        options: {labels: [soft, hard]}
    scales:
      quick: {set: {budget: 2000}, where: {victim.dataset: [mnist]}}
      full: {}
    paper_values:                   # the paper's numbers (percent), matched by field paths
      - {match: {victim.dataset: mnist, victim.training: edm, options.labels: soft},
         clone_accuracy: 51.34}
    table: {columns: {dataset: victim.dataset, ...}, metrics: [clone_accuracy],
            compare: {path: victim.training, baseline: standard}}
    plots: [{kind: tradeoff, x: clone_accuracy, y: defender_accuracy, ...}]

A cell is `defaults`, then one expanded grid entry, then the spec's `rules`, then the
scale's `set`, deep-merged in that order, then the scale's `rules` (a `set` for the cells matching its `where`), then the
command line's `--set` overrides, then validated by the task's `Cell` model, then filtered
by the scale's `where`. Every cell of every scale (quick, cpu, full) is validated when the
spec is loaded, before any filtering, so a bad dataset, defense, attack or parameter (or a
typo such as `datset:` in an entry the quick scale drops) fails before anything runs, with
the field's path.

Lists are axes: a list anywhere in a grid block is expanded (so a field whose value is a
list must be given in `defaults` or `set`, where nothing is expanded).
`${data_root}` in a string is replaced by the data root (for image-folder datasets the
shared data does not have, e.g. `imagefolder:${data_root}/Flowers17`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stealguard.errors import ConfigError, StealguardError
from stealguard.keyvalues import split_items
from stealguard.reproduce.tasks import TASKS, CellBase

SPEC_DIR = Path(__file__).with_name("specs")
SCALES = ("quick", "cpu", "full")  # quick: minutes; cpu: ~2.5 h on 2 cores; full: the papers' sizes


class Rule(BaseModel):
    """Overrides for the cells whose paths have these values (e.g. only the JBDA cells)."""

    model_config = ConfigDict(extra="forbid")

    where: dict[str, list[Any]]
    set: dict[str, Any]


class ScaleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    set: dict[str, Any] = Field(default_factory=dict, description="overrides for every cell")
    rules: list[Rule] = Field(default_factory=list, description="overrides for some cells")
    where: dict[str, list[Any]] = Field(default_factory=dict,
                                        description="keep cells whose path has one of these")
    note: str = ""


class PaperValue(BaseModel):
    """One number of the paper: `match` selects cells by field path; other keys are metrics."""

    model_config = ConfigDict(extra="allow")

    match: dict[str, Any]

    def values(self) -> dict[str, float]:
        return {k: float(v) for k, v in (self.model_extra or {}).items()}


class CompareSpec(BaseModel):
    """Pair each defended cell with the cell that differs only in `path` == `baseline`."""

    model_config = ConfigDict(extra="forbid")

    path: str
    baseline: Any
    ignore: list[str] = Field(default_factory=list,
                              description="other paths that may differ (e.g. victim.params)")


class TableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    columns: dict[str, str] = Field(description="column title -> field path of the cell")
    metrics: list[str] = Field(default_factory=lambda: ["clone_accuracy"])
    compare: CompareSpec | None = None


class PlotSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["tradeoff", "cdf", "histogram", "curve", "bars", "regions", "lines"]
    where: dict[str, list[Any]] = Field(default_factory=dict,
                                        description="draw only the cells with these values")
    x: str = ""
    y: str = ""
    series: str = ""
    group: str = ""
    facet: str = ""
    title: str = ""
    file: str = ""


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    paper: Literal["edm", "mad", "prada", "dfme-maze"]
    ref: str
    title: str
    task: str = "steal"
    base: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list, description="overrides for some cells at "
                              "every scale (before the scale's set and rules)")
    grid: list[dict[str, Any]] = Field(default_factory=lambda: [dict[str, Any]()])
    scales: dict[str, ScaleSpec] = Field(default_factory=dict)
    substitutes: list[str] = Field(default_factory=list,
                                   description="supporting data replaced, and by what")
    paper_values: list[PaperValue] = Field(default_factory=list)
    table: TableSpec | None = None
    plots: list[PlotSpec] = Field(default_factory=list)
    notes: str = ""

    @model_validator(mode="after")
    def _known(self) -> Spec:
        TASKS.get(self.task)
        for s in self.scales:
            if s not in SCALES:
                raise ConfigError(f"spec {self.name}: scales.{s}: unknown scale; valid: "
                                  f"{', '.join(SCALES)}")
        return self

    def cells(self, scale: str, *, data_root: str | Path | None = None,
              overrides: Mapping[str, Any] | None = None) -> list[CellBase]:
        """Every cell of `scale`, validated, in grid order, without duplicates.

        overrides: {field path: value} set on every cell last (after the scale's `set` and
        `rules`; `reproduce --set key=value`). Every expanded grid entry is validated before
        the scale's `where` filters it, so a typo in an entry that this scale drops still
        fails, naming the field.
        """
        if scale not in SCALES:
            raise ConfigError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
        sc = self.scale_spec(scale)
        cell_cls = TASKS.get(self.task).Cell
        forced = _unflatten(dict(overrides or {}))
        out: list[CellBase] = []
        seen: set[str] = set()
        for i, block in enumerate(self.grid):
            for raw in expand(block):
                merged = deep_merge(self.defaults, raw)
                for rule in self.rules:
                    if _matches(merged, rule.where):
                        merged = deep_merge(merged, _unflatten(rule.set))
                merged = deep_merge(merged, _unflatten(sc.set))
                for rule in sc.rules:
                    if _matches(merged, rule.where):
                        merged = deep_merge(merged, _unflatten(rule.set))
                merged = _substitute(deep_merge(merged, forced), data_root)
                where = f"spec {self.name}: grid[{i}] ({scale})"
                cell = _validate(cell_cls, merged, where)  # before filtering: typos fail
                if not _matches(merged, _substitute(sc.where, data_root)):
                    continue
                key = cell.model_dump_json()
                if key not in seen:
                    seen.add(key)
                    out.append(cell)
        return out

    def scale_spec(self, scale: str) -> ScaleSpec:
        """The scale's settings; a spec not sized for `cpu` runs its quick cells there."""
        if scale in self.scales:
            return self.scales[scale]
        if scale == "cpu" and "quick" in self.scales:
            quick = self.scales["quick"]
            return quick.model_copy(update={"note": "not sized for the cpu scale: the quick "
                                            "scale's cells. " + quick.note})
        return ScaleSpec()

    def validate_all(self, *, data_root: str | Path | None = None) -> dict[str, int]:
        """Validate every grid entry at every scale (ConfigError names the first bad field);
        return the number of cells per scale."""
        return {scale: len(self.cells(scale, data_root=data_root)) for scale in SCALES}

    def with_data_root(self, data_root: str | Path | None) -> Spec:
        """This spec with `${data_root}` filled in its paper values' matches and its scales'
        filters, as in its cells (so a paper value written with `${data_root}` finds its cell)."""
        pvs = [PaperValue.model_validate({**pv.model_dump(), "match": _substitute(pv.match,
                                                                                  data_root)})
               for pv in self.paper_values]
        return self.model_copy(update={"paper_values": pvs})


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """["budget=1000", "victim.train.epochs=1"] -> {"budget": 1000, "victim.train.epochs": 1}.
    Values are YAML scalars or flow collections ("0.5", "true", "null", "[1, 2]", "{a: 1}")."""
    out: dict[str, Any] = {}
    for key, value in split_items(items, what="--set", pattern="field.path=value",
                                  example="budget=1000 or victim.train.epochs=1", repeat=True):
        try:
            out[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}={value}: the value is not valid YAML: {e}") from None
    return out


def _matches(cell: Mapping[str, Any], where: Mapping[str, list[Any]]) -> bool:
    return all(get_path(cell, p, None) in vals for p, vals in where.items())


def _validate(cell_cls: type[CellBase], values: dict[str, Any], where: str) -> CellBase:
    try:
        return cell_cls.model_validate(values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(cell)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown field; valid fields here: {_valid_fields(cell_cls, err['loc'])}"
            problems.append(f"{loc}: {msg}")
        raise ConfigError(f"{where}: " + "; ".join(problems)) from None
    except StealguardError as e:
        raise ConfigError(f"{where}: {e}") from None


def _valid_fields(cell_cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    model: Any = cell_cls
    for part in loc[:-1]:
        info = getattr(model, "model_fields", {}).get(part)
        ann = getattr(info, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return "see the task's docs"
        model = ann
    return ", ".join(getattr(model, "model_fields", {}))


def deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(a))
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _unflatten(d: Mapping[str, Any]) -> dict[str, Any]:
    """{"victim.train.epochs": 2} -> {"victim": {"train": {"epochs": 2}}} (nested kept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        parts = k.split(".")
        node: dict[str, Any] = {parts[-1]: _unflatten(v) if isinstance(v, Mapping) else v}
        for p in reversed(parts[:-1]):
            node = {p: node}
        out = deep_merge(out, node)
    return out


def expand(block: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The product of every list in `block` (nested), for each choice of one alternative
    from every `each...` key (`each`, `each_victim`, ...: several zipped groups)."""
    block = _unflatten(block)
    groups = [block.pop(k) for k in sorted(block) if k.startswith("each")]
    for g in groups:
        if not isinstance(g, list) or not all(isinstance(a, Mapping) for a in g):
            raise ConfigError("grid: 'each...' must be a list of field mappings")
    for combo in itertools.product(*groups):
        merged = block
        for alt in combo:
            merged = deep_merge(merged, _unflatten(alt))
        axes = list(_axes(merged, ()))
        for values in itertools.product(*(vals for _, vals in axes)):
            cell = copy.deepcopy(merged)
            for (path, _), v in zip(axes, values):
                _set_path(cell, path, v)
            yield cell


def _axes(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], list[Any]]]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _axes(v, (*path, k))
    elif isinstance(node, list):
        yield path, node


def _set_path(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


_MISSING = object()


def get_path(d: Any, path: str, default: Any = _MISSING) -> Any:
    """d["a"]["b"] for "a.b" (dicts or pydantic models)."""
    node = d
    for part in path.split("."):
        if isinstance(node, BaseModel):
            node = getattr(node, part, _MISSING)
        elif isinstance(node, Mapping):
            node = node.get(part, _MISSING)
        else:
            node = _MISSING
        if node is _MISSING:
            if default is _MISSING:
                raise KeyError(path)
            return default
    return node


def _substitute(node: Any, data_root: str | Path | None) -> Any:
    if isinstance(node, str) and "${data_root}" in node:
        from stealguard.data import resolve_data_root

        return node.replace("${data_root}", str(resolve_data_root(data_root)))
    if isinstance(node, Mapping):
        return {k: _substitute(v, data_root) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, data_root) for v in node]
    return node


def spec_names(spec_dir: Path = SPEC_DIR) -> list[str]:
    """The runnable specs (files starting with `_` are bases, not listed)."""
    return sorted(p.stem for p in spec_dir.glob("*.yaml") if not p.name.startswith("_"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a spec must be a YAML mapping")
    return data


def load_spec(name_or_path: str | Path, *, spec_dir: Path = SPEC_DIR,
              validate: bool = True) -> Spec:
    """A spec by name (`edm-table3`, from the packaged specs) or by path to a YAML file.

    validate: check every cell of every scale now (a bad field fails here, naming it)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = spec_dir / f"{name_or_path}.yaml"
        if not path.exists():
            from stealguard.errors import UnknownNameError

            raise UnknownNameError("spec", str(name_or_path), spec_names(spec_dir))
    elif not path.exists():
        raise ConfigError(f"spec file {path} does not exist")
    data = _read_yaml(path)
    seen = {path.resolve()}
    while data.get("base"):
        base_path = path.parent / f"{data['base']}.yaml"
        if not base_path.exists():
            base_path = spec_dir / f"{data['base']}.yaml"
        if not base_path.exists() or base_path.resolve() in seen:
            raise ConfigError(f"{path}: base {data['base']!r} not found (or circular)")
        seen.add(base_path.resolve())
        base = _read_yaml(base_path)
        child = {k: v for k, v in data.items() if k != "base"}
        merged = deep_merge(base, child)
        if base.get("rules") and child.get("rules"):  # a child's rules follow its base's
            merged["rules"] = [*base["rules"], *child["rules"]]
        for scale, sc in (merged.get("scales") or {}).items():  # a child's rules add to its base's
            base_rules = ((base.get("scales") or {}).get(scale) or {}).get("rules") or []
            child_rules = ((child.get("scales") or {}).get(scale) or {}).get("rules") or []
            if isinstance(sc, dict) and base_rules and child_rules:
                sc["rules"] = [*base_rules, *child_rules]
        data = merged
        data["base"] = base.get("base")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or '(spec)'}: {err['msg']}"
                    for err in e.errors()]
        raise ConfigError(f"{path}: " + "; ".join(problems)) from None
    except StealguardError as e:
        raise ConfigError(f"{path}: {e}") from None
    if validate:
        spec.validate_all()  # every grid entry at every scale, before any filtering
    return spec
