"""The paper's analysis figures for any model, from one command:

    python scripts/diagnostics.py model=dit-tiny target_nfc=14

Runs FORA and TaylorSeer (order = method.order) at the interval whose NFC is closest to the target
and RFC at a tau calibrated to it, on one batch of identical inputs, with full compute alongside
every cached site. Writes to diagnostics.out_dir (results/diagnostics/<model>/):
module_errors.csv/.png (Fig. 1c), ratio.csv + ratio.png (Fig. 2a: s_k and its relative standard
deviation), error_curves.csv/.png (Fig. 2b: input-forecast vs output error over steps) and
summary.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rfc.run.config import register_resolvers
from rfc.utils.files import atomic_write_text

register_resolvers()


def closest_interval(make, num_steps: int, target: float) -> int:  # noqa: ANN001 - a method factory
    """The interval N whose full-step count on this sampler is closest to the target."""
    from rfc.samplers.sampling import StepInfo

    def count(n: int) -> int:
        method = make(n)
        method.reset()
        for i in range(num_steps):
            method.begin_step(StepInfo(i, 0, num_steps))
        return method.stats().full_steps

    return min(range(1, num_steps + 1), key=lambda n: (abs(count(n) - target), n))


@hydra.main(version_base="1.3", config_path="../configs", config_name="diagnostics")
def main(cfg: DictConfig) -> None:
    from rfc.run.build import plan_run
    from rfc.utils.devices import DeviceUse

    target = float(cfg.target_nfc)
    work = Path(HydraConfig.get().runtime.output_dir)
    plan = plan_run(cfg, work)
    with DeviceUse(plan.device):  # runs timing on this device see the diagnostics' load
        _diagnose(cfg, plan, work, target)


def _diagnose(cfg: DictConfig, plan, work: Path, target: float) -> None:  # noqa: ANN001 - a RunPlan
    import numpy as np
    import torch

    from baselines.fora import FORA
    from baselines.taylorseer import TaylorSeer
    from rfc.run.build import batch_invariant_rows, build, build_model
    from rfc.run.generate import generate
    from rfc.tools.calibration import calibrate
    from rfc.tools.diagnostics import Probe, write_outputs

    d = cfg.diagnostics
    order = int(cfg.method.order)
    steps = plan.sampler.num_steps
    n_fora = closest_interval(FORA, steps, target)
    n_ts = closest_interval(lambda n: TaylorSeer(n, order), steps, target)
    cal = calibrate(cfg, target, int(d.calibration_samples), int(d.calibration_samples), int(d.calibration_seed),
                    out_dir=work)
    rfc_cfg = OmegaConf.merge(cfg.method, {"tau": cal.tau})
    methods = [(f"fora N={n_fora}", FORA(n_fora)), (f"taylorseer N={n_ts} m={order}", TaylorSeer(n_ts, order)),
               (f"rfc tau={cal.tau:.4g}", build(rfc_cfg, "method"))]

    model, denoiser = build_model(plan)
    records = []
    for label, method in methods:
        method.fused = False  # the probe observes every site, so cached steps must run site by site
        method.attach(model)
        probe = Probe(method, label, order)
        try:
            samples = generate(model, plan.sampler, denoiser, method, seed=int(d.seed),
                               indices=range(int(d.num_samples)), batch_size=int(d.batch_size),
                               device=plan.device, progress=False, precision=str(cfg.precision),
                               batch_invariant=batch_invariant_rows(cfg))
        finally:
            probe.remove()
            method.detach()
        probe.record.nfc = float(np.mean([s.full_steps for s in samples.stats]))
        records.append(probe.record)
        print(f"{label}: NFC {probe.record.nfc:g}", flush=True)

    out_dir = Path(d.out_dir)
    summary = write_outputs(records, out_dir, plan.arch.depth)
    summary.update(model=str(cfg.model.name), sampler=plan.sampler.name, num_steps=steps, target_nfc=target,
                   num_samples=int(d.num_samples), seed=int(d.seed), tau=cal.tau, device=str(plan.device),
                   torch_version=torch.__version__)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["methods"], indent=2))
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
