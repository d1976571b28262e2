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

import typer
from rich.console import Console
from rich.table import Table

from stealguard.errors import ConfigError

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
    artifact: Path = typer.Argument(..., help="Artifact directory (classifier or EDM bundle)."),
    defense: str = typer.Option("none", "--defense", help="Output defense (registered name)."),
    defense_param: list[str] = typer.Option([], "--defense-param", "-p",
                                            help="Defense parameter name=value (repeatable)."),
    defense_key_file: Path | None = typer.Option(
        None, "--defense-key-file", help="Secret for keyed defenses (same answers across "
                                         "restarts); a fresh one when absent."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", help="Port to bind."),
    store: str | None = StoreOpt,
    max_images: int = typer.Option(256, help="Images per request (413 above)."),
    max_body_mb: float = typer.Option(16.0, help="Request body limit in MiB (413 above)."),
    max_batch: int = typer.Option(512, help="Rows per model call."),
    max_wait_ms: float = typer.Option(2.0, help="How long a batch waits for more requests."),
    threads: int | None = typer.Option(None, help="torch intra-op threads (default: torch's)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
) -> None:
    """Serve a defended model over HTTP (FastAPI under uvicorn)."""
    import torch
    import uvicorn

    from stealguard.defenses import build_defense, parse_defense_params
    from stealguard.service.app import Limits, create_app
    from stealguard.service.served import load_served_model
    from stealguard.service.store import KeyStore

    if threads is not None:
        torch.set_num_threads(threads)
    served = load_served_model(artifact)
    key = defense_key_file.read_bytes() if defense_key_file is not None else None
    victim = served.model if isinstance(served.model, torch.nn.Module) else None
    dfn = build_defense(defense, parse_defense_params(defense_param), victim=victim, key=key)
    limits = Limits(max_images=max_images, max_body_bytes=int(max_body_mb * 2**20),
                    max_batch=max_batch, max_wait_s=max_wait_ms / 1000)
    key_store = KeyStore(store)
    app = create_app(served, defense=dfn, store=key_store, limits=limits, device=device)
    print(f"serving {artifact} ({served.format}, input {served.input_shape}, "
          f"{served.num_classes} classes) at http://{host}:{port}; keys in "
          f"{key_store.location}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


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
