"""`stealguard reproduce <spec>` and `stealguard specs`: the CLI only parses and hands off."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from stealguard.console import check_output_dir, console, print_json, show_progress, to_json
from stealguard.errors import StealguardError


def reproduce_command(
    spec: str = typer.Argument(..., help="A spec name (see `stealguard specs`) or a YAML path."),
    scale: str = typer.Option("quick", "--scale", help="quick (2-core CPU, minutes), cpu "
                                                      "(2-core CPU, about 2.5 h for the "
                                                      "papers' main cells) or full (the "
                                                      "papers' sizes, for a GPU)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else "
                                                        "cpu), cpu, cuda or cuda:N."),
    results: Path = typer.Option(Path("results"), "--results",
                                 help="Results directory: tables and plots under "
                                      "<results>/<scale>/<spec>/, victims under artifacts/."),
    store: Optional[str] = typer.Option(None, "--store", help="Run store: a path or SQLAlchemy "
                                                             "URL (default <results>/runs.db)."),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray."),
    address: Optional[str] = typer.Option(None, "--address",
                                          help="Ray cluster address (ray engine; 'auto' joins "
                                               "a running cluster; default: a local Ray)."),
    cpus: float = typer.Option(1.0, "--cpus-per-task", help="CPUs per Ray task."),
    gpus: float = typer.Option(0.0, "--gpus-per-task", help="GPUs (or a fraction) per Ray "
                                                          "task."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per worker."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Datasets folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate every cell and list each "
                                                          "one's parameters; run and write "
                                                          "nothing."),
    set_: list[str] = typer.Option([], "--set", help="Override a field of every cell: "
                                   "field.path=value (YAML value; repeat), e.g. budget=1000 "
                                   "or victim.train.epochs=1."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Run a spec's grid (resumable: stored cells are skipped), then write its table and plots."""
    from stealguard.reproduce.runner import dry_run as plan_only
    from stealguard.reproduce.runner import reproduce
    from stealguard.reproduce.spec import load_spec, parse_overrides

    overrides = parse_overrides(set_)
    s = load_spec(spec)  # every grid entry, every scale: a typo fails here
    if dry_run:
        listing = plan_only(s, scale=scale, results=results, store=store, data_root=data_root,
                            overrides=overrides)
        if as_json:
            print_json(listing)  # strict JSON
            return
        for row in listing["grid"]:
            print(f"  {row['key'][:12]}  {row['status']:<10}  {to_json(row['params'])}")
        if listing["note"]:
            print(f"scale {scale}: {listing['note']}")
        print(f"{listing['spec']} ({scale}): {listing['cells']} cells, {listing['stored']} "
              f"stored, {listing['need_data']} need data, {listing['to_run']} to run")
        return
    check_output_dir(results, "--results", artifact_marker=None)
    options = ({"address": address, "num_cpus": cpus, "num_gpus": gpus}
               if engine == "ray" else {})
    report = reproduce(s, scale=scale, results=results, store=store, device=device,
                       data_root=data_root, engine=engine, engine_options=options,
                       threads=threads, progress=show_progress(as_json), overrides=overrides)
    figures = {"spec": report.spec, "scale": report.scale, "cells": report.cells,
               "ran": report.ran, "stored_before": report.skipped_stored,
               "need_data": report.missing_data, "failed": len(report.failed),
               "seconds": round(report.seconds, 1),
               "outputs": [str(p) for p in report.outputs]}
    if as_json:
        print_json(figures)
    else:
        for k, v in figures.items():
            print(f"{k}: {v}")
        for key, err in report.failed:
            print(f"failed cell {key}: {err}", file=sys.stderr)
    if report.failed:
        raise StealguardError(f"{len(report.failed)} cell(s) failed (listed above); the others "
                              "are stored; run the command again to retry the failed ones")


