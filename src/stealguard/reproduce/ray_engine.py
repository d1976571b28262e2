"""The Ray engine of `stealguard reproduce --engine ray`: each job a Ray task.

    stealguard reproduce mad-fig4 --scale full --engine ray --address auto --gpus-per-task 0.25

Jobs are the runner's: first one task per distinct victim (trained in parallel and saved
as artifacts), then one task per cell. Every task runs `runner.execute`, the same function
the local engine calls, with resource requests of `num_cpus` CPUs and `num_gpus` GPUs (a
fraction shares a GPU between tasks). Results come back to the driver, the only process
that writes the run store, so SQLite works as well as a server database and resume is the
local engine's.

Workers read and write the victims under `<results>/artifacts`: on a multi-node cluster,
put the results directory on storage every node mounts (NFS, a shared volume). Each task
pins torch to as many threads as it has CPUs (or `--threads`), so parallel tasks do not
oversubscribe the cores; with the same threads, a cell gives the same numbers under both
engines (tests/test_reproduce_ray.py checks it).

Ray is optional: `pip install stealguard[ray]`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from stealguard.errors import ConfigError
from stealguard.reproduce.runner import Job, JobResult, WorkerConfig, execute


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray engine needs Ray: pip install 'stealguard[ray]' "
                          "(or use --engine local)") from None
    return ray


def _run_job(job: Job, worker: WorkerConfig) -> JobResult:  # runs in a Ray worker
    return execute(job, worker)


class RayEngine:
    def __init__(self, *, address: str | None = None, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, init: dict[str, Any] | None = None) -> None:
        if num_cpus <= 0 or num_gpus < 0:
            raise ConfigError(f"resources per task must be CPUs > 0 and GPUs >= 0, got "
                              f"{num_cpus} CPUs and {num_gpus} GPUs")
        self.ray = import_ray()
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        if not self.ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  **(init or {})}
            if address:
                kw["address"] = address
            self.ray.init(**kw)

    def run(self, jobs: Sequence[Job], worker: WorkerConfig) -> Iterator[JobResult]:
        if not jobs:
            return
        if worker.threads is None:
            worker = replace(worker, threads=max(1, math.floor(self.num_cpus)))
        remote = self.ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                 max_retries=0)(_run_job)
        worker_ref = self.ray.put(worker)
        pending = {remote.remote(job, worker_ref): job for job in jobs}
        try:
            while pending:
                done, _ = self.ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        yield self.ray.get(ref)
                    except Exception as e:
                        yield JobResult(job, False, error=f"Ray task failed: {e}")
        finally:
            for ref in pending:  # interrupted: stop what has not finished
                self.ray.cancel(ref, force=True)
