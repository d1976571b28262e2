"""The prediction service on Ray Serve: one deployment per EDM member, a router, an ingress.

Kariyappa et al., "Protecting DNNs from Theft using an Ensemble of Diverse Models",
ICLR 2021, appendix A.4: in a datacenter each member can be served on its own machines and
a front end hashes each query and forwards it to its member, so EDM costs about one model's
compute per query. Here, with Ray Serve:

    ingress (FastAPI)  keys, budgets, rate limits, audit log, micro-batcher   (no model)
       |  one router call per micro-batch
    router             secret hash: index(x) = H(x) mod N; each member its rows, concurrently;
       |               rows back in order; softmax; the output defense (none, MAD, ...)
    member-0 ... member-{N-1}   one member's weights each, logits (B_i, K)

    deploy("artifacts/mnist-edm", store="service.db",
           options=RayOptions(member_replicas=2, num_cpus=1.0))     # -> "http://127.0.0.1:8000"
    stealguard serve artifacts/mnist-edm --engine ray --member-replicas 2

Choices:
- The HTTP front is `create_app`, the single-process service's FastAPI app, built inside each
  ingress replica: keys, budgets, rate limits, the audit log and the error handling are the
  same code. The model it serves is `RouterModel`, whose `predict_proba` calls the router
  (a DeploymentHandle) from the micro-batcher's thread; the ingress has no defense of its own,
  since the router applies it after routing. So a charge happens exactly where it does in the
  single-process service, before any model runs, and is refunded if the router fails.
- Nothing model-shaped is pickled through Ray: every replica gets the artifact's path (and a
  member index) and loads its weights from disk with the artifact loaders, which check each
  file's size and sha256. The path must therefore be readable on every node (a shared or
  copied folder). The hash network is loaded only by the router replicas.
- The router is an EDM predictor whose members are remote handles (`RemoteEnsemble`): the
  routing (index(x) = H(x) mod N, each member its rows, rows back in order) is
  `HashRouting`'s, the code `EDMPredictor` runs in one process, and the defense is applied by
  a `DefendedPredictor`, as in `LocalBlackBox` and the single-process service. So the answers
  equal the single-process service's for the same images and key (to float rounding of the
  batch composition: 1e-6 in the tests).
- A defense is built from a `DefenseConfig` in each router replica. Its victim is the
  artifact format's stand-in (a fresh model of the manifest's architecture, input shape and
  normalisation for our formats: what MAD's surrogate and top-k's check read; no weights
  needed). Its key is read from `key_file` when given (only the path travels); otherwise the
  driver draws one key for all router replicas, which Ray then keeps with the deployment's
  arguments.
- Members and the selector are loaded by the artifact format (`stealguard.formats`): a
  single-model artifact (classifier, imported module, ONNX) is served as a one-member
  ensemble behind the same router (no hash: every row goes to member 0), so it gets replicas
  and the same front.
- The key store must be one database for all ingress replicas: a SQLite file in WAL mode (a
  path, made absolute here) works for replicas on one node; for several nodes pass a server
  database URL (e.g. postgresql://...). An in-memory store is refused.
- The ingress app is built lazily, on the replica's first ASGI event (Ray runs the lifespan
  startup when the replica starts), by a small picklable object: this works with every Ray
  2.x that has `serve.ingress`, without pickling the FastAPI app, its database engine or its
  batcher thread. It finds the router with `serve.get_deployment_handle`; the router is also
  bound to the ingress so that it is part of the application.

Ray is an optional extra (`pip install stealguard[ray]`): this module imports it only inside
functions, and `require_ray` says how to install it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from stealguard.defended import DefendedPredictor
from stealguard.defenses.config import DefenseConfig
from stealguard.defenses.keyed import new_key
from stealguard.ensemble.predictor import HashRouting
from stealguard.errors import ConfigError
from stealguard.formats import (
    ArtifactInfo,
    describe_artifact,
    load_member,
    load_selector,
    load_standin,
)
from stealguard.service.app import Limits

__all__ = ["ArtifactInfo", "DefenseConfig", "RayOptions", "RemoteEnsemble", "Router",
           "build_application", "deploy", "describe_artifact", "require_ray"]
INSTALL_HINT = "pip install stealguard[ray]"
ROUTER = "router"
INGRESS = "ingress"


def require_ray() -> ModuleType:
    """`ray` with Ray Serve, or a ConfigError that says how to install them."""
    try:
        import ray
        from ray import serve  # noqa: F401  (the extra installs both)
    except ImportError as e:
        raise ConfigError(f"serving on Ray (--engine ray) needs Ray Serve, which is not "
                          f"installed ({e}); install it with `{INSTALL_HINT}`, or serve in one "
                          f"process with --engine local") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Replicas and resources of the three deployments, and the Serve application."""

    member_replicas: int = 1  # replicas of each member deployment
    router_replicas: int = 1
    ingress_replicas: int = 1
    num_cpus: float = 1.0  # Ray CPUs per replica (fractions share a core)
    num_gpus: float = 0.0  # Ray GPUs per member replica; members run on CUDA when > 0
    threads: int | None = None  # torch threads per replica (default: max(1, int(num_cpus)))
    timeout_s: float = 60.0  # how long the ingress waits for the router's answer
    app_name: str = "stealguard"
    route_prefix: str = "/"
    log_level: str = "warning"  # the replicas' log level; no access log, as locally

    def __post_init__(self) -> None:
        for name in ("member_replicas", "router_replicas", "ingress_replicas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.num_cpus > 0 or self.num_gpus < 0:
            raise ConfigError(f"num_cpus must be > 0 and num_gpus >= 0, got {self.num_cpus} "
                              f"and {self.num_gpus}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"unknown log level {self.log_level!r}; valid: debug, info, "
                              f"warning, error, critical")

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))

    def cpus_needed(self, members: int) -> float:
        replicas = members * self.member_replicas + self.router_replicas + self.ingress_replicas
        return replicas * self.num_cpus


