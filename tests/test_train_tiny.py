"""scripts/train_tiny.py is deterministic given its seed (same torch build and threads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(out: Path, seed: int) -> dict:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--steps", "4", "--classifier-epochs", "1",
                    "--log-every", "2", "--seed", str(seed), "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    return json.loads((out / "dit-tiny-digits.json").read_text())


def test_same_seed_same_checkpoints_different_seed_different(tmp_path):
    a, b, c = _train(tmp_path / "a", 0), _train(tmp_path / "b", 0), _train(tmp_path / "c", 1)
    assert a["files"] == b["files"]
    assert a["files"]["dit-tiny-digits.pt"] != c["files"]["dit-tiny-digits.pt"]
    assert a["model_config"]["hidden_size"] == 128 and a["dit"]["final_loss_mean_last_100"] > 0
