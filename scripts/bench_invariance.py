"""What the batch-invariant numerics (``batch_invariant=N``, rfc/utils/invariance.py) cost, and whether
a sample drawn alone is bit for bit the same sample in a batch on this device.

    python scripts/bench_invariance.py                     # CPU: dit-tiny, batches of 1, 8 and 250
    python scripts/bench_invariance.py model=dit-xl model.pretrained=false device=cuda \
        batch_sizes=[1,16,64] tiles=[4096,32768] precision=tf32

For each batch size, method (full compute and First-Block Cache in sample scope by default) and
numerics (the default, ``tiles`` 0, and each value of ``tiles``), one whole sampling loop per
round, every combination once per round (interleaved, so a change of the machine's load touches
them alike), after one untimed warm-up loop of each method and numerics. A loop figure is the
median over rounds; ``over_default`` divides it by the default numerics' loop of the same batch
and method. The check: the largest batch's first ``check_samples`` samples are drawn again one at
a time (batch 1) in each numerics and their final latents compared with the batch's
(``max_abs_diff``, ``bit_identical``). The JSON (device with its CPU model, torch version, threads,
the other processes' load) goes to results/bench/invariance_<device>_<time>.json.
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import Built, make_method, sync  # noqa: E402  (the latency benchmark's model and methods)
from bench_peers import built_on_device, cpu_model  # noqa: E402

from rfc.cache import CacheMethod  # noqa: E402
from rfc.run.build import device_name, precision_mode  # noqa: E402
from rfc.samplers.sampling import CFGDenoiser  # noqa: E402
from rfc.utils.devices import LoadSample, others_load  # noqa: E402
from rfc.utils.files import atomic_write_text  # noqa: E402
from rfc.utils.seeding import SampleStreams  # noqa: E402


class Loops:
    """Whole sampling loops of one model: samples ``ids`` with a method, in a numerics."""

    def __init__(self, cfg: DictConfig, built: Built) -> None:
        self.cfg, self.built = cfg, built
        self.shape = built.family.latent_shape(built.arch)

    def draw(self, method: CacheMethod, ids: list[int], rows: int) -> tuple[float, torch.Tensor, list[float]]:
        """Seconds of the loop, the final latents and the per-sample NFC of samples ``ids``."""
        device = self.built.device
        streams = SampleStreams(int(self.cfg.seed), ids, device)
        y = self.built.family.conditioning(self.built.model, streams, ids)
        x = streams.randn(self.shape)
        denoiser = CFGDenoiser(self.built.model, **self.built.guidance)
        method.attach(self.built.model)
        try:
            method.reset()
            sync(device)
            t0 = time.perf_counter()
            with precision_mode(str(self.cfg.precision), device, rows):
                out = self.built.sampler.sample(denoiser, x, y, noise=streams.noise_source(self.shape),
                                                listener=method)
            sync(device)
            seconds = time.perf_counter() - t0
        finally:
            method.detach()
        stats = method.stats()
        nfc = [float(len(s)) for s in stats.sample_full_indices] or [float(stats.full_steps)] * len(ids)
        return seconds, out.float().cpu(), nfc


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench_invariance")
def main(cfg: DictConfig) -> None:
    built = built_on_device(cfg)
    device = built.device
    loops = Loops(cfg, built)
    methods = {str(n): make_method(cfg, str(n), str(cfg.storage_dtype), tuple(cfg.method_overrides.get(n) or ()))
               for n in cfg.methods}
    numerics = [0, *(int(r) for r in cfg.tiles)]
    sizes = sorted(int(b) for b in cfg.batch_sizes)
    for method in methods.values():  # untimed: allocations, kernel selection
        for rows in numerics:
            loops.draw(method, [0], rows)
    times: dict[tuple[int, str, int], list[float]] = {}
    latents: dict[tuple[str, int], torch.Tensor] = {}
    nfcs: dict[tuple[int, str], list[float]] = {}
    loads: list[float] = []
    for r in range(int(cfg.rounds)):
        for b in sizes:
            for name, method in methods.items():
                for rows in numerics:
                    before = LoadSample.take(device.type)
                    seconds, out, nfc = loops.draw(method, list(range(b)), rows)
                    cores, _ = others_load(before, LoadSample.take(device.type))
                    if cores is not None:
                        loads.append(cores)
                    times.setdefault((b, name, rows), []).append(seconds)
                    if b == sizes[-1]:
                        latents[name, rows] = out
                    nfcs[b, name] = nfc
        print(f"round {r + 1}/{cfg.rounds} done", flush=True)

    checks = []
    n_check = min(int(cfg.check_samples), sizes[-1])
    for name, method in methods.items():
        for rows in numerics:
            alone = torch.cat([loops.draw(method, [i], rows)[1] for i in range(n_check)])
            diff = float((alone - latents[name, rows][:n_check]).abs().max())
            checks.append({"method": name, "tiles": rows, "batch": sizes[-1], "samples": n_check,
                           "max_abs_diff": diff, "bit_identical": diff == 0.0})

    loops_out = []
    for (b, name, rows), runs in times.items():
        seconds = statistics.median(runs)
        default = statistics.median(times[b, name, 0])
        loops_out.append({"batch": b, "method": name, "params": methods[name].params(), "tiles": rows,
                          "loop_s": seconds, "over_default": seconds / default,
                          "nfc_mean": statistics.mean(nfcs[b, name])})
    result = {
        "device": device_name(device), "cpu_model": cpu_model() if device.type == "cpu" else None,
        "torch_version": torch.__version__, "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "other_processes_cores_mean": statistics.mean(loads) if loads else None,
        "other_processes_cores_max": max(loads) if loads else None,
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": str(cfg.model.name), "sampler": built.sampler.name, "num_steps": built.sampler.num_steps,
        "cfg_scale": float(cfg.cfg_scale), "precision": str(cfg.precision), "rounds": int(cfg.rounds),
        "loops": loops_out, "checks": checks,
    }
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cuda" if device.type == "cuda" else "cpu"
    path = out_dir / f"invariance_{slug}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    for row in loops_out:
        print(f"batch {row['batch']:4d} {row['method']:10s} tiles {row['tiles']:6d}: loop {row['loop_s']:.3f} s "
              f"({row['over_default']:.2f}x default), NFC {row['nfc_mean']:.2f}")
    for c in checks:
        print(f"{c['method']:10s} tiles {c['tiles']:6d}: {c['samples']} samples alone vs batch {c['batch']}: "
              f"max |diff| {c['max_abs_diff']:.3g} ({'bit-identical' if c['bit_identical'] else 'differs'})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