# -- the deployments (plain classes; `build_application` wraps them with serve.deployment)

class MemberModel:
    """One member: (B_i, C, H, W) images -> (B_i, K) float32 logits, on CPU."""

    def __init__(self, artifact: str, index: int, *, threads: int, device: str = "cpu") -> None:
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        model = load_member(artifact, index)
        self.model = model.to(self.device) if isinstance(model, torch.nn.Module) else model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x.to(self.device)).float().cpu()


class RemoteEnsemble(HashRouting):
    """An EDM predictor whose members are remote handles (member i at position i): the
    routing is `HashRouting`'s; the members answer their rows concurrently."""

    def __init__(self, handles: list[Any], hash_fn: Any, info: ArtifactInfo) -> None:
        if len(handles) != info.members:
            raise ConfigError(f"the artifact has {info.members} members; {len(handles)} given")
        self.handles, self.hash_fn = handles, hash_fn
        self.input_shape, self.num_classes = info.input_shape, info.num_classes

    @property
    def n_members(self) -> int:
        return len(self.handles)

    async def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K) float32 probabilities of the routed members."""
        parts = self.split(x)
        answers = await asyncio.gather(  # every member at once, each on its rows (B_i,)
            *(self.handles[i].remote(x[rows]) for i, rows in parts))  # [(B_i, K)]
        return torch.softmax(self.merge(x, parts, answers).float(), dim=1)


class Router:
    """The secret hash and the defense: (B, C, H, W) -> (B, K) defended probabilities, as
    `EDMPredictor.predict_proba` and then the service's `DefendedPredictor`."""

    def __init__(self, artifact: str, members: list[Any], defense: DefenseConfig, *,
                 threads: int) -> None:
        torch.set_num_threads(threads)
        info = describe_artifact(artifact)
        # secret: the hash lives in the router replicas only
        self.ensemble = RemoteEnsemble(members, load_selector(artifact), info)
        self.defended = DefendedPredictor(self.ensemble, defense.build(load_standin(artifact)))

    async def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = await self.ensemble.predict_proba(x)  # checks the shape (InputError)
        return self.defended.apply(x, probs)


class RouterModel:
    """The router as the model the ingress app serves: `predict_proba` calls it. Called from
    the micro-batcher's thread, so it may block on the answer."""

    def __init__(self, handle: Any, info: ArtifactInfo, timeout_s: float) -> None:
        self.handle, self.timeout_s = handle, timeout_s
        self.input_shape, self.num_classes = info.input_shape, info.num_classes

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.handle.remote(x).result(timeout_s=self.timeout_s)  # (B, K)


class IngressApp:
    """An ASGI app that builds the service's FastAPI app in the ingress replica, on the first
    event it gets (the lifespan startup); picklable, so Ray ships it instead of the app."""

    def __init__(self, info: ArtifactInfo, store: str, limits: Limits, *, app_name: str,
                 timeout_s: float) -> None:
        self.info, self.store, self.limits = info, store, limits
        self.app_name, self.timeout_s = app_name, timeout_s
        self.app: Any = None  # the FastAPI app, once built

    def build(self) -> Any:
        from ray import serve

        from stealguard.service.app import create_app
        from stealguard.service.served import ServedModel

        handle = serve.get_deployment_handle(ROUTER, app_name=self.app_name)
        served = ServedModel(RouterModel(handle, self.info, self.timeout_s),
                             self.info.input_shape, self.info.num_classes,
                             list(self.info.classes), self.info.format)
        return create_app(served, store=self.store, limits=self.limits)  # defense: the router's

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.app is None:
            self.app = self.build()
        await self.app(scope, receive, send)


