"""Latency of full and cached steps, and of whole sampling runs, for each caching method.

    python scripts/bench_latency.py model=dit-s                       # CPU: DiT-S/2, fp32, batch 8
    python scripts/bench_latency.py model=dit-xl batch_sizes=[16,64] precisions=[bf16] compile=true \
        end_to_end=true                                                # GPU: DiT-XL/2, random weights

Weights are random (``model.pretrained=false``): latency does not depend on their values. For
each batch size and precision it measures, with guidance (2B rows per forward):

- the full step: the model's forward with no method attached (compiled when compile=true: the
  strongest full-compute path is the baseline every ratio is taken against);
- each method's cached step, from the method's own schedule: the first ``prefix_steps`` steps of
  DDIM-50 run with the method attached (filling its cache), then the last cached step among them
  is timed ``repeats`` times (median). ``fused`` rows use the fused step (compiled with compile=true),
  ``per-site`` rows the per-site path (the naive anchor);
- end to end (end_to_end=true): the whole 50-step loop per method at NFC 14 (FORA N=4,
  TaylorSeer N=4 m=2, RFC m=2 with tau bisected to NFC 14 on this model, ToCa N=4 R=0.07), and
  an estimate from the step times (NFC x full + cached steps x cached) either way;
- peak GPU memory of each method's run.

RFC's step rows use tau = 1e9 (every step after the warm-up is cached and the RCS decision still
runs each step), so they time the cached step itself. The table is printed; JSON with the device,
torch version and settings goes to results/bench/.
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from baselines.fora import FORA  # noqa: E402
from baselines.taylorseer import TaylorSeer  # noqa: E402
from baselines.toca import ToCa  # noqa: E402
from rfc.cache import CacheMethod, NoCache  # noqa: E402
from rfc.calibration import bisect_tau  # noqa: E402
from rfc.config import register_resolvers  # noqa: E402
from rfc.devices import DeviceUse  # noqa: E402
from rfc.files import atomic_write_text  # noqa: E402
from rfc.method import RFC  # noqa: E402
from rfc.models.load import build_dit  # noqa: E402
from rfc.runner import device_name, model_config, precision_mode, resolve_device  # noqa: E402
from rfc.samplers.sampling import CFGDenoiser, DDIMSampler, StepInfo  # noqa: E402

register_resolvers()

NUM_STEPS = 50
TARGET_NFC = 14


def step_methods(fused: bool, storage: str) -> dict[str, Callable[[], CacheMethod]]:
    """Methods whose cached step is timed (RFC with an unreachable tau: all cached after warm-up)."""
    def with_fused(m: CacheMethod) -> CacheMethod:
        m.fused = fused
        return m

    return {"fora": lambda: with_fused(FORA(interval=4)),
            "taylorseer": lambda: with_fused(TaylorSeer(interval=4, order=2, storage_dtype=storage)),
            "rfc": lambda: with_fused(RFC(tau=1e9, order=2, storage_dtype=storage)),
            "toca": lambda: ToCa(interval=4, fresh_ratio=0.07)}


def storage_for(cfg: DictConfig, precision: str) -> str:
    """storage_dtype=auto: bf16 factors under bf16 autocast (the branch outputs are bf16 there), else fp32."""
    if str(cfg.storage_dtype) == "auto":
        return "bf16" if precision == "bf16" else "fp32"
    return str(cfg.storage_dtype)


class Timer:
    """Seconds of a region; synchronises the device so the figure is the region's own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Timer:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0


def time_cached_step(den: CFGDenoiser, method: CacheMethod, x: torch.Tensor, y: torch.Tensor,
                     sampler: DDIMSampler, steps: int, repeats: int, device: torch.device) -> list[float]:
    """Run the first ``steps`` steps of the schedule (untimed: fills the cache, compiles), then time
    the last cached step among them ``repeats`` more times. Re-running a cached step is valid:
    predictions do not change what the method stores (RFC's decision error only accumulates)."""
    method.reset()
    d = sampler.diffusion
    last = None
    for index, k in enumerate(list(reversed(range(d.num_timesteps)))[:steps]):
        info = StepInfo(index=index, timestep=int(d.timestep_map[k]), num_steps=d.num_timesteps)
        t = torch.full((x.shape[0],), k, device=device, dtype=torch.long)
        method.begin_step(info)
        eps = den(x, d.model_timesteps(t), y)
        method.end_step(info)
        if not method.full:
            last = (info, x, t)
        x = sampler.step(eps, x, t, k, None)
    if last is None:
        return []
    info, x, t = last
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            method.begin_step(info)
            den(x, d.model_timesteps(t), y)
            method.end_step(info)
        times.append(timer.seconds)
    return times


