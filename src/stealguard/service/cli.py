"""The service's commands, mounted in the main CLI:

    app.command("serve")(serve_command)       stealguard serve <artifact> [--defense ...]
    app.add_typer(keys_app, name="keys")      stealguard keys create|list|revoke
    app.command("audit")(audit_command)       stealguard audit <key>

`python -m stealguard.service` runs the same commands on their own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from stealguard.errors import ConfigError

if TYPE_CHECKING:
    from stealguard.defenses import DefenseConfig
    from stealguard.service.app import Limits
    from stealguard.service.ray_serve import RayOptions

StoreOpt = typer.Option(None, "--store", envvar="STEALGUARD_STORE",
                        help="Key store: a SQLite file path or a SQLAlchemy URL "
                             "(default: service.db in the user data folder).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object.")
out = Console(width=None if sys.stdout.isatty() else 140)

keys_app = typer.Typer(help="API keys of the prediction service: create, list, revoke.",
                       no_args_is_help=True)


def _store(store: str | None):  # type: ignore[no-untyped-def]
    from stealguard.service.store import KeyStore

    return KeyStore(store)


def _table(title: str, rows: list[dict], columns: list[str]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("-" if r[c] is None else str(r[c]) for c in columns))
    out.print(table)


def serve_command(
    artifact: Annotated[Path, typer.Argument(
        help="Artifact directory (classifier or EDM bundle).")],
    defense: str = typer.Option("none", "--defense", help="Output defense (registered name)."),
    defense_param: Annotated[list[str] | None, typer.Option(
        "--defense-param", "-p", help="Defense parameter name=value (repeatable).")] = None,
    defense_key_file: Annotated[Path | None, typer.Option(
        "--defense-key-file", help="Secret for keyed defenses (same answers across "
                                   "restarts); a fresh one when absent.")] = None,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", help="Port to bind."),
    store: str | None = StoreOpt,
    max_images: int = typer.Option(256, help="Images per request (413 above)."),
    max_body_mb: float = typer.Option(16.0, help="Request body limit in MiB (413 above)."),
    max_batch: int = typer.Option(512, help="Rows per model call."),
    max_wait_ms: float = typer.Option(2.0, help="How long a batch waits for more requests."),
    threads: int | None = typer.Option(None, help="torch intra-op threads (default: torch's)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]."),
    log_level: str = typer.Option("warning", help="Log level (uvicorn's, or the replicas')."),
    engine: str = typer.Option(
        "local", "--engine", help="local: one process under uvicorn. ray: Ray Serve, each EDM "
                                  "member its own deployment behind a router (a classifier is "
                                  "one member); needs the `ray` extra of stealguard."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="--engine ray: the Ray cluster to join (auto, "
                                    "ray://host:10001); default: start a local Ray."),
    member_replicas: int = typer.Option(1, help="--engine ray: replicas of each member."),
    router_replicas: int = typer.Option(1, help="--engine ray: replicas of the router."),
    ingress_replicas: int = typer.Option(1, help="--engine ray: replicas of the HTTP front."),
    num_cpus_per_replica: float = typer.Option(1.0, help="--engine ray: Ray CPUs per replica."),
    num_gpus_per_member: float = typer.Option(
        0.0, help="--engine ray: Ray GPUs per member replica (members run on CUDA when > 0)."),
) -> None:
    """Serve a defended model over HTTP (FastAPI under uvicorn, or on Ray Serve)."""
    import torch
    import uvicorn

    from stealguard.defenses import DefenseConfig
    from stealguard.service.app import Limits, create_app
    from stealguard.service.served import load_served_model
    from stealguard.service.store import KeyStore

    if engine not in ("local", "ray"):
        raise ConfigError(f"unknown engine {engine!r}; valid: local, ray")
    spec = DefenseConfig.from_cli(defense, defense_param or [], defense_key_file)
    limits = Limits(max_images=max_images, max_body_bytes=int(max_body_mb * 2**20),
                    max_batch=max_batch, max_wait_s=max_wait_ms / 1000)
    if engine == "ray":
        if device != "cpu":
            raise ConfigError("--device is for --engine local; with --engine ray give the "
                              "members GPUs with --num-gpus-per-member")
        from stealguard.service.ray_serve import RayOptions

        options = RayOptions(
            member_replicas=member_replicas, router_replicas=router_replicas,
            ingress_replicas=ingress_replicas, num_cpus=num_cpus_per_replica,
            num_gpus=num_gpus_per_member, threads=threads, log_level=log_level)
        _serve_ray(artifact, defense=spec, store=store, limits=limits, options=options,
                   address=ray_address, host=host, port=port)
        return
    if threads is not None:
        torch.set_num_threads(threads)
    served = load_served_model(artifact)
    dfn = spec.build(served.model)
    key_store = KeyStore(store)
    app = create_app(served, defense=dfn, store=key_store, limits=limits, device=device)
    print(f"serving {artifact} ({served.format}, input {served.input_shape}, "
          f"{served.num_classes} classes) at http://{host}:{port}; keys in "
          f"{key_store.location}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def _serve_ray(artifact: Path, *, defense: DefenseConfig, store: str | None, limits: Limits,
               options: RayOptions, address: str | None, host: str, port: int) -> None:
    """`serve --engine ray`: deploy on Ray Serve, then wait for Ctrl-C."""
    from stealguard.service import ray_serve

    url = ray_serve.deploy(artifact, defense=defense, store=store, limits=limits, options=options,
                           address=address, host=host, port=port)
    info = ray_serve.describe_artifact(artifact)
    print(f"serving {artifact} ({info.format}, input {info.input_shape}, {info.num_classes} "
          f"classes) on Ray Serve at {url}: {info.members} member deployment(s) x "
          f"{options.member_replicas} replica(s), {options.router_replicas} router, "
          f"{options.ingress_replicas} ingress; keys in {ray_serve.absolute_store(store)}",
          file=sys.stderr, flush=True)
    ray_serve.block_until_interrupted(options.app_name)


@keys_app.command("create")
def keys_create(
    name: str = typer.Option("", "--name", help="A label for the key's owner."),
    budget: int | None = typer.Option(None, help="Query budget in images (default: none)."),
    rate_limit: int | None = typer.Option(None, help="Images per rate window (default: none)."),
    rate_window: float = typer.Option(60.0, help="Rate window in seconds."),
    output: str = typer.Option("probs", help="What the key gets: probs, topk or label."),
    k: int = typer.Option(1, help="k of topk."),
    store: str | None = StoreOpt, as_json: bool = JsonOpt,
) -> None:
    """Create a key. Its secret is printed once and never stored."""
    key, secret = _store(store).create_key(name=name, budget=budget, rate_limit=rate_limit,
                                           rate_window=rate_window, output=output, k=k)
    if as_json:
        print(json.dumps({**key.public(), "secret": secret}))
        return
    print(f"key {key.id} ({name or 'no name'}): budget {budget if budget is not None else 'none'}"
          f", output {output}")
    print(f"secret (shown once, store it now): {secret}")


@keys_app.command("list")
def keys_list(store: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """List keys: id, name, budget, used, limits, revoked (never secrets)."""
    rows = [k.public() for k in _store(store).list_keys()]
    if as_json:
        print(json.dumps({"keys": rows}))
        return
    _table("API keys", rows, ["id", "name", "budget", "used", "remaining", "rate_limit",
                              "rate_window_s", "output", "created", "revoked"])


@keys_app.command("revoke")
def keys_revoke(
    key: str = typer.Argument(..., help="Key id (or its unique name)."),
    store: str | None = StoreOpt,
) -> None:
    """Revoke a key: its requests are refused with 403 from now on; its log stays."""
    k = _store(store).revoke(key)
    print(f"key {k.id} ({k.name or 'no name'}) revoked; it had used {k.used} queries")


def audit_command(
    key: str = typer.Argument(..., help="Key id (or its unique name)."),
    last: int = typer.Option(0, "--last", help="Also list the last N requests."),
    store: str | None = StoreOpt, as_json: bool = JsonOpt,
) -> None:
    """Summarise a key's audit log: requests, images, distinct images, first and last."""
    if last < 0:
        raise ConfigError(f"--last must be >= 0, got {last}")
    s = _store(store)
    summary = s.audit_summary(key)
    rows = s.audit_rows(key, limit=last) if last else []
    if as_json:
        print(json.dumps({**summary, "rows": rows}))
        return
    _table(f"audit of key {summary['key']}", [summary], list(summary))
    if rows:
        from stealguard.service.store import _iso

        _table(f"last {len(rows)} requests", [
            {"time": _iso(r["time"]), "request_id": r["request_id"], "count": r["count"],
             "first image sha256": r["image_sha256"][0][:16] + "…"} for r in rows],
            ["time", "request_id", "count", "first image sha256"])


def standalone_app() -> typer.Typer:
    """serve, keys and audit as one command (`python -m stealguard.service`)."""
    app = typer.Typer(help="The stealguard prediction service.", no_args_is_help=True,
                      add_completion=False, pretty_exceptions_enable=False)
    app.command("serve")(serve_command)
    app.add_typer(keys_app, name="keys")
    app.command("audit")(audit_command)
    return app
