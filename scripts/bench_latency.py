"""Latency of the plain full step and of each method's full and cached steps, and end-to-end speedups.

    python scripts/bench_latency.py model=dit-s                       # CPU: DiT-S/2 fp32, eager + compiled
    python scripts/bench_latency.py model=dit-xl device=cuda batch_sizes=[16,64] precisions=[bf16] \
        variants=[compiled]                                            # GPU: the issue's setting

Weights are random (``model.pretrained=false``): latency does not depend on their values. For each
precision, variant (``eager`` or ``compiled``: torch.compile of the plain forward and of the methods'
step programs, with CUDA graphs for cached steps on a GPU) and batch size (images; guidance doubles
the rows), every figure comes from whole DDIM-50 loops with CFG 1.5:

- the plain loop (no method): ``full_ms`` is the median time of one of its steps;
- each method at NFC 14 (FORA N=4, TaylorSeer N=4 m=2, RFC m=2 with tau bisected to NFC 14 on
  these weights and this batch; ToCa N=4 R=0.07, eager only, at its own NFC): ``full_in_cache_ms``
  and ``cached_ms`` are the median times of its full and cached steps (a step = the method's
  announcements, its decision and the model call), ``e2e_speedup_nfc14`` = plain loop time /
  the method's loop time, both loops timed whole (every decision, RCS included);
- ``cached_over_full`` and ``full_in_cache_over_full`` divide by ``full_ms`` of the same variant.

Every program is compiled by an untimed warm-up before the timed loops. On a CPU one loop per method
gives both the step times and the loop time (timing a step needs no synchronisation there); on a
GPU the loop is timed once whole, then once step by step. The table is printed; JSON with the
device name, torch version and settings goes to results/bench/ (written after every figure, so a
run stopped by a time limit keeps what it measured).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from baselines.fora import FORA
from baselines.taylorseer import TaylorSeer
from baselines.toca import ToCa
from rfc.cache import CacheMethod, NoCache
from rfc.cache.base import WarmedUp
from rfc.method import RFC
from rfc.models.load import build_dit
from rfc.run.build import apply_precision, device_name, model_config, precision_mode, resolve_device
from rfc.run.config import register_resolvers
from rfc.samplers.sampling import CFGDenoiser, DDIMSampler, StepInfo
from rfc.tools.calibration import bisect_tau
from rfc.utils.devices import DeviceUse
from rfc.utils.files import atomic_write_text

register_resolvers()

NUM_STEPS = 50
TARGET_NFC = 14
VARIANTS = ("eager", "compiled")
CPU_IMAGE_SIZE = 128  # image_size=auto on a CPU: a 256 px DiT-S/2 loop takes about 2 min there


def make_method(name: str, storage: str, tau: float | None = None) -> CacheMethod:
    """The methods at NFC 14 on DDIM-50 (ToCa at its own)."""
    if name == "none":
        return NoCache()
    if name == "fora":
        return FORA(interval=4)
    if name == "taylorseer":
        return TaylorSeer(interval=4, order=2, storage_dtype=storage)
    if name == "rfc":
        return RFC(tau=tau if tau is not None else 0.1, order=2, storage_dtype=storage)
    if name == "toca":
        return ToCa(interval=4, fresh_ratio=0.07)
    raise ValueError(f"methods: unknown method {name!r} (fora, taylorseer, rfc, toca)")


def storage_for(cfg: DictConfig, precision: str) -> str:
    """storage_dtype=auto: bf16 factors when the model computes in bf16, else fp32."""
    if str(cfg.storage_dtype) == "auto":
        return "bf16" if precision.startswith("bf16") else "fp32"
    return str(cfg.storage_dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """The method's listener, timing every step (announcements, decision, model call)."""

    def __init__(self, method: CacheMethod, device: torch.device) -> None:
        self.method, self.device = method, device
        self.full: list[float] = []
        self.cached: list[float] = []

    def begin_step(self, step: StepInfo) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()
        self.method.begin_step(step)

    def end_step(self, step: StepInfo) -> None:
        self.method.end_step(step)
        sync(self.device)
        (self.full if self.method.full else self.cached).append(time.perf_counter() - self.t0)