def time_full_step(den: CFGDenoiser, x: torch.Tensor, y: torch.Tensor, repeats: int,
                   device: torch.device) -> list[float]:
    """The plain forward (no method attached) at the first step, after one untimed call."""
    t = torch.full((x.shape[0],), 999, device=device, dtype=torch.long)
    den(x, t, y)
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            den(x, t, y)
        times.append(timer.seconds)
    return times


def bench_setting(cfg: DictConfig, model: torch.nn.Module, batch: int, precision: str,
                  device: torch.device, save: Callable[[dict], None]) -> dict:
    """One batch size and precision; ``save(partial)`` is called after every figure, so a run
    stopped by a time limit keeps what it measured."""
    dit = model.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, dit.in_channels, dit.input_size, dit.input_size), generator=gen).to(device)
    y = torch.randint(dit.num_classes, (batch,), generator=gen).to(device)
    den = CFGDenoiser(model, float(cfg.cfg_scale), null_class=dit.num_classes,
                      guided_channels=int(cfg.model.guided_channels))
    sampler = DDIMSampler(num_steps=NUM_STEPS)
    repeats, prefix = int(cfg.repeats), int(cfg.prefix_steps)
    rows: list[dict] = []
    e2e: list[dict] = []
    setting = {"batch_size": batch, "precision": precision, "compile": bool(cfg.compile), "full_step_s": None,
               "storage_dtype": storage_for(cfg, precision),
               "steps": rows, "end_to_end": e2e}

    def peak_reset() -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def peak() -> float | None:
        return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    # the full step: no method attached, compiled as a whole when compile=true
    compiled_full = None
    if cfg.compile:
        compiled_full = torch.compile(model, dynamic=False)
        den.model = compiled_full
    peak_reset()
    with precision_mode(precision, device):
        full_s = statistics.median(time_full_step(den, x, y, repeats, device))
    rows.append({"method": "none", "path": "compiled" if cfg.compile else "eager", "step_s": full_s,
                 "fraction_of_full": 1.0, "peak_memory_gb": peak()})
    den.model = model
    setting["full_step_s"] = full_s
    save(setting)
    print(f"  full step: {full_s * 1e3:.2f} ms", flush=True)

    paths = [("per-site", False)] + [("fused" + ("+compiled" if cfg.compile else ""), True)]
    for name in cfg.methods:
        for label, fused in paths:
            if name == "toca" and fused:
                continue  # ToCa has no fused step (its cached steps recompute token subsets per block)
            method = step_methods(fused, storage_for(cfg, precision))[name]()
            method.compile = bool(cfg.compile) and fused
            peak_reset()
            method.attach(model)
            try:
                with precision_mode(precision, device):
                    cached = time_cached_step(den, method, x, y, sampler, prefix, repeats, device)
            finally:
                method.detach()
            if not cached:
                continue
            sec = statistics.median(cached)
            rows.append({"method": name, "path": label if name != "toca" else "per-site", "step_s": sec,
                         "fraction_of_full": sec / full_s, "peak_memory_gb": peak()})
            save(setting)
            print(f"  {name:10s} {label:16s} cached step {sec * 1e3:8.2f} ms = {sec / full_s:.3f} of full",
                  flush=True)

    if cfg.end_to_end:
        end_to_end(cfg, model, compiled_full, den, sampler, x, y, precision, device, peak_reset, peak,
                   e2e, lambda: save(setting))
    return setting


def end_to_end(cfg: DictConfig, model: torch.nn.Module, compiled_full: torch.nn.Module | None, den: CFGDenoiser,
               sampler: DDIMSampler, x: torch.Tensor, y: torch.Tensor, precision: str, device: torch.device,
               peak_reset: Callable[[], None], peak: Callable[[], float | None], rows: list[dict],
               save: Callable[[], None]) -> list[dict]:
    """Whole 50-step loops at NFC 14 (ToCa: its official 17), median of ``e2e_repeats``."""

    def loop(method: CacheMethod, use_compiled: bool = False) -> tuple[float, int]:
        den.model = compiled_full if (use_compiled and compiled_full is not None) else model
        method.attach(model)
        try:
            with precision_mode(precision, device):
                method.reset()
                sampler.sample(den, x, y, listener=method)  # warm-up
                times = []
                for _ in range(int(cfg.e2e_repeats)):
                    method.reset()
                    with Timer(device) as timer:
                        sampler.sample(den, x, y, listener=method)
                    times.append(timer.seconds)
                return statistics.median(times), method.stats().full_steps
        finally:
            method.detach()
            den.model = model

    def nfc_of(tau: float) -> float:
        return float(loop(RFC(tau=tau, order=2, storage_dtype=storage))[1])

    tau = None  # RFC's, bisected to NFC 14 on this model and batch just before RFC is timed
    storage = storage_for(cfg, precision)
    methods = {"none": (lambda: NoCache(), True), "fora": (lambda: FORA(interval=4), False),
               "taylorseer": (lambda: TaylorSeer(interval=4, order=2, storage_dtype=storage), False),
               "rfc": (lambda: RFC(tau=tau, order=2, storage_dtype=storage), False),
               "toca": (lambda: ToCa(interval=4, fresh_ratio=0.07), False)}
    base = None
    for name in ["none", *cfg.methods]:
        make, whole = methods[name]
        if name == "rfc":  # the lambda reads tau when called
            tau = bisect_tau(nfc_of, TARGET_NFC, 0.5).tau
        method = make()
        method.compile = bool(cfg.compile)
        if cfg.compile and name != "none":  # full steps of cached runs: compiled branches, as run.py does
            for block in model.blocks:
                block.attn.compile(dynamic=False)
                block.mlp.compile(dynamic=False)
        peak_reset()
        sec, nfc = loop(method, use_compiled=whole)
        base = sec if name == "none" else base
        rows.append({"method": name, "nfc": nfc, "latency_s": sec, "speedup": base / sec, "peak_memory_gb": peak(),
                     "tau": tau if name == "rfc" else None})
        save()
        print(f"  e2e {name:10s} NFC {nfc:2d}  {sec:.3f} s  {base / sec:.2f}x", flush=True)
    return rows