class Ingress:
    """The ingress deployment's class: `serve.ingress(IngressApp)` makes it answer HTTP. It
    takes the router so that the router is part of the application."""

    def __init__(self, router: Any) -> None:
        self.router = router


# -- building and running the application

def absolute_store(store: str | Path | None) -> str:
    """The key store as every replica must see it: an absolute SQLite path or a URL."""
    from sqlalchemy.engine import make_url

    from stealguard.service.store import default_store_path

    s = str(store if store is not None else default_store_path())
    if "://" not in s:
        return str(Path(s).expanduser().resolve())
    url = make_url(s)
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ConfigError("an in-memory key store cannot be shared by Ray Serve replicas; "
                              "give a SQLite file path or a database URL")
        return url.set(database=str(Path(url.database).expanduser().resolve())
                       ).render_as_string(hide_password=False)
    return s


def build_application(
    artifact: str | Path, *, defense: DefenseConfig | None = None,
    store: str | Path | None = None, limits: Limits | None = None,
    options: RayOptions | None = None,
) -> Any:
    """The Serve application (ingress -> router -> members), checked before Ray sees it: the
    manifest, the defense (built once here) and the key store (opened, tables created)."""
    require_ray()  # the clear error first
    from ray import serve

    from stealguard.service.store import KeyStore

    opts, limits = options or RayOptions(), limits or Limits()
    artifact = str(Path(artifact).resolve())
    info = describe_artifact(artifact)
    spec = defense or DefenseConfig()
    if spec.key_file is None and spec.key is None:  # one key for every router replica
        spec = spec.model_copy(update={"key": new_key()})
    elif spec.key_file is not None:  # every replica reads the same file
        spec = spec.model_copy(update={"key_file": str(Path(spec.key_file).resolve())})
    spec.build(load_standin(artifact))  # bad names or parameters fail here, not in a replica
    location = absolute_store(store)
    KeyStore(location).close()  # creates the tables once, before replicas race to

    threads, cpus = opts.torch_threads, {"num_cpus": opts.num_cpus}
    members = [
        serve.deployment(name=f"member-{i}", num_replicas=opts.member_replicas,
                         ray_actor_options={**cpus, "num_gpus": opts.num_gpus})(MemberModel)
        .bind(artifact, i, threads=threads, device="cuda" if opts.num_gpus > 0 else "cpu")
        for i in range(info.members)]
    router = serve.deployment(name=ROUTER, num_replicas=opts.router_replicas,
                              ray_actor_options=cpus)(Router).bind(
        artifact, members, spec, threads=threads)
    front = IngressApp(info, location, limits, app_name=opts.app_name,
                       timeout_s=opts.timeout_s)
    return serve.deployment(name=INGRESS, num_replicas=opts.ingress_replicas,
                            ray_actor_options=cpus)(serve.ingress(front)(Ingress)).bind(router)


def deploy(
    artifact: str | Path, *, defense: DefenseConfig | None = None,
    store: str | Path | None = None, limits: Limits | None = None,
    options: RayOptions | None = None, address: str | None = None,
    host: str = "127.0.0.1", port: int = 8000,
) -> str:
    """Start (or join, `address`) Ray, start Serve's HTTP proxy on host:port and run the
    application; returns its URL once every replica is up."""
    ray = require_ray()
    from ray import serve

    opts = options or RayOptions()
    app = build_application(artifact, defense=defense, store=store, limits=limits, options=opts)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    if address is None:  # a local Ray: say so now rather than wait for room forever
        have = float(ray.cluster_resources().get("CPU", 0))
        need = opts.cpus_needed(describe_artifact(artifact).members)
        if need > have:
            raise ConfigError(f"the deployments need {need:g} CPUs ({opts.num_cpus:g} per "
                              f"replica) and this Ray has {have:g}; lower "
                              f"--num-cpus-per-replica or the replica counts")
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=opts.app_name, route_prefix=opts.route_prefix,
              logging_config={"log_level": opts.log_level.upper(), "enable_access_log": False})
    return f"http://{host}:{port}{opts.route_prefix.rstrip('/')}"


def block_until_interrupted(app_name: str) -> None:
    """Wait for Ctrl-C, then delete the application (and stop a Ray this process started)."""
    ray = require_ray()
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        serve.delete(app_name)
        ray.shutdown()
