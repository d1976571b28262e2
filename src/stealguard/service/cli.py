"""The service's commands, mounted in the main CLI:

    app.command("serve")(serve_command)       stealguard serve <artifact> [--defense ...]
    app.add_typer(keys_app, name="keys")      stealguard keys create|list|revoke
    app.add_typer(audit_app, name="audit")    stealguard audit <key> | refused | verify

`python -m stealguard.service` runs the same commands on their own.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from stealguard.console import print_json
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
    max_header_bytes: int = typer.Option(
        16 * 1024, help="Request line + headers, in bytes (431 above). --engine local."),
    max_headers: int = typer.Option(100, help="Header lines per request (431 above)."),
    read_timeout: float = typer.Option(
        30.0, help="Seconds to receive a whole request, headers and body (408 after)."),
    keep_alive: float = typer.Option(5.0, help="Seconds an idle keep-alive connection stays."),
    graceful_timeout: float = typer.Option(
        30.0, help="On SIGTERM: seconds requests in flight may take before the exit."),
    limit_concurrency: int | None = typer.Option(
        None, help="Connections + requests before 503 (default: no limit)."),
    metrics: bool = typer.Option(False, "--metrics/--no-metrics",
                                 help="Serve Prometheus metrics at GET /metrics."),
    threads: int | None = typer.Option(None, help="torch intra-op threads (default: torch's)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else cpu), "
                                                        "cpu or cuda[:N]."),
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
    detector: Annotated[list[str] | None, typer.Option(
        "--detector", help="A stealing detector per key (repeatable): prada, shift "
                           "(stealguard.detect).")] = None,
    detector_param: Annotated[list[str] | None, typer.Option(
        "--detector-param", help="[detector.]name=value (repeatable), e.g. prada.delta=0.9, "
                                 "shift.reference=mnist@test.")] = None,
    detect_policy: str = typer.Option(
        "flag", "--detect-policy", help="What a flag does: flag (audit log only), throttle "
                                        "(429 over a rate), lock (403)."),
    detect_policy_param: Annotated[list[str] | None, typer.Option(
        "--detect-policy-param", help="Policy parameter name=value, e.g. rate=60.")] = None,
    data_root: str | None = typer.Option(None, "--data-root", help="Datasets folder (the "
                                         "shift detector's held-out images)."),
) -> None:
    """Serve a defended model over HTTP (FastAPI under uvicorn, or on Ray Serve)."""
    import torch
    import uvicorn

    from stealguard.defenses import DefenseConfig
    from stealguard.service.app import Limits, create_app
    from stealguard.service.served import load_served_model
    from stealguard.service.server import ServerLimits, uvicorn_options
    from stealguard.service.store import KeyStore

    if engine not in ("local", "ray"):
        raise ConfigError(f"unknown engine {engine!r}; valid: local, ray")
    spec = DefenseConfig.from_cli(defense, defense_param or [], defense_key_file)
    limits = Limits(max_images=max_images, max_body_bytes=int(max_body_mb * 2**20),
                    max_batch=max_batch, max_wait_s=max_wait_ms / 1000)
    server_limits = ServerLimits(
        max_header_bytes=max_header_bytes, max_headers=max_headers, read_timeout_s=read_timeout,
        keep_alive_s=keep_alive, graceful_s=graceful_timeout,
        limit_concurrency=limit_concurrency)
    if engine == "ray":
        if detector:
            raise ConfigError("--detector needs --engine local (the Ray front does not run "
                              "detectors yet)")
        if device not in ("auto", "cpu"):
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
    from stealguard.training import resolve_device

    device = str(resolve_device(device))
    if threads is not None:
        torch.set_num_threads(threads)
    served = load_served_model(artifact)
    dfn = spec.build(served.model)
    key_store = KeyStore(store)
    monitor = None
    if detector:
        from stealguard.detect.serving import serving_monitor

        monitor = serving_monitor(artifact, served, detector, detector_param or [],
                                  policy=detect_policy, policy_params=detect_policy_param or [],
                                  store=key_store.engine, device=device, data_root=data_root)
    app = create_app(served, defense=dfn, store=key_store, limits=limits, device=device,
                     metrics=metrics, monitor=monitor)
    print(f"serving {artifact} ({served.format}, input {served.input_shape}, "
          f"{served.num_classes} classes) at http://{host}:{port}; keys in "
          f"{key_store.location}{'; metrics at /metrics' if metrics else ''}",
          file=sys.stderr, flush=True)
    with _sigterm_is_a_clean_stop():
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False,
                    **uvicorn_options(server_limits))


@contextmanager
def _sigterm_is_a_clean_stop() -> Iterator[None]:
    """uvicorn stops gracefully on SIGTERM (stops accepting, answers the requests in flight,
    shuts the app down) and then raises the signal again for the handler it found: with this
    one, that ends `serve` with exit status 0 and a line on stderr, not death by signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopped: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, _frame: stopped.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        print("stopped on SIGTERM: every request in flight was answered", file=sys.stderr,
              flush=True)


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
        print_json({**key.public(), "secret": secret})
        return
    print(f"key {key.id} ({name or 'no name'}): budget {budget if budget is not None else 'none'}"
          f", output {output}")
    print(f"secret (shown once, store it now): {secret}")


