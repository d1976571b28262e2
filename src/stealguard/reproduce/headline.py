"""The README's headline table, generated from the run store (never typed).

    stealguard headline --results results --scale quick --readme README.md

Two parts:
- EDM Table 3, MNIST and FashionMNIST rows: every stored cell of `edm-table3` for those
  datasets, ours next to the paper's, with the EDM-minus-undefended gap and its sign.
- MAD Figures 3/4 operating points: for each victim dataset, attack and defense of
  `mad-fig3` and `mad-fig4`, the stored operating point with the lowest clone accuracy among
  those that cost the defender at most 1 point of accuracy (the paper's "<1 % drop"),
  next to the undefended clone.

The README holds the generated text between `<!-- headline:start -->` and
`<!-- headline:end -->`; `--readme` rewrites only that part.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from stealguard.errors import ConfigError
from stealguard.reproduce.runner import plan
from stealguard.reproduce.spec import get_path, load_spec
from stealguard.reproduce.store import RunStore
from stealguard.reproduce.tables import Row, rows_for, table_records

START, END = "<!-- headline:start -->", "<!-- headline:end -->"
COST = 0.01  # the defender may lose at most 1 point of accuracy (MAD Fig. 3's operating point)


def _md_table(header: list[str], recs: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r.get(h, "")) for h in header) + " |" for r in recs]
    return lines


def _rows(name: str, scale: str, store: RunStore, data_root: str | Path | None) -> tuple[Any, list[Row]]:
    spec = load_spec(name)
    return spec, rows_for(plan(spec, scale, store, data_root=data_root), store)


def edm_part(scale: str, store: RunStore, data_root: str | Path | None) -> list[str]:
    spec, rows = _rows("edm-table3", scale, store, data_root)
    keep = [i for i, r in enumerate(rows)
            if get_path(r.params, "victim.dataset") in ("mnist", "fashionmnist")]
    header, recs = table_records(spec, rows)
    recs = [recs[i] for i in keep if rows[i].status == "ok"]
    if not recs:
        return [f"*EDM Table 3: no stored cells at scale {scale} yet: run "
                f"`stealguard reproduce edm-table3 --scale {scale}`.*"]
    return [f"**EDM Table 3** (MNIST, FashionMNIST; `stealguard reproduce edm-table3 "
            f"--scale {scale}`), clone accuracy in percent:", "", *_md_table(header, recs)]


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def mad_part(scale: str, store: RunStore, data_root: str | Path | None) -> list[str]:
    out: list[dict[str, Any]] = []
    names = []
    for name in ("mad-fig3", "mad-fig4"):
        try:
            _, rows = _rows(name, scale, store, data_root)
        except ConfigError:
            continue
        names.append(name)
        ok = [r for r in rows if r.status == "ok"]
        groups: dict[tuple[str, str, str], list[Row]] = {}
        for r in ok:
            key = (str(get_path(r.params, "victim.dataset", "-")),
                   str(get_path(r.params, "attack", "-")),
                   str(get_path(r.params, "options.labels", "soft")))
            groups.setdefault(key, []).append(r)
        for (dataset, attack, labels), rs in groups.items():
            base = [r for r in rs if get_path(r.params, "defense.name") == "none"
                    and get_path(r.params, "victim.training", "standard") == "standard"]
            if not base:
                continue
            b = base[0]
            by_defense: dict[str, list[Row]] = {}
            for r in rs:
                if r is b:
                    continue
                label = str(get_path(r.params, "defense.name"))
                if get_path(r.params, "victim.training", "standard") != "standard":
                    label = str(get_path(r.params, "victim.training"))
                by_defense.setdefault(label, []).append(r)
            for label, cand in sorted(by_defense.items()):
                cheap = [r for r in cand if r.metrics.get("defender_accuracy", 0)
                         >= b.metrics["defender_accuracy"] - COST]
                if not cheap:
                    continue
                best = min(cheap, key=lambda r: r.metrics["clone_accuracy"])
                params = get_path(best.params, "defense.params", {}) or get_path(
                    best.params, "victim.params", {})
                out.append({
                    "spec": name, "dataset": dataset, "attack": attack, "labels": labels,
                    "defense": label,
                    "setting": ",".join(f"{k}={v}" for k, v in sorted(params.items())) or "-",
                    "defender acc": f"{_pct(best.metrics.get('defender_accuracy'))} "
                                    f"(undef. {_pct(b.metrics.get('defender_accuracy'))})",
                    "clone acc": f"{_pct(best.metrics.get('clone_accuracy'))} "
                                 f"(undef. {_pct(b.metrics.get('clone_accuracy'))})",
                    "L1": f"{best.metrics.get('l1_mean', float('nan')):.2f}",
                })
    if not out:
        return [f"*MAD Figures 3/4: no stored operating points at scale {scale} yet: run "
                f"`stealguard reproduce mad-fig3 --scale {scale}` and `mad-fig4`.*"]
    header = ["spec", "dataset", "attack", "labels", "defense", "setting", "defender acc",
              "clone acc", "L1"]
    cmd = " and ".join(f"`stealguard reproduce {n} --scale {scale}`" for n in names)
    return [f"**MAD Figures 3/4 operating points** ({cmd}): per defense, the setting with the "
            "lowest clone accuracy among those costing the defender at most 1 point:", "",
            *_md_table(header, out),
            "", "Paper (MNIST, <1 point defender cost): knockoff 99.1 -> 69.8, "
                "jb_top3 87.3 -> 35.7 (MAD paper, section 5.2.1)."]


def headline(*, results: str | Path = "results", scale: str = "quick", store: str | None = None,
             data_root: str | Path | None = None) -> str:
    rs = RunStore(store or Path(results) / "runs.db")
    try:
        lines = [f"Generated by `stealguard headline --scale {scale}` from the run store "
                 f"`{store or Path(results) / 'runs.db'}`.", ""]
        lines += edm_part(scale, rs, data_root) + [""] + mad_part(scale, rs, data_root)
        return "\n".join(lines) + "\n"
    finally:
        rs.close()


def write_readme(readme: str | Path, text: str) -> None:
    path = Path(readme)
    body = path.read_text()
    if START not in body or END not in body:
        raise ConfigError(f"{path} has no {START} ... {END} markers; add them where the "
                          "headline table goes")
    new = re.sub(re.escape(START) + r".*?" + re.escape(END),
                 lambda _: f"{START}\n{text}{END}", body, count=1, flags=re.S)
    path.write_text(new)
