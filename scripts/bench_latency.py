"""Latency of the plain full step and of each method's full and cached steps, and end-to-end speedups,
for any registered model family and any registered method, by name.

    python scripts/bench_latency.py model=dit-s                       # CPU: DiT-S/2 fp32, eager + compiled
    python scripts/bench_latency.py model=flux-tiny image_size=512    # CPU: 1,024 image tokens
    python scripts/bench_latency.py model=dit-xl device=cuda batch_sizes=[16,64] precisions=[bf16] \
        variants=[compiled]                                            # GPU

Weights are random (``model.pretrained=false``): latency does not depend on their values. The
model is built by its family (rfc.models.family), the sampler from the model's sampler config and
each method from ``configs/method/<name>.yaml`` with the overrides of ``nfc_settings`` (the
paper's budget, NFC 14 of 50 steps); a method listed under ``bisect`` has that key searched to
``target_nfc`` on these weights and this batch (RFC's tau, the block caches' thresholds). For each
precision, variant (``eager`` or ``compiled``: torch.compile of the plain forward and of the methods'
step programs, with CUDA graphs for cached steps on a GPU) and batch size, every figure comes from
whole sampling loops:

- the plain loop (no method): ``full_ms`` is the median time of one of its steps;
- each method: ``full_in_cache_ms`` and ``cached_ms`` are the median times of its full and cached
  steps (a step = the method's announcements, its decision and the model call), and
  ``e2e_speedup_nfc14`` = plain loop time / the method's loop time, both loops timed whole (every
  decision included);
- ``cached_over_full`` and ``full_in_cache_over_full`` divide by ``full_ms`` of the same variant.

A method without step programs (ToCa, First-Block Cache, TeaCache) has no compiled variant: its row
says so. Every program is compiled by an untimed warm-up before the timed loops. On a CPU one loop
per method gives both the step times and the loop time (timing a step needs no synchronisation
there); on a GPU the loop is timed once whole, then once step by step. The table is printed; JSON
with the device name, torch version, thread count, load and settings goes to results/bench/
(written after every figure, so a run stopped by a time limit keeps what it measured).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from rfc.cache import CacheMethod, NoCache
from rfc.cache.base import WarmedUp
from rfc.cache.registry import registered_methods
from rfc.models.family import ModelFamily, family_of
from rfc.run.build import apply_precision, build, device_name, precision_mode, resolve_device
from rfc.run.config import register_resolvers
from rfc.samplers.sampling import CFGDenoiser, Sampler, StepInfo
from rfc.tools.calibration import bisect_tau
from rfc.utils.devices import DeviceUse
from rfc.utils.files import atomic_write_text
from rfc.utils.seeding import SampleStreams

register_resolvers()

VARIANTS = ("eager", "compiled")


def storage_for(cfg: DictConfig, precision: str) -> str:
    """storage_dtype=auto: bf16 factors when the model computes in bf16, else fp32."""
    if str(cfg.storage_dtype) == "auto":
        return "bf16" if precision.startswith("bf16") else "fp32"
    return str(cfg.storage_dtype)


def method_node(cfg: DictConfig, name: str, extra: tuple[str, ...] = ()) -> DictConfig:
    """configs/method/<name>.yaml with the benchmark's NFC overrides and ``extra`` applied, composed
    (and so type-checked) exactly as a run composes it."""
    settings = [str(o) for o in (cfg.nfc_settings.get(name) or [])]
    return compose(config_name="run", overrides=[f"method={name}", *settings, *extra]).method


def make_method(cfg: DictConfig, name: str, storage: str, extra: tuple[str, ...] = ()) -> CacheMethod:
    """The method ``name`` at the benchmark's setting; factors stored in ``storage`` where the
    method stores any."""
    node = method_node(cfg, name, extra)
    if "storage_dtype" in node:
        node.storage_dtype = storage
    return build(node, "method")


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


class Built:
    """One model of a family on its device, with its sampler, guidance and one batch of inputs."""

    def __init__(self, cfg: DictConfig, family: ModelFamily, arch: object, device: torch.device) -> None:
        self.family, self.arch, self.device = family, arch, device
        prompt_set = family.prompts(cfg)
        self.model = family.build(cfg, arch, device, prompt_set.prompts if prompt_set is not None else None).eval()
        self.sampler: Sampler = build(cfg.sampler, "sampler", **family.sampler_args(arch))
        self.guidance = family.guidance(cfg, arch)

    def inputs(self, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's noise and conditioning, drawn from the harness's per-sample streams."""
        streams = SampleStreams(seed, range(batch), self.device)
        y = self.family.conditioning(self.model, streams, range(batch))
        return streams.randn(self.family.latent_shape(self.arch)), y