@keys_app.command("list")
def keys_list(store: str | None = StoreOpt, as_json: bool = JsonOpt) -> None:
    """List keys: id, name, budget, used, limits, revoked (never secrets)."""
    rows = [k.public() for k in _store(store).list_keys()]
    if as_json:
        print_json({"keys": rows})
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


class _AuditGroup(TyperGroup):
    """`audit KEY ...` is `audit show KEY ...`: the subcommands come first."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(cls=_AuditGroup, no_args_is_help=True,
                        help="The audit log: `audit KEY` (a key's summary and last requests), "
                             "`audit refused` (refused requests), `audit verify` (the chain).")


@audit_app.command("show")
def audit_command(
    key: str = typer.Argument(..., help="Key id (or its unique name)."),
    last: int = typer.Option(0, "--last", help="Also list the last N requests."),
    store: str | None = StoreOpt, as_json: bool = JsonOpt,
) -> None:
    """Summarise a key's audit log: requests, images, distinct images, refunds, refusals."""
    if last < 0:
        raise ConfigError(f"--last must be >= 0, got {last}")
    s = _store(store)
    summary = s.audit_summary(key)
    rows = s.audit_rows(key, limit=last) if last else []
    from stealguard.detect.store import alarms_in

    alarms = alarms_in(s.engine, summary["key"])
    if as_json:
        print_json({**summary, "detector_alarms": alarms, "rows": rows})
        return
    _table(f"audit of key {summary['key']}", [{"field": k, "value": v}
                                              for k, v in summary.items()], ["field", "value"])
    if alarms:
        from stealguard.service.store import _iso

        _table(f"stealing detectors flagged key {summary['key']}", [
            {**a, "time": _iso(a["time"]), "statistic": f"{a['statistic']:.4g}"}
            for a in alarms], ["time", "detector", "queries", "statistic", "detail"])
    if rows:
        from stealguard.service.store import _iso

        _table(f"last {len(rows)} requests", [
            {"time": _iso(r["time"]), "request_id": r["request_id"], "count": r["count"],
             "client": r["client"], "refunded": "yes" if r["refunded"] else "",
             "first image sha256": r["image_sha256"][0][:16] + "…" if r["image_sha256"]
             else ""} for r in rows],
            ["time", "request_id", "count", "client", "refunded", "first image sha256"])


@audit_app.command("refused")
def audit_refused(
    key: str | None = typer.Option(None, "--key", help="Only this key's (id or name)."),
    reason: str | None = typer.Option(None, "--reason", help="Only this code, e.g. "
                                      "unknown_key, rate_limited, budget_exhausted."),
    last: int = typer.Option(20, "--last", help="How many, newest first (0: all)."),
    store: str | None = StoreOpt, as_json: bool = JsonOpt,
) -> None:
    """List refused requests: time, code, key id (when known), client address, message."""
    from stealguard.service.errors import REFUSALS
    from stealguard.service.store import _iso

    if last < 0:
        raise ConfigError(f"--last must be >= 0, got {last}")
    if reason is not None and reason not in REFUSALS:
        raise ConfigError(f"unknown refusal code {reason!r}; valid: {', '.join(REFUSALS)}")
    rows = _store(store).refusals(key, reason=reason, limit=last or None)
    if as_json:
        print_json({"refused": rows})
        return
    _table(f"{len(rows)} refused request(s), newest first", [
        {**r, "time": _iso(r["time"]), "key_id": r["key_id"] or "-",
         "detail": r["detail"][:70]} for r in rows],
        ["seq", "time", "reason", "key_id", "client", "count", "detail"])


@audit_app.command("verify")
def audit_verify(
    head: str | None = typer.Option(None, "--head", help="The head hash printed by an earlier verify, "
                                    "kept outside the store: the chain must end there now."),
    store: str | None = StoreOpt, as_json: bool = JsonOpt,
) -> None:
    """Walk the audit log's hash chain: exit 0 if intact, 1 naming the first altered,
    deleted or inserted row."""
    check = _store(store).verify_audit(head=head)
    if as_json:
        print_json({"ok": check.ok, "rows": check.rows, "head": check.head,
                    "problem": check.problem, "bad_seq": check.bad_seq})
    elif check.ok:
        print(f"audit log intact: {check.rows} rows, head {check.head}")
    else:
        print(f"error: audit log tampered with: {check.problem}", file=sys.stderr)
    if not check.ok:
        raise typer.Exit(1)


def standalone_app() -> typer.Typer:
    """serve, keys and audit as one command (`python -m stealguard.service`)."""
    app = typer.Typer(help="The stealguard prediction service.", no_args_is_help=True,
                      add_completion=False, pretty_exceptions_enable=False)
    app.command("serve")(serve_command)
    app.add_typer(keys_app, name="keys")
    app.add_typer(audit_app, name="audit")
    return app
