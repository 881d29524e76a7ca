"""Finding the tau that gives RFC a target mean NFC.

Mean NFC falls as tau grows (more accumulated error is tolerated before a full step), so a
bracket [lo, hi] with NFC(lo) > target >= NFC(hi) is narrowed by bisection (in log space, since
useful taus span decades) until NFC is within ``tolerance`` of the target. The calibration set
uses its own seeds, apart from the evaluation seeds.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from rfc.cache import CacheMethod
from rfc.cache.base import sample_nfcs
from rfc.run.build import batch_invariant_rows, build, build_model, plan_run
from rfc.run.config import CALIBRATION_FILE, tau_key
from rfc.run.generate import batch_sizes, generate
from rfc.utils.devices import DeviceUse
from rfc.utils.files import atomic_write_text
from rfc.utils.progress import bar

LOG = logging.getLogger("rfc")


@dataclass
class Calibration:
    tau: float
    nfc: float
    target: float
    within_tolerance: bool
    trials: list[tuple[float, float]] = field(default_factory=list)  # (tau, mean nfc)


def bisect_tau(nfc_of: Callable[[float], float], target: float, tolerance: float = 0.5, tau0: float = 0.01,
               max_iters: int = 40) -> Calibration:
    """Search tau with |NFC(tau) - target| <= tolerance: bracket by factors of 4 from tau0, then
    bisect the bracket geometrically. Returns the best trial (closest NFC, then smallest tau)."""
    trials: list[tuple[float, float]] = []

    def done() -> bool:
        return any(abs(n - target) <= tolerance for _, n in trials) or len(trials) >= max_iters

    def f(tau: float) -> float:
        trials.append((tau, nfc_of(tau)))
        return trials[-1][1]

    lo, hi = tau0, tau0  # invariant once bracketed: NFC(lo) > target > NFC(hi)
    n = f(tau0)
    if n > target:
        while n > target and not done():
            lo, hi = hi, hi * 4
            n = f(hi)
    else:
        while n < target and not done() and lo > 1e-9:
            hi, lo = lo, lo / 4
            n = f(lo)
    while not done() and hi / lo > 1 + 1e-6:
        mid = math.sqrt(lo * hi)
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    tau, nfc = min(trials, key=lambda t: (abs(t[1] - target), t[0]))
    return Calibration(tau, nfc, target, abs(nfc - target) <= tolerance, trials)


def calibrate(cfg: DictConfig, target: float, num_samples: int, batch_size: int, seed: int,
              tolerance: float = 0.5, out_dir: str | Path = "outputs/calibration", knob: str = "tau") -> Calibration:
    """Calibrate ``method.<knob>`` of the composed config on seeds ``seed`` ...: RFC's tau, or any
    method's threshold under which mean NFC falls as it grows (First-Block Cache, TeaCache,
    cache-dit's residual_diff_threshold ...)."""
    if knob not in cfg.method:
        raise ValueError(f"calibration.knob={knob}: method {cfg.method._target_} has no key {knob!r}")
    plan = plan_run(cfg, out_dir)
    model, denoiser = build_model(plan)
    base = OmegaConf.to_container(cfg.method, resolve=False)
    base.pop(knob, None)

    # Each trial samples the whole calibration set (minutes on DiT-XL): one bar over the trials,
    # with the trial's own sampling bar beneath it while it runs.
    trials = bar(unit="trial", desc=f"calibrating {knob} for NFC {target:g}", secondary=True)
    count = 0  # trials so far (a disabled bar does not count)

    def nfc_of(value: float) -> float:
        nonlocal count
        count += 1
        method: CacheMethod = build(OmegaConf.create({**base, knob: value}), "method")
        method.attach(model)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                samples = generate(model, plan.sampler, denoiser, method, seed=seed,
                                   indices=range(num_samples), batch_size=batch_size, device=plan.device,
                                   progress=True, precision=str(cfg.precision),
                                   batch_invariant=batch_invariant_rows(cfg),
                                   desc=f"trial {count}: {knob} {value:.4g}", leave=False)
        finally:
            method.detach()
        sizes = batch_sizes(num_samples, batch_size)
        nfc = float(np.mean(sample_nfcs(samples.stats, sizes)))  # per sample: schedule_scope=sample differs
        trials.update(1)
        trials.set_postfix({knob: f"{value:.4g}", "nfc": f"{nfc:.2f}"})
        LOG.info("calibration trial %d: %s %.6g -> mean NFC %.2f (target %g; %.1f s)", count, knob, value, nfc, target,
                 time.perf_counter() - t0)
        return nfc

    with DeviceUse(plan.device), trials:  # runs timing on this device see the calibration's load
        return bisect_tau(nfc_of, target, tolerance)


def save_calibration(cfg: DictConfig, result: Calibration, num_samples: int, seed: int,
                     knob: str = "tau") -> tuple[Path, str]:
    """Record the value under its key in results/tau_calibration.json (read by ${calibrated_tau:N},
    or ${calibrated:<knob>,N} for another method's knob; the entry's "tau" holds the value)."""
    path = Path(cfg.paths.results) / CALIBRATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = tau_key(cfg, result.target, knob)
    with FileLock(str(path) + ".lock", timeout=60):
        table = json.loads(path.read_text()) if path.exists() else {}
        table[key] = {"tau": result.tau, "nfc": result.nfc, "target": result.target,
                      "within_tolerance": result.within_tolerance, "calibration_samples": num_samples,
                      "calibration_seed": seed, "trials": result.trials}
        atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    return path, key
