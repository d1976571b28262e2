"""The prepared GPU check (benchmarks/gpu_check.py) cannot rot: its CPU dry run, tiny sizes,
runs every section and every CUDA path's code on the CPU, and writes strict JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_dry_run_passes_every_check(tmp_path: Path) -> None:
    gpu_check = _load()
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu_check.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    for name in ("smoke", "ratios", "cifar10", "edm_table3"):
        assert "error" not in report[name], report[name].get("traceback")
    checks = report["smoke"]["checks"]
    assert {"victim_probs_cpu_vs_device", "mad_full_cpu_vs_device", "mad_argmax_last_layer_"
            "cpu_vs_device", "edm_routing_cpu_vs_device", "service_cuda"} <= set(checks)
    assert all(f"attack_{a}" in checks for a in report["smoke"]["attacks"])
    # the CPU dry run is not held to the GPU targets (ratios, seconds to 93 %), only to the
    # CPU-vs-device comparisons and the query accounting of every attack
    assert [k for k, v in checks.items() if not v["ok"]] == []
    assert report["edm_table3"]["returncode"] == 0
    assert "12 cells" in report["edm_table3"]["tail"]  # the MNIST rows of edm-table3, full scale
    assert report["ratios"]["mad_full_vs_loop"] > 0 and report["cifar10"]["curve"]


def test_gpu_check_refuses_to_run_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    gpu_check = _load()
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
