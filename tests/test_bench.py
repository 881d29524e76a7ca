"""scripts/bench_latency.py writes the keys the README's performance table is made of; scripts/bench_invariance.py
writes its loops and checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_cache import ROOT

KEYS = {"full_ms", "full_in_cache_ms", "cached_ms", "cached_over_full", "full_in_cache_over_full",
        "e2e_speedup_nfc14", "nfc"}


METHODS = ["fora", "taylorseer", "rfc", "toca", "fbcache", "teacache"]


@pytest.mark.parametrize("model", ["dit-tiny", "flux-tiny"])
def test_bench_writes_every_key_per_method_and_batch(tmp_path, model):
    """Every method by name on every family's tiny model: the keys of the performance table, each
    ratio the quotient of the figures it is made of."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "scripts/bench_latency.py", f"model={model}", "batch_sizes=[2]", "variants=[eager]",
           f"methods=[{','.join(METHODS)}]", "bisect_iters=2", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    if model == "dit-tiny":
        cmd.append("image_size=8")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "e2e_speedup_nfc14" in proc.stdout  # the printed table
    (path,) = out.glob(f"{model}_cpu_*.json")
    result = json.loads(path.read_text())
    assert result["device"].startswith("cpu") and result["torch_version"]
    assert result["settings_requested"]["model"]["pretrained"] is False  # random weights, whatever the model says
    (setting,) = result["settings"]
    assert setting["batch_size"] == 2 and setting["variant"] == "eager" and setting["full_ms"] > 0
    assert list(setting["methods"]) == METHODS
    for name, row in setting["methods"].items():
        assert KEYS <= set(row), name
        assert row["full_in_cache_over_full"] == row["full_in_cache_ms"] / setting["full_ms"]
        if row["cached_ms"] is not None:  # a threshold schedule may compute every step on random weights
            assert row["cached_over_full"] == row["cached_ms"] / row["full_ms"]
        assert row["e2e_speedup_nfc14"] > 0 and 1 <= row["nfc"] <= 50
    for name in ("fora", "taylorseer"):  # interval 4 of 50 steps, counted as the family's official code counts
        assert setting["methods"][name]["nfc"] in (13, 14), name
    assert setting["methods"]["fora"]["fused"] and setting["methods"]["rfc"]["fused"]


def test_bench_refuses_an_unknown_variant_or_method_before_building_a_model():
    import importlib.util

    from omegaconf import OmegaConf

    spec = importlib.util.spec_from_file_location("bench_latency", ROOT / "scripts" / "bench_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit, match="variants: unknown variant 'fast'"):
        bench.check(OmegaConf.create({"variants": ["fast"], "methods": ["fora"], "nfc_settings": {}, "bisect": {}}))
    with pytest.raises(SystemExit, match="methods: unknown method 'foo'"):
        bench.check(OmegaConf.create({"variants": ["eager"], "methods": ["foo"], "nfc_settings": {}, "bisect": {}}))


def test_bench_invariance_times_each_numerics_and_checks_samples_alone(tmp_path):
    """scripts/bench_invariance.py: a loop per batch, method and numerics, and the check that samples
    drawn alone equal them in the batch (bit for bit with tiles, as tests/test_schedule_scope.py)."""
    cmd = [sys.executable, "scripts/bench_invariance.py", "batch_sizes=[1,3]", "tiles=[128]", "rounds=1",
           "sampler.num_steps=4", "check_samples=2", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("invariance_cpu_*.json")).read_text())
    assert {(r["batch"], r["method"], r["tiles"]) for r in result["loops"]} == {
        (b, m, t) for b in (1, 3) for m in ("none", "fbcache") for t in (0, 128)}
    assert all(r["loop_s"] > 0 and r["over_default"] > 0 for r in result["loops"])
    tiled = [c for c in result["checks"] if c["tiles"] == 128]
    assert len(tiled) == 2 and all(c["bit_identical"] and c["samples"] == 2 for c in tiled)