class Bench:
    """One model, precision, variant and batch: the plain loop and each method's loop."""

    def __init__(self, cfg: DictConfig, built: Built, model: torch.nn.Module, batch: int, precision: str,
                 variant: str) -> None:
        self.cfg, self.built, self.model, self.device = cfg, built, model, built.device
        self.x, self.y = built.inputs(batch, int(cfg.seed))
        self.precision = precision
        self.compiled = variant == "compiled"
        self.plain = torch.compile(model, dynamic=False) if self.compiled else model

    def loop(self, method: CacheMethod, listener: object | None = None) -> float:
        """Seconds of one whole sampling loop with ``method`` (attached by the caller)."""
        method.reset()
        den = CFGDenoiser(self.plain if method.computes_everything else self.model, **self.built.guidance)
        sync(self.device)
        t0 = time.perf_counter()
        try:
            self.built.sampler.sample(den, self.x.clone(), self.y, listener=listener or method)
        except _Warm:
            pass
        sync(self.device)
        return time.perf_counter() - t0

    def run(self, method: CacheMethod) -> dict:
        """Warm-up, then the timed loop(s): loop seconds, step medians, NFC."""
        method.compile = self.compiled and not method.computes_everything
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
                fused = bool(getattr(method, "programs", False))
        finally:
            method.detach()
        return {"loop_s": seconds, "nfc": nfc, "fused": fused,
                "full_ms": 1e3 * statistics.median(clock.full) if clock.full else None,
                "cached_ms": 1e3 * statistics.median(clock.cached) if clock.cached else None}

    def nfc_of(self, name: str, key: str, value: float, storage: str) -> float:
        """The NFC of one untimed loop of ``name`` with method.<key>=value."""
        method = make_method(self.cfg, name, storage, (f"method.{key}={value!r}",))
        method.compile = self.compiled
        method.attach(self.model)
        try:
            with precision_mode(self.precision, self.device):
                self.loop(method)
        finally:
            method.detach()
        return float(method.stats().full_steps)


def bench_setting(cfg: DictConfig, built: Built, model: torch.nn.Module, batch: int, precision: str, variant: str,
                  searched: dict, save: Callable[[dict], None]) -> dict:
    storage = storage_for(cfg, precision)
    bench = Bench(cfg, built, model, batch, precision, variant)
    guided = float(built.guidance.get("scale", 1.0)) > 1
    setting = {"batch_size": batch, "rows_per_forward": 2 * batch if guided else batch,
               "precision": precision, "variant": variant, "storage_dtype": storage, "methods": {}}
    plain = bench.run(NoCache())
    full_ms = plain["full_ms"]
    setting.update(full_ms=full_ms, plain_loop_s=plain["loop_s"])
    save(setting)
    print(f"  plain: full step {full_ms:.2f} ms, loop {plain['loop_s']:.2f} s", flush=True)
    target = int(cfg.target_nfc)
    for name in cfg.methods:
        name = str(name)
        extra: tuple[str, ...] = ()
        key = cfg.bisect.get(name)
        if key is not None:
            slot = (name, batch, precision)
            if slot not in searched:  # searched once per batch and precision, shared by the variants
                cal = bisect_tau(lambda v, name=name, key=key: bench.nfc_of(name, str(key), v, storage), target,
                                 0.5, max_iters=int(cfg.bisect_iters))
                searched[slot] = cal.tau
            extra = (f"method.{key}={searched[slot]!r}",)
        method = make_method(cfg, name, storage, extra)
        if bench.compiled and not method.can_fuse():
            setting["methods"][name] = {"skipped": "no step programs to compile (the per-site path runs eager)"}
            continue
        r = bench.run(method)
        row = {"nfc": r["nfc"], "params": method.params(), "fused": r["fused"], "full_ms": full_ms,
               "full_in_cache_ms": r["full_ms"], "cached_ms": r["cached_ms"], "loop_s": r["loop_s"],
               "cached_over_full": r["cached_ms"] / full_ms if r["cached_ms"] is not None else None,
               "full_in_cache_over_full": r["full_ms"] / full_ms if r["full_ms"] is not None else None,
               "e2e_speedup_nfc14": plain["loop_s"] / r["loop_s"]}
        if key is not None:
            row[str(key)] = searched[(name, batch, precision)]
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
    known = registered_methods()
    for name in cfg.methods:
        if str(name) not in known or str(name) == "none":
            raise SystemExit(f"error: methods: unknown method {name!r} ({', '.join(sorted(set(known) - {'none'}))})")
    for name in list(cfg.nfc_settings) + list(cfg.bisect):
        if str(name) not in known:
            raise SystemExit(f"error: nfc_settings/bisect: unknown method {name!r}")


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench")
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    check(cfg)
    for name in cfg.methods:  # every method config composes (and type-checks) before the model is built
        method_node(cfg, str(name))
    device = resolve_device(str(cfg.device))
    if str(cfg.image_size) != "auto":
        cfg.model.image_size = int(cfg.image_size)
    elif device.type == "cpu":
        cfg.model.image_size = min(int(cfg.model.image_size), int(cfg.cpu_image_size))
    family = family_of(cfg.model)
    arch = family.arch(cfg.model)
    built = Built(cfg, family, arch, device)
    base = built.model
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"model": str(cfg.model.name), "family": family.name, "arch": str(cfg.model.get("arch") or "custom"),
              "image_size": int(cfg.model.image_size), "latent_shape": list(family.latent_shape(arch)),
              "device": device_name(device), "torch_version": torch.__version__,
              "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
              "load_average_at_start": load,
              "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "settings_requested": OmegaConf.to_container(cfg, resolve=True), "settings": []}
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cuda" if device.type == "cuda" else "cpu"
    path = out_dir / f"{cfg.model.name}_{slug}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    t0 = time.perf_counter()
    searched: dict = {}
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
                        result["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                        result["device_shared_with"] = DeviceUse.shared(start, use.snapshot())
                        atomic_write_text(path, json.dumps(result, indent=1) + "\n")

                    bench_setting(cfg, built, model, int(batch), str(precision), str(variant), searched, save)
    print_table(result)
    if result.get("device_shared_with"):
        print(f"warning: another job of the harness used {result['device']} during the benchmark "
              f"({result['device_shared_with']}): these figures are not the method's alone")
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