class _Warm(Exception):
    pass


def stop_warm_up() -> None:
    raise _Warm


class Bench:
    """One model, precision, variant and batch: the plain loop and each method's loop."""

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, batch: int, precision: str, variant: str,
                 device: torch.device) -> None:
        dit = model.config
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn((batch, dit.in_channels, dit.input_size, dit.input_size), generator=gen).to(device)
        self.y = torch.randint(dit.num_classes, (batch,), generator=gen).to(device)
        self.cfg, self.model, self.device, self.precision = cfg, model, device, precision
        self.compiled = variant == "compiled"
        self.sampler = DDIMSampler(num_steps=NUM_STEPS)
        self.plain = torch.compile(model, dynamic=False) if self.compiled else model
        self.guidance = dict(scale=float(cfg.cfg_scale), null_class=dit.num_classes,
                             guided_channels=int(cfg.model.guided_channels))

    def loop(self, method: CacheMethod, listener: object | None = None) -> float:
        """Seconds of one whole sampling loop with ``method`` (attached by the caller)."""
        method.reset()
        den = CFGDenoiser(self.plain if isinstance(method, NoCache) else self.model, **self.guidance)
        sync(self.device)
        t0 = time.perf_counter()
        try:
            self.sampler.sample(den, self.x, self.y, listener=listener or method)
        except _Warm:
            pass
        sync(self.device)
        return time.perf_counter() - t0

    def run(self, method: CacheMethod) -> dict:
        """Warm-up, then the timed loop(s): loop seconds, step medians, NFC."""
        method.compile = self.compiled and not isinstance(method, NoCache)
        method.attach(self.model)
        try:
            with precision_mode(self.precision, self.device):
                self.loop(method, WarmedUp(method, stop_warm_up))
                clock = StepClock(method, self.device)
                if self.device.type == "cuda":
                    seconds = statistics.median(self.loop(method) for _ in range(int(self.cfg.e2e_repeats)))
                    self.loop(method, clock)
                else:
                    seconds = self.loop(method, clock)
                nfc = method.stats().full_steps
        finally:
            method.detach()
        return {"loop_s": seconds, "nfc": nfc,
                "full_ms": 1e3 * statistics.median(clock.full) if clock.full else None,
                "cached_ms": 1e3 * statistics.median(clock.cached) if clock.cached else None}

    def nfc_of(self, tau: float, storage: str) -> float:
        method = make_method("rfc", storage, tau)
        method.compile = self.compiled
        method.attach(self.model)
        try:
            with precision_mode(self.precision, self.device):
                self.loop(method)
        finally:
            method.detach()
        return float(method.stats().full_steps)