def specs_command(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the packaged experiment specs (one per table or figure of the two papers)."""
    from stealguard.reproduce.spec import load_spec, spec_names

    rows = []
    for name in spec_names():
        s = load_spec(name)
        rows.append({"name": name, "paper": s.paper, "ref": s.ref, "task": s.task,
                     "title": s.title})
    if as_json:
        print_json({"specs": rows})
        return
    for r in rows:
        print(f"{r['name']:<16} {r['paper'].upper():<4} {r['ref']:<12} {r['title']}")


def rekey_command(
    results: Path = typer.Option(Path("results"), "--results", help="Results directory."),
    store: Optional[str] = typer.Option(None, "--store", help="Run store (default "
                                                             "<results>/runs.db)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Datasets folder."),
) -> None:
    """Re-key a run store's rows to today's cells (rows stored in an older cell shape of the
    same experiment are found again by `reproduce`, `headline` and the tables)."""
    from stealguard.reproduce.runner import rekey_store
    from stealguard.reproduce.store import RunStore

    location = store or results / "runs.db"
    if store is None and not Path(location).exists():
        raise StealguardError(f"no run store at {location}; give --store or --results")
    rs = RunStore(location)
    try:
        moved = rekey_store(rs, data_root=data_root)
        total = len(rs.all())
    finally:
        rs.close()
    print(f"{location}: {moved} of {total} rows re-keyed to today's cells")


def headline_command(
    results: Path = typer.Option(Path("results"), "--results", help="Results directory."),
    scale: str = typer.Option("quick", "--scale", help="quick, cpu or full."),
    store: Optional[str] = typer.Option(None, "--store", help="Run store (default "
                                                             "<results>/runs.db)."),
    readme: Optional[Path] = typer.Option(None, "--readme", help="Rewrite the headline "
                                                                "section of this README."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Datasets folder."),
) -> None:
    """The README's headline table (EDM Table 3, MAD Fig. 3/4 points) from the run store."""
    from stealguard.reproduce.headline import headline, write_readme

    text = headline(results=results, scale=scale, store=store, data_root=data_root)
    if readme is not None:
        write_readme(readme, text)
        print(f"{readme}: headline section rewritten")
    else:
        print(text, end="")


def demo_command(
    scale: str = typer.Option("quick", "--scale", help="quick (a 2-core CPU, under 10 min) or full "
                                                      "(the papers' sizes, for a GPU)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, or auto."),
    results: Path = typer.Option(Path("results/demo"), "--results",
                                 help="Where the demo's run store, victims and table go."),
    fresh: bool = typer.Option(False, "--fresh", help="Run every cell again (a new run store)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Datasets folder."),
    set_: list[str] = typer.Option([], "--set", help="Override a field of every cell: "
                                   "field.path=value (as `reproduce --set`), e.g. budget=1000."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """The main job: an MNIST victim, KnockoffNets clones, undefended, MAD-argmax and EDM.

    It is the spec `demo` (stealguard/reproduce/specs/demo.yaml) run like `stealguard
    reproduce demo`: resumable (a finished cell is not run again; --fresh runs them all)."""
    import platform
    import shutil
    import time

    import torch

    from stealguard.reproduce.runner import plan, reproduce
    from stealguard.reproduce.spec import load_spec, parse_overrides
    from stealguard.reproduce.store import RunStore
    from stealguard.reproduce.tables import rows_for
    from stealguard.training import resolve_device

    device = str(resolve_device(device))
    overrides = parse_overrides(set_)
    spec = load_spec("demo")
    if scale not in spec.scales:
        raise StealguardError(f"unknown scale {scale!r}; valid: {', '.join(spec.scales)}")
    check_output_dir(results, "--results", artifact_marker=None)
    if fresh and (results / "runs.db").exists():
        shutil.rmtree(results / scale, ignore_errors=True)
        (results / "runs.db").unlink()
    t0 = time.perf_counter()
    report = reproduce(spec, scale=scale, results=results, device=device, data_root=data_root,
                       progress=show_progress(as_json), overrides=overrides)
    seconds = time.perf_counter() - t0
    rs = RunStore(results / "runs.db")
    try:
        rows = [demo_row(r.params, r.metrics) for r in rows_for(
            plan(spec, scale, rs, data_root=data_root, overrides=overrides), rs)
            if r.status == "ok"]
    finally:
        rs.close()
    machine = (f"{platform.machine()} {platform.processor() or ''}".strip() +
               f", {torch.get_num_threads()} threads, torch {torch.__version__}")
    if as_json:
        print_json({"scale": scale, "seconds": round(seconds, 1), "ran": report.ran,
                    "stored_before": report.skipped_stored, "machine": machine, "rows": rows})
    else:
        print_demo_table(rows, title=f"stealguard demo (scale={scale})")
        print(f"wall time {seconds:.0f} s ({report.ran} cells run, {report.skipped_stored} "
              f"from the run store {results / 'runs.db'}); machine: {machine}")
    if report.failed:
        raise StealguardError(f"{len(report.failed)} demo cell(s) failed: "
                              + "; ".join(err for _, err in report.failed))


def demo_row(params: dict, metrics: dict) -> dict:  # type: ignore[type-arg]
    """One line of the demo table: the target, its defense, the clone stolen from it."""
    d = params.get("defense") or {}
    eps = (d.get("params") or {}).get("epsilon")
    defense = d.get("name", "none") + (f"(eps={eps})" if eps is not None else "")
    return {"target": params["victim"]["training"], "defense": defense,
            "attack": f"{params['attack']}({params['queries']})",
            "labels": params["options"].get("labels", "soft"), "queries": int(metrics["queries"]),
            "defender_accuracy": metrics["defender_accuracy"],
            "clone_accuracy": metrics["clone_accuracy"],
            "normalized_accuracy": metrics["normalized_accuracy"],
            "agreement": metrics["agreement"]}


def print_demo_table(rows: list[dict], *, title: str) -> None:  # type: ignore[type-arg]
    from rich.table import Table

    table = Table(title=title)
    for col in ("target", "defense", "attack", "labels", "queries", "defender acc",
                "clone acc", "normalized", "agreement"):
        table.add_column(col, justify="right" if col not in ("target", "defense", "attack",
                                                             "labels") else "left")
    for r in rows:
        table.add_row(r["target"], r["defense"], r["attack"], r["labels"], str(r["queries"]),
                      f"{100 * r['defender_accuracy']:.2f} %",
                      f"{100 * r['clone_accuracy']:.2f} %",
                      f"{r['normalized_accuracy']:.2f}x", f"{100 * r['agreement']:.2f} %")
    console().print(table)