def estimate(setting: dict) -> list[dict]:
    """End-to-end speedups at NFC 14 implied by the step times: 50 full vs 14 full + 36 cached."""
    full = setting["full_step_s"]
    out = []
    for row in setting["steps"]:
        if row["method"] in ("none", "toca"):
            continue
        cached = row["step_s"]
        out.append({"method": row["method"], "path": row["path"],
                    "speedup": NUM_STEPS * full / (TARGET_NFC * full + (NUM_STEPS - TARGET_NFC) * cached)})
    return out


def print_table(result: dict) -> None:
    print(f"\n{result['model']} on {result['device']} (torch {result['torch_version']})")
    print("| batch | precision | method | path | step (ms) | x full step | est. e2e speedup @NFC14 |")
    print("|---|---|---|---|---|---|---|")
    for s in result["settings"]:
        est = {(e["method"], e["path"]): e["speedup"] for e in s["estimated_speedup"]}
        for r in s["steps"]:
            sp = est.get((r["method"], r["path"]))
            print(f"| {s['batch_size']} | {s['precision']}{'+compile' if s['compile'] else ''} | {r['method']} | "
                  f"{r['path']} | {r['step_s'] * 1e3:.2f} | {r['fraction_of_full']:.3f} | "
                  f"{'' if sp is None else f'{sp:.2f}x'} |")
        for e in s["end_to_end"]:
            print(f"| {s['batch_size']} | e2e | {e['method']} | NFC {e['nfc']} | {e['latency_s'] * 1e3:.1f} | | "
                  f"{e['speedup']:.2f}x (measured) |")


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench")
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    device = resolve_device(str(cfg.device))
    dit = model_config(cfg.model)
    model = build_dit(dit, None, init="dense", seed=0).to(device).eval()
    result = {"model": str(cfg.model.name), "arch": str(cfg.model.get("arch") or "custom"),
              "device": device_name(device), "torch_version": torch.__version__,
              "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
              "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "settings_requested": OmegaConf.to_container(cfg, resolve=True), "settings": []}
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cuda" if device.type == "cuda" else "cpu"
    path = out_dir / f"{cfg.model.name}_{slug}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    t0 = time.perf_counter()
    with DeviceUse(device) as use:  # other jobs of the harness on this device invalidate the figures
        start = use.snapshot()
        _bench_all(cfg, model, device, result, path, t0, lambda: DeviceUse.shared(start, use.snapshot()))
    print_table(result)
    if result.get("device_shared_with"):
        print(f"warning: another job of the harness used {result['device']} during the benchmark "
              f"({result['device_shared_with']}): these figures are not the method's alone")
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")


def _bench_all(cfg: DictConfig, model: torch.nn.Module, device: torch.device, result: dict, path: Path, t0: float,
               shared: Callable[[], str | None]) -> None:
    for precision in cfg.precisions:
        for batch in cfg.batch_sizes:
            print(f"batch {batch}, {precision}{' + compile' if cfg.compile else ''}:", flush=True)
            done = list(result["settings"])

            def save(partial: dict, done: list = done) -> None:
                partial["estimated_speedup"] = estimate(partial)
                result["settings"] = [*done, partial]
                result["seconds"] = time.perf_counter() - t0
                result["device_shared_with"] = shared()  # None: the device was the benchmark's alone
                atomic_write_text(path, json.dumps(result, indent=1) + "\n")

            bench_setting(cfg, model, int(batch), str(precision), device, save)


if __name__ == "__main__":
    main()
