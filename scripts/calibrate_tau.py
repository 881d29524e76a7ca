"""Find the RFC threshold tau (or another method's threshold) that gives a target mean NFC, and record it.

    python scripts/calibrate_tau.py model=dit-tiny target_nfc=14
    python scripts/calibrate_tau.py model=dit-xl target_nfc=8 calibration.num_samples=256
    python scripts/calibrate_tau.py model=flux-tiny method=fbcache calibration.knob=threshold target_nfc=14

With ``calibration.knob=<key>`` the value found is recorded for ``method.<key>: ${calibrated:<key>,14}``.

Takes the same overrides as run.py (model, sampler, cfg_scale, method.* of RFC), bisects tau on a
calibration set of seeds (calibration.seed ...) until the mean NFC is within calibration.tolerance
of the target, prints the tau and the override to use, and records it in
results/tau_calibration.json, where ``method.tau='${calibrated_tau:14}'`` finds it in a sweep.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rfc.run.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    from rfc.models.load import CheckpointError, MissingAssetError
    from rfc.run.cli import LOG_FILE, attach_log, detach_log
    from rfc.tools.calibration import calibrate, save_calibration

    c = cfg.calibration
    out_dir = HydraConfig.get().runtime.output_dir
    handlers = attach_log(out_dir)  # each trial's tau and NFC go to <out_dir>/run.log
    try:
        knob = str(c.get("knob", "tau"))
        result = calibrate(cfg, float(cfg.target_nfc), int(c.num_samples), int(c.batch_size), int(c.seed),
                           float(c.tolerance), out_dir, knob=knob)
    except (MissingAssetError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        detach_log(handlers)
    print(f"log: {out_dir}/{LOG_FILE}")
    for value, nfc in result.trials:
        print(f"  {knob} {value:.6g} -> mean NFC {nfc:.2f}")
    path, _ = save_calibration(cfg, result, int(c.num_samples), int(c.seed), knob=knob)
    status = "within" if result.within_tolerance else "NOT within"
    print(f"{knob} = {result.tau:.6g}: mean NFC {result.nfc:.2f} ({status} +-{c.tolerance} of {cfg.target_nfc})")
    print(f"use: method.{knob}={result.tau:.6g}   (recorded in {path})")
    if not result.within_tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
