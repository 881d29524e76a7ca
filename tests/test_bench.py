"""scripts/bench_latency.py writes the keys the README's performance table is made of."""

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
