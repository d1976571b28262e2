"""The prediction service under load, on loopback, against the model's own batched speed.

    .venv/bin/python benchmarks/bench_service.py [--model conv3|edm] [--clients 64]
        [--images 32] [--seconds 24] [--rounds 3] [--encoding png|pixels] [--threads 1]
        [--no-restart] [--knockoff]

One run, in order:
  1. a real uvicorn server (a subprocess, `python -m stealguard.service serve`) on a free
     127.0.0.1 port, MNIST-shaped (1, 28, 28), random weights,
  2. --rounds rounds of: the served model in this process on batches of --max-batch rows
     (images/s, the reference), then --clients concurrent clients each sending requests of
     --images images (images/s); the machine is shared and its load drifts, so each served
     figure has its reference next to it. Over all rounds: p50/p99 latency, errors, and the
     key's accounting against the images answered,
  3. the ratio: served images / in-process images, summed over the rounds,
  4. kill -9 the server mid-load, restart it on the same SQLite store, keep loading: every
     request that was answered must be in the audit log and counted,
  5. SIGTERM the server mid-load (a clean stop): it must answer every request it charged,
     so the images counted equal the images answered,
  6. peak server memory (VmHWM, reset through /proc/<pid>/clear_refs before each phase)
     under a stream of the largest valid requests (--max-images float-pixel images), then
     under a stream of the issue's oversized body (15.6 MB: one innermost pixel list of
     5.2 M zeros), from --memory-clients clients, with the latency of one-image requests
     sent alongside; each phase's figure is its peak RSS over its starting RSS, and the
     ratio compares the two (oversized first: malloc keeps some of what a phase freed),
  7. with --knockoff: KnockoffNets against a briefly trained MNIST conv3 victim, through the
     local black box and through the server, same seed: answers, counts, clone accuracy.
The whole run stops by itself (--max-seconds, default 480; about 2 minutes without
--knockoff, 4.5 with it, on a busy 2-core CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from stealguard.artifacts import save_classifier
from stealguard.models import build_model
from stealguard.service.codec import encode_png
from stealguard.service.served import ServedModel, load_served_model
from stealguard.service.store import KeyStore

SHAPE, K = (1, 28, 28), 10


def make_artifact(kind: str, out: Path) -> Path:
    """A random-weights MNIST-shaped conv3 classifier, or a 5-member conv3 EDM bundle."""
    torch.manual_seed(0)
    c, h, _ = SHAPE
    net = lambda: build_model("conv3", in_channels=c, image_size=h, num_classes=K)
    classes = [str(i) for i in range(K)]
    if kind == "conv3":
        return save_classifier(out, net(), dataset="mnist", classes=classes)
    from stealguard.ensemble import DNNHash, EDMPredictor, save_edm

    edm = EDMPredictor([net() for _ in range(5)], hash_fn=DNNHash(net(), subclasses=2))
    return save_edm(out, edm, dataset="mnist", classes=classes, lambda_d=0.5, ood="random")


def in_process(served: ServedModel, x: torch.Tensor, seconds: float) -> float:
    """Images/s of the loaded model (predict_proba, as the server runs it) on batches x."""
    served.predict_proba(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        served.predict_proba(x)
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


@dataclass
class Load:
    images: int = 0
    requests: int = 0
    http_errors: int = 0
    transport_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)


async def load(url: str, secret: str, bodies: list[bytes], *, clients: int, seconds: float,
               tolerate_down: bool = False, stop_when_down: bool = False) -> Load:
    """`clients` concurrent keep-alive connections, each posting bodies back to back for
    `seconds`. A bare HTTP/1.1 client on asyncio streams: the load generator shares the two
    cores with the server, and httpx's async client spends about as much CPU per request
    as the server does (measured: 5.6 ms vs 6.5 ms for 8-image requests)."""
    res = Load()
    host, port = url.split("//")[1].split(":")
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer "
            f"{secret}\r\nContent-Type: application/json\r\n").encode()
    requests = [head + f"Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        j, conn = i, None
        while time.perf_counter() < deadline:
            req, j = requests[j % len(requests)], j + clients
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, int(port))
                status, body = await _roundtrip(*conn, req)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                res.transport_errors += 1
                _close(conn)
                conn = None
                if stop_when_down:
                    break
                if tolerate_down:
                    await asyncio.sleep(0.05)
                continue
            res.statuses[status] = res.statuses.get(status, 0) + 1
            if status != 200:
                res.http_errors += 1
                continue
            d = json.loads(body)
            res.latencies.append(time.perf_counter() - t0)
            res.images += len(d["outputs"])
            res.requests += 1
            res.request_ids.append(d["request_id"])
        _close(conn)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    res.seconds = time.perf_counter() - t0
    return res


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     request: bytes) -> tuple[int, bytes]:
    """One request on a keep-alive connection -> (status, body)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                  if k.lower() == "content-length")
    return status, await reader.readexactly(length)


