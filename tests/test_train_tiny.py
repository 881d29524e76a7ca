"""scripts/train_tiny.py is deterministic given its seed (same torch build and threads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import sys
sys.path.insert(0, {root!r})
from scripts.train_tiny import main
for out, seed in {runs!r}:
    sys.argv = ["train_tiny.py", "--steps", "4", "--classifier-epochs", "1", "--log-every", "2", "--seed", str(seed),
                "--out", out]
    main()
"""


def test_same_seed_same_checkpoints_different_seed_different(tmp_path):
    """Three trainings in one process (the imports are most of a short training's time): the
    second equals the first bit for bit, so nothing leaks from one training into the next either."""
    runs = [(str(tmp_path / "a"), 0), (str(tmp_path / "b"), 0), (str(tmp_path / "c"), 1)]
    subprocess.run([sys.executable, "-c", TRAIN.format(root=str(ROOT), runs=runs)], check=True, capture_output=True,
                   text=True, timeout=300)
    a, b, c = (json.loads((Path(out) / "dit-tiny-digits.json").read_text()) for out, _ in runs)
    assert a["files"] == b["files"]
    assert a["files"]["dit-tiny-digits.pt"] != c["files"]["dit-tiny-digits.pt"]
    assert a["model_config"]["hidden_size"] == 128 and a["dit"]["final_loss_mean_last_100"] > 0
