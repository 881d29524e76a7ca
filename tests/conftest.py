"""Shared fixtures: composing the real Hydra configs, and small models."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# The conformance fixture's bits are those of oneDNN's AVX2 convolution (the patch embedding):
# pinned before torch starts, so that CPUs whose AVX-512 kernel sums in another order reproduce them.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rfc.run.config import register_resolvers  # noqa: E402

register_resolvers()

torch.set_num_threads(2)
# The suite's own device registry (rfc.utils.devices): jobs outside the suite never count as sharing a
# test run's device, and the suite's jobs (subprocesses too) see each other.
os.environ["RFC_DEVICE_REGISTRY"] = tempfile.mkdtemp(prefix="rfc-device-registry-")
atexit.register(shutil.rmtree, os.environ["RFC_DEVICE_REGISTRY"], True)
# Other processes' CPU load on a shared build machine must not decide tests about something else:
# any load passes here (subprocesses too); the tests about the limit itself set it back
# (tests/test_comparable.py, fixture real_quiet_limit).
os.environ["RFC_QUIET_CORES"] = "1000"
# A VBench environment or weight folder of this machine's user must not decide tests about them: the suite
# has none unless a test makes one (tests/test_vbench.py).
_no_vbench = tempfile.mkdtemp(prefix="rfc-no-vbench-")
atexit.register(shutil.rmtree, _no_vbench, True)
os.environ["RFC_VBENCH_ENV"] = os.path.join(_no_vbench, "env")
os.environ["VBENCH_CACHE_DIR"] = os.path.join(_no_vbench, "weights")
os.environ.pop("RFC_VBENCH_PYTHON", None)


@pytest.fixture
def real_quiet_limit(monkeypatch):
    """The quiet-device limit a run has outside this suite (rfc.utils.devices.QUIET_CORES)."""
    monkeypatch.delenv("RFC_QUIET_CORES", raising=False)


@pytest.fixture
def make_cfg(tmp_path: Path):
    """compose(overrides) -> the run config, with results and outputs redirected to tmp_path."""

    def _make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return compose("run", overrides=[f"paths.runs_csv={tmp_path / 'runs.csv'}",
                                             f"paths.outputs={tmp_path / 'outputs'}", *overrides])

    return _make