def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
    if conn is not None:
        conn[1].close()


def make_bodies(encoding: str, images: int, count: int = 16) -> list[bytes]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        x = torch.randint(0, 256, (images, *SHAPE), dtype=torch.uint8, generator=g)
        payload = ({"images": encode_png(x)} if encoding == "png"
                   else {"pixels": x.tolist(), "dtype": "uint8"})
        out.append(json.dumps(payload).encode())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m stealguard.service serve` in a subprocess."""

    def __init__(self, artifact: Path, store: Path, port: int, args: argparse.Namespace,
                 logfile: Path) -> None:
        self.cmd = [sys.executable, "-m", "stealguard.service", "serve", str(artifact),
                    "--store", str(store), "--port", str(port), "--threads", str(args.threads),
                    "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                    "--max-images", str(max(args.images, 256))]
        self.url, self.logfile = f"http://127.0.0.1:{port}", logfile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> float:
        t0 = time.perf_counter()
        with open(self.logfile, "ab") as log:  # the child keeps its own copy of the handle
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.logfile.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not come up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q)) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["conv3", "edm"], default="conv3")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--images", type=int, default=32, help="images per request")
    p.add_argument("--seconds", type=float, default=24.0, help="measured load, all rounds")
    p.add_argument("--rounds", type=int, default=3, help="in-process / served alternations")
    p.add_argument("--encoding", choices=["png", "pixels"], default="png")
    p.add_argument("--threads", type=int, default=1, help="torch threads, server and in-process")
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--baseline-seconds", type=float, default=4.0, help="in-process, per round")
    p.add_argument("--restart-seconds", type=float, default=6.0, help="load before and after the kill")
    p.add_argument("--no-restart", action="store_true",
                   help="skip the kill-and-restart and SIGTERM checks")
    p.add_argument("--no-memory", action="store_true", help="skip the oversized-body check")
    p.add_argument("--memory-clients", type=int, default=6)
    p.add_argument("--memory-seconds", type=float, default=8.0, help="per phase")
    p.add_argument("--knockoff", action="store_true",
                   help="also: KnockoffNets local vs over HTTP on real MNIST/FashionMNIST")
    p.add_argument("--knockoff-budget", type=int, default=5000)
    p.add_argument("--max-seconds", type=float, default=480.0, help="the whole run's limit")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("--max-seconds")))
    signal.alarm(int(args.max_seconds))
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    artifact = make_artifact(args.model, tmp / "artifact")
    store_path = tmp / "service.db"
    store = KeyStore(store_path)
    bodies = make_bodies(args.encoding, args.images)
    server = Server(artifact, store_path, free_port(), args, tmp / "server.log")
    fig: dict[str, object] = {
        "model": args.model, "clients": args.clients, "images_per_request": args.images,
        "encoding": args.encoding, "torch_threads": args.threads, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "body_bytes": len(bodies[0]),
    }
    try:
        fig["startup_s"] = round(server.start(), 2)
        _, warm = store.create_key(name="warm-up")
        asyncio.run(load(server.url, warm, bodies, clients=args.clients, seconds=2))
        fig.update(throughput(server, store, bodies, load_served_model(artifact), args))
        server.stop()
        if not args.no_restart:
            fig.update(restart_check(server, store, bodies, args))
            fig.update(sigterm_check(server, store, bodies, args))
        if not args.no_memory:
            fig.update(memory_check(server, store, args))
        if args.knockoff:
            fig.update(knockoff_check(tmp, args))
    finally:
        server.stop()
        signal.alarm(0)
    print(json.dumps(fig, indent=2))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2))


def throughput(server: Server, store: KeyStore, bodies: list[bytes], served: ServedModel,
               args: argparse.Namespace) -> dict[str, object]:
    """Rounds of [in-process for --baseline-seconds, then the clients for --seconds/--rounds]:
    the machine is shared and its load drifts, so each served figure has a reference taken
    next to it. The idle server waits while the in-process model runs."""
    key, secret = store.create_key(name="bench")
    x = torch.rand(args.max_batch, *SHAPE)
    refs, rates, total = [], [], Load()
    for _ in range(args.rounds):
        refs.append(in_process(served, x, args.baseline_seconds))
        res = asyncio.run(load(server.url, secret, bodies, clients=args.clients,
                               seconds=args.seconds / args.rounds))
        rates.append(res.images / res.seconds)
        total.images, total.requests = total.images + res.images, total.requests + res.requests
        total.http_errors += res.http_errors
        total.transport_errors += res.transport_errors
        total.latencies += res.latencies
        for code, n in res.statuses.items():
            total.statuses[code] = total.statuses.get(code, 0) + n
    counted = store.get(key.id).used
    return {
        "in_process_images_per_s": [round(r, 1) for r in refs],
        "served_images_per_s": [round(r, 1) for r in rates],
        "ratio_per_round": [round(s / r, 3) for s, r in zip(rates, refs)],
        "ratio_served_to_in_process": round(sum(rates) / sum(refs), 3),
        "requests": total.requests, "images_answered": total.images,
        "p50_ms": round(pct(total.latencies, 50), 1), "p99_ms": round(pct(total.latencies, 99), 1),
        "errors": total.http_errors + total.transport_errors, "statuses": total.statuses,
        "images_counted": counted, "accounting_exact": counted == total.images,
    }


def restart_check(server: Server, store: KeyStore, bodies: list[bytes],
                  args: argparse.Namespace) -> dict[str, object]:
    """Load, kill -9 the server mid-load, restart it on the same store, load on; then check
    that every answered request is in the audit log and counted."""
    key, secret = store.create_key(name="restart")
    server.start()
    res, down = asyncio.run(_through_restart(server, secret, bodies, args))
    server.stop()
    logged = {r["request_id"]: r["count"] for r in store.audit_rows(key.id)}
    missing = [rid for rid in res.request_ids if rid not in logged]
    used = store.get(key.id).used
    return {
        "restart_answered_images": res.images, "restart_answered_requests": res.requests,
        "restart_downtime_s": round(down, 2),
        "restart_transport_errors": res.transport_errors, "restart_http_errors": res.http_errors,
        "restart_answered_missing_from_audit": len(missing),
        "restart_images_counted": used, "restart_audit_images": sum(logged.values()),
        "restart_counted_not_answered": used - res.images,
        "restart_no_answered_query_missing": not missing and used >= res.images,
    }


def sigterm_check(server: Server, store: KeyStore, bodies: list[bytes],
                  args: argparse.Namespace) -> dict[str, object]:
    """Load, SIGTERM the server mid-load, let it stop: a clean stop answers every request it
    charged, so nothing is counted that was not answered (kill -9 may leave some)."""
    key, secret = store.create_key(name="sigterm")
    server.start()

    async def run() -> Load:
        async def stop() -> None:
            await asyncio.sleep(args.restart_seconds / 2)
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
        stopping = asyncio.create_task(stop())
        res = await load(server.url, secret, bodies, clients=args.clients,
                         seconds=args.restart_seconds, stop_when_down=True)
        await stopping
        return res

    res = asyncio.run(run())
    assert server.proc is not None
    code = server.proc.wait(60)
    used = store.get(key.id).used
    return {"sigterm_answered_images": res.images, "sigterm_images_counted": used,
            "sigterm_counted_not_answered": used - res.images, "sigterm_exit_code": code,
            "sigterm_audit_chain_ok": store.verify_audit().ok}


def _rss_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} for process {pid}")


def memory_check(server: Server, store: KeyStore, args: argparse.Namespace) -> dict[str, object]:
    """Peak server RSS under a stream of oversized bodies, then under a stream of the largest
    valid requests, each over its starting RSS; one-image latency alongside."""
    _, secret = store.create_key(name="memory")
    server.start()
    assert server.proc is not None
    pid = server.proc.pid
    g = torch.Generator().manual_seed(2)
    valid = [json.dumps({"pixels": torch.rand(256, *SHAPE, generator=g).tolist()}).encode()]
    bomb = [b'{"dtype":"uint8","pixels":[[[[' + b"0, " * 5_200_000 + b"0]]]]}"]
    one = make_bodies("pixels", 1, count=4)
    asyncio.run(load(server.url, secret, one, clients=2, seconds=1))  # warm
    idle = _rss_kb(pid, "VmRSS")
    out: dict[str, object] = {"memory_idle_rss_mb": round(idle / 1024, 1),
                              "memory_valid_body_mb": round(len(valid[0]) / 1e6, 2),
                              "memory_oversized_body_mb": round(len(bomb[0]) / 1e6, 2)}
    for name, bodies in (("oversized", bomb), ("valid", valid)):
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = _rss_kb(pid, "VmRSS")  # what the previous phase left (malloc keeps some)

        async def phase(bodies: list[bytes] = bodies) -> tuple[Load, Load]:
            return await asyncio.gather(
                load(server.url, secret, bodies, clients=args.memory_clients,
                     seconds=args.memory_seconds),
                load(server.url, secret, one, clients=1, seconds=args.memory_seconds))

        heavy, probe = asyncio.run(phase())
        peak = _rss_kb(pid, "VmHWM")
        out[f"memory_{name}_requests"] = sum(heavy.statuses.values())
        out[f"memory_{name}_statuses"] = heavy.statuses
        out[f"memory_{name}_peak_growth_mb"] = round((peak - start) / 1024, 1)
        out[f"memory_{name}_one_image_p50_ms"] = round(pct(probe.latencies, 50), 1)
        out[f"memory_{name}_one_image_p99_ms"] = round(pct(probe.latencies, 99), 1)
    server.stop()
    v, o = out["memory_valid_peak_growth_mb"], out["memory_oversized_peak_growth_mb"]
    out["memory_oversized_to_valid_peak_ratio"] = round(float(o) / max(float(v), 0.1), 2)
    return out


def knockoff_check(tmp: Path, args: argparse.Namespace) -> dict[str, object]:
    """KnockoffNets (FashionMNIST queries, soft labels, seed 0) against an MNIST conv3 victim
    (3 epochs on 10,000 images; the clones: 8 epochs, as `stealguard demo --scale quick`), through the local black box and through the server:
    the answers, the counts and the clone accuracies must agree."""
    from stealguard.attacks import KnockoffNets
    from stealguard.blackbox import LocalBlackBox
    from stealguard.data import load_dataset
    from stealguard.service.client import HttpBlackBox
    from stealguard.training import TrainConfig, accuracy, train

    # like the Makefile and the tests: the shared datasets next to the repository
    os.environ.setdefault("STEALGUARD_DATA", str(Path(__file__).resolve().parents[2] / "shared"
                                                 / "datasets"))
    mnist = load_dataset("mnist", "train").subset(10_000, seed=0)
    test = load_dataset("mnist", "test").subset(2000, seed=0)
    surrogate = load_dataset("fashionmnist", "train")
    torch.manual_seed(0)
    victim = build_model("conv3", in_channels=1, image_size=28, num_classes=10,
                         mean=mnist.mean, std=mnist.std)
    train(victim, mnist.images, mnist.labels, progress=False,
          config=TrainConfig(epochs=3, lr=0.05, amp=False))
    artifact = save_classifier(tmp / "mnist-victim", victim.eval(), dataset="mnist",
                               classes=mnist.classes)
    budget = args.knockoff_budget

    def attack():  # type: ignore[no-untyped-def]
        return KnockoffNets(surrogate, labels="soft", arch="conv3", seed=0, query_batch=256,
                            clone=TrainConfig(epochs=8, lr=0.05, seed=0, amp=False))

    t0 = time.perf_counter()
    local = attack()(LocalBlackBox(victim, budget=budget), budget)
    t_local = time.perf_counter() - t0
    store = KeyStore(tmp / "knockoff.db")
    key, secret = store.create_key(budget=budget)
    server = Server(artifact, tmp / "knockoff.db", free_port(), args, tmp / "knockoff.log")
    server.start()
    try:
        t0 = time.perf_counter()
        with HttpBlackBox(server.url, secret) as bb:
            remote = attack()(bb, budget)
        t_remote = time.perf_counter() - t0
    finally:
        server.stop()
    acc = [accuracy(r.clone, test.images, test.labels) for r in (local, remote)]
    return {
        "knockoff_victim_accuracy": round(accuracy(victim, test.images, test.labels), 4),
        "knockoff_budget": budget, "knockoff_queries_local": local.queries,
        "knockoff_queries_http": remote.queries, "knockoff_server_count": store.get(key.id).used,
        "knockoff_max_answer_diff": float((remote.transfer_y - local.transfer_y).abs().max()),
        "knockoff_clone_accuracy_local": round(acc[0], 4),
        "knockoff_clone_accuracy_http": round(acc[1], 4),
        "knockoff_seconds_local_http": [round(t_local, 1), round(t_remote, 1)],
    }


async def _through_restart(server: Server, secret: str, bodies: list[bytes],
                           args: argparse.Namespace) -> tuple[Load, float]:
    """Load for restart_seconds/2, kill -9 the server while loading, restart it, load for
    restart_seconds/2 more. Returns the merged load and the downtime."""
    half = args.restart_seconds / 2

    async def kill_and_restart() -> float:
        await asyncio.sleep(half)
        server.kill()  # requests are in flight
        t0 = time.perf_counter()
        await asyncio.to_thread(server.start)
        return time.perf_counter() - t0

    restarting = asyncio.create_task(kill_and_restart())
    before = await load(server.url, secret, bodies, clients=args.clients, seconds=half + 0.5,
                        tolerate_down=True)
    down = await restarting
    after = await load(server.url, secret, bodies, clients=args.clients, seconds=half)
    before.images += after.images
    before.requests += after.requests
    before.transport_errors += after.transport_errors
    before.http_errors += after.http_errors
    before.request_ids += after.request_ids
    return before, down


if __name__ == "__main__":
    main()
