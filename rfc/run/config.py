"""OmegaConf resolvers the configs use, registered once by every entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rfc.utils.distributed import STAMP_ENV

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION_FILE = "tau_calibration.json"


def tau_key(cfg: DictConfig, target_nfc: float) -> str:
    """What a calibrated tau depends on: model (its image size, or a video's frames x height x width),
    sampler, guidance, every RFC setting but tau."""
    m, s = cfg.model, cfg.sampler
    method = {k: cfg.method[k] for k in cfg.method if k not in ("tau", "_target_", "fused")}  # fused: same schedule
    sampler = f"{s._target_.rsplit('.', 1)[-1]}:{s.num_steps}:{s.get('respacing')}"
    size = m.image_size if "image_size" in m else f"{m.frames}x{m.height}x{m.width}"  # images, or video's geometry
    return (f"{m.name}|{m.get('arch') or 'custom'}|{size}|{sampler}|cfg{float(cfg.cfg_scale)}|"
            f"{json.dumps(method, sort_keys=True)}|nfc{float(target_nfc)}")


def calibrated_tau(target_nfc: float, _root_: DictConfig) -> float:
    """``method.tau: ${calibrated_tau:14}``: the tau scripts/calibrate_tau.py found for this setting."""
    path = Path(_root_.paths.results) / CALIBRATION_FILE
    key = tau_key(_root_, target_nfc)
    table = json.loads(path.read_text()) if path.exists() else {}
    if key not in table:
        raise ValueError(f"no calibrated tau for NFC {target_nfc} with this model/sampler/method setting in {path}; "
                         f"run: python scripts/calibrate_tau.py <same overrides> target_nfc={target_nfc}")
    return float(table[key]["tau"])


def run_stamp(now: str) -> str:
    """The time stamp in output folder names: Hydra's ``now``, or rank 0's under torchrun."""
    return os.environ.get(STAMP_ENV) or now


def run_dir(resume: str | None, outputs: str, model: str, now: str) -> str:
    """``hydra.run.dir``: the folder named by ``resume=``, else a new time-stamped one."""
    return str(resume) if resume else f"{outputs}/{run_stamp(now)}_{model}"


def register_resolvers() -> None:
    """The resolvers, and every method's typed config (rfc.cache.registry), before any compose."""
    from rfc.cache.registry import register_builtin

    register_builtin()
    for name, fn in (("run_stamp", run_stamp), ("run_dir", run_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("calibrated_tau"):
        OmegaConf.register_new_resolver("calibrated_tau", calibrated_tau)