def bench_setting(cfg: DictConfig, model: torch.nn.Module, batch: int, precision: str, variant: str,
                  device: torch.device, taus: dict, save: Callable[[dict], None]) -> dict:
    storage = storage_for(cfg, precision)
    bench = Bench(cfg, model, batch, precision, variant, device)
    setting = {"batch_size": batch, "rows_per_forward": 2 * batch if float(cfg.cfg_scale) > 1 else batch,
               "precision": precision, "variant": variant, "storage_dtype": storage, "methods": {}}
    plain = bench.run(NoCache())
    full_ms = plain["full_ms"]
    setting.update(full_ms=full_ms, plain_loop_s=plain["loop_s"])
    save(setting)
    print(f"  plain: full step {full_ms:.2f} ms, loop {plain['loop_s']:.2f} s", flush=True)
    for name in cfg.methods:
        if name == "toca" and bench.compiled:
            setting["methods"][name] = {"skipped": "no step programs: ToCa's partial steps recompute a different "
                                                   "number of tokens per block and step (see the README)"}
            continue
        tau = None
        if name == "rfc":
            key = (batch, precision)
            if key not in taus:  # bisected once per batch and precision, shared by the variants
                cal = bisect_tau(lambda t: bench.nfc_of(t, storage), TARGET_NFC, 0.5, max_iters=int(cfg.tau_iters))
                taus[key] = cal.tau
            tau = taus[key]
        r = bench.run(make_method(name, storage, tau))
        row = {"nfc": r["nfc"], "tau": tau, "full_ms": full_ms, "full_in_cache_ms": r["full_ms"],
               "cached_ms": r["cached_ms"], "loop_s": r["loop_s"],
               "cached_over_full": r["cached_ms"] / full_ms if r["cached_ms"] is not None else None,
               "full_in_cache_over_full": r["full_ms"] / full_ms if r["full_ms"] is not None else None,
               "e2e_speedup_nfc14": plain["loop_s"] / r["loop_s"]}
        setting["methods"][name] = row
        save(setting)
        print(f"  {name:10s} NFC {r['nfc']:2d}  full {fmt(r['full_ms'])} ms ({fmt(row['full_in_cache_over_full'], 3)})"
              f"  cached {fmt(r['cached_ms'])} ms ({fmt(row['cached_over_full'], 3)})"
              f"  loop {r['loop_s']:.2f} s = {row['e2e_speedup_nfc14']:.2f}x", flush=True)
    return setting


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(result: dict) -> None:
    print(f"\n{result['model']} {result['image_size']} px on {result['device']} (torch {result['torch_version']})")
    print("| batch | precision | variant | method | NFC | full_ms | full_in_cache_ms | cached_ms | cached_over_full "
          "| full_in_cache_over_full | e2e_speedup_nfc14 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in result["settings"]:
        for name, r in s["methods"].items():
            head = f"| {s['batch_size']} | {s['precision']} | {s['variant']} | {name} |"
            if "skipped" in r:
                print(f"{head} skipped: {r['skipped']} |")
                continue
            print(f"{head} {r['nfc']} | {fmt(r['full_ms'])} | {fmt(r['full_in_cache_ms'])} | {fmt(r['cached_ms'])} | "
                  f"{fmt(r['cached_over_full'], 3)} | {fmt(r['full_in_cache_over_full'], 3)} | "
                  f"{fmt(r['e2e_speedup_nfc14'])}x |")


def check(cfg: DictConfig) -> None:
    """Bad settings named before any model is built."""
    for v in cfg.variants:
        if v not in VARIANTS:
            raise SystemExit(f"error: variants: unknown variant {v!r} (eager, compiled)")
    for name in cfg.methods:
        make_method(str(name), "fp32")


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench")
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    check(cfg)
    device = resolve_device(str(cfg.device))
    if str(cfg.image_size) != "auto":
        cfg.model.image_size = int(cfg.image_size)
    elif device.type == "cpu":
        cfg.model.image_size = CPU_IMAGE_SIZE
    dit = model_config(cfg.model)
    base = build_dit(dit, None, init="dense", seed=0).to(device).eval()
    result = {"model": str(cfg.model.name), "arch": str(cfg.model.get("arch") or "custom"),
              "image_size": int(cfg.model.image_size), "device": device_name(device),
              "torch_version": torch.__version__,
              "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
              "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "settings_requested": OmegaConf.to_container(cfg, resolve=True), "settings": []}
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cuda" if device.type == "cuda" else "cpu"
    path = out_dir / f"{cfg.model.name}_{slug}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    t0 = time.perf_counter()
    taus: dict = {}
    with DeviceUse(device) as use:  # other jobs of the harness on this device invalidate the figures
        start = use.snapshot()
        for precision in cfg.precisions:
            model = apply_precision(copy.deepcopy(base), str(precision)) if str(precision) == "bf16" else base
            for variant in cfg.variants:
                for batch in cfg.batch_sizes:
                    print(f"batch {batch}, {precision}, {variant}:", flush=True)
                    done = list(result["settings"])

                    def save(partial: dict, done: list = done) -> None:
                        result["settings"] = [*done, partial]
                        result["seconds"] = time.perf_counter() - t0
                        result["device_shared_with"] = DeviceUse.shared(start, use.snapshot())
                        atomic_write_text(path, json.dumps(result, indent=1) + "\n")

                    bench_setting(cfg, model, int(batch), str(precision), str(variant), device, taus, save)
    print_table(result)
    if result.get("device_shared_with"):
        print(f"warning: another job of the harness used {result['device']} during the benchmark "
              f"({result['device_shared_with']}): these figures are not the method's alone")
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
