"""Entry point: `python run.py [group=option ...] [key=value ...]`, Hydra multirun with -m.

Composes configs/run.yaml (model + method + sampler + eval + paths), runs one sample-score-
record job per composed config, and prints where its samples, grid and CSV row went.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rfc.config import register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="run")
def main(cfg: DictConfig) -> None:
    from rfc.models.load import CheckpointError, MissingAssetError
    from rfc.runner import run

    try:
        hc = HydraConfig.get()
        sweep = hc.sweep.dir if hc.mode.name == "MULTIRUN" else None
        run(cfg, hc.runtime.output_dir, sweep=sweep)
    except (MissingAssetError, CheckpointError, ValueError) as err:
        # Configuration and asset problems: one clear line, no traceback, non-zero exit.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
