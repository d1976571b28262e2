"""The Ray engine stores the same rows as the local engine (same seeds, same metrics).

Marked `ray`: skipped where Ray is not installed; CI installs it (`make setup` installs the
`ray` extra) and runs these on a local Ray with 2 CPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.test_reproduce import _spec, folders  # noqa: F401 (the shared fixture)

from stealguard.reproduce.runner import reproduce
from stealguard.reproduce.store import RunStore

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_stores_what_the_local_engine_stores(
        tmp_path: Path, folders: tuple[str, str], local_ray: None) -> None:  # noqa: F811
    torch.set_num_threads(1)
    path = _spec(tmp_path, folders)
    local = reproduce(path, results=tmp_path / "local", progress=False, threads=1)
    remote = reproduce(path, results=tmp_path / "ray", progress=False, threads=1,
                       engine="ray", engine_options={"num_cpus": 1})
    assert (local.ran, remote.ran, remote.failed) == (2, 2, [])
    a = {r.cell_key: r for r in RunStore(tmp_path / "local" / "runs.db").all()}
    b = {r.cell_key: r for r in RunStore(tmp_path / "ray" / "runs.db").all()}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].params == b[k].params and a[k].seed == b[k].seed
        # Accuracies, agreement and counts are equal to the bit; the perturbation statistics
        # (means of float32 softmax differences) may differ in the 8th digit between the
        # driver and a Ray worker process (seen: 0.83801355 vs 0.83801354).
        assert a[k].metrics.keys() == b[k].metrics.keys()
        for m, v in a[k].metrics.items():
            if "accuracy" in m or m in ("agreement", "queries", "argmax_changed"):
                assert v == b[k].metrics[m], (k, m)
            else:
                assert v == pytest.approx(b[k].metrics[m], rel=1e-6, nan_ok=True), (k, m)
    # resumable exactly as the local engine: nothing runs again
    again = reproduce(path, results=tmp_path / "ray", progress=False, threads=1,
                      engine="ray", engine_options={"num_cpus": 1})
    assert (again.ran, again.skipped_stored) == (0, 2)
    assert (tmp_path / "ray" / "quick" / "tiny" / "table.md").exists()


def test_ray_engine_refuses_bad_resources(local_ray: None) -> None:
    from stealguard.errors import ConfigError
    from stealguard.reproduce.ray_engine import RayEngine

    with pytest.raises(ConfigError, match="CPUs > 0"):
        RayEngine(num_cpus=0)
