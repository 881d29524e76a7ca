"""scripts/bench_latency.py writes the keys the README's performance table is made of."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_cache import ROOT

KEYS = {"full_ms", "full_in_cache_ms", "cached_ms", "cached_over_full", "full_in_cache_over_full",
        "e2e_speedup_nfc14", "nfc"}


def test_bench_writes_every_key_per_method_and_batch(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "scripts/bench_latency.py", "model=dit-tiny", "image_size=8", "batch_sizes=[2]",
           "variants=[eager]", "methods=[fora,taylorseer,rfc,toca]", "tau_iters=3", f"out_dir={out}",
           f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "e2e_speedup_nfc14" in proc.stdout  # the printed table
    (path,) = out.glob("dit-tiny_cpu_*.json")
    result = json.loads(path.read_text())
    assert result["device"].startswith("cpu") and result["torch_version"]
    (setting,) = result["settings"]
    assert setting["batch_size"] == 2 and setting["variant"] == "eager" and setting["full_ms"] > 0
    assert set(setting["methods"]) == {"fora", "taylorseer", "rfc", "toca"}
    for name, row in setting["methods"].items():
        assert KEYS <= set(row), name
        assert row["cached_over_full"] == row["cached_ms"] / row["full_ms"]
        assert row["full_in_cache_over_full"] == row["full_in_cache_ms"] / setting["full_ms"]
        assert row["e2e_speedup_nfc14"] > 0
    assert setting["methods"]["fora"]["nfc"] == setting["methods"]["taylorseer"]["nfc"] == 14


def test_bench_refuses_an_unknown_variant_or_method_before_building_a_model():
    import importlib.util

    from omegaconf import OmegaConf

    spec = importlib.util.spec_from_file_location("bench_latency", ROOT / "scripts" / "bench_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit, match="variants: unknown variant 'fast'"):
        bench.check(OmegaConf.create({"variants": ["fast"], "methods": ["fora"]}))
    with pytest.raises(ValueError, match="methods: unknown method 'foo'"):
        bench.check(OmegaConf.create({"variants": ["eager"], "methods": ["foo"]}))
