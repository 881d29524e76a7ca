"""OmegaConf resolvers the configs use, registered once by every entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rfc.utils.distributed import STAMP_ENV

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION_FILE = "tau_calibration.json"


def tau_key(cfg: DictConfig, target_nfc: float, knob: str = "tau") -> str:
    """What a calibrated value of ``method.<knob>`` depends on: model (its image size, or a video's
    frames x height x width), sampler, guidance, every setting of the method but that knob. RFC's
    tau keeps the key it always had; another knob (a threshold) adds the method and the knob's name."""
    m, s = cfg.model, cfg.sampler
    skip = (knob, "_target_", "fused")  # fused: the same schedule
    method = {k: _plain(cfg.method[k]) for k in cfg.method if k not in skip}
    if method.get("schedule_scope") == "batch":  # the default scope keeps the keys calibrated before it existed
        del method["schedule_scope"]
    sampler = f"{s._target_.rsplit('.', 1)[-1]}:{s.num_steps}:{s.get('respacing')}"
    size = m.image_size if "image_size" in m else f"{m.frames}x{m.height}x{m.width}"  # images, or video's geometry
    which = "" if knob == "tau" else f"{cfg.method._target_}.{knob}|"
    return (f"{m.name}|{m.get('arch') or 'custom'}|{size}|{sampler}|cfg{float(cfg.cfg_scale)}|{which}"
            f"{json.dumps(method, sort_keys=True)}|nfc{float(target_nfc)}")


def _plain(value: object) -> object:
    """A config value as JSON takes it (a list key such as TeaCache's coefficients is a ListConfig)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def calibrated(knob: str, target_nfc: float, _root_: DictConfig) -> float:
    """``method.threshold: ${calibrated:threshold,14}``: the value of ``method.<knob>``
    scripts/calibrate_tau.py found for this setting (``calibration.knob=threshold``)."""
    path = Path(_root_.paths.results) / CALIBRATION_FILE
    key = tau_key(_root_, target_nfc, knob)
    table = json.loads(path.read_text()) if path.exists() else {}
    if key not in table:
        extra = "" if knob == "tau" else f" calibration.knob={knob}"
        raise ValueError(f"no calibrated {knob} for NFC {target_nfc} with this model/sampler/method setting in {path}; "
                         f"run: python scripts/calibrate_tau.py <same overrides>{extra} target_nfc={target_nfc}")
    return float(table[key]["tau"])


def calibrated_tau(target_nfc: float, _root_: DictConfig) -> float:
    """``method.tau: ${calibrated_tau:14}``: the tau scripts/calibrate_tau.py found for this setting."""
    return calibrated("tau", target_nfc, _root_)


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
    if not OmegaConf.has_resolver("calibrated"):
        OmegaConf.register_new_resolver("calibrated", calibrated)
