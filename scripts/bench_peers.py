"""The same caching method in the harness and in the libraries the field deploys, timed side by side.

    python scripts/bench_peers.py                       # CPU, one thread: a random 576+64-token FLUX
    python scripts/bench_peers.py device=cuda threads=0 rounds=7

One random FLUX transformer (configs/bench_peers.yaml), one batch, the flow-matching schedule of
28 steps. For each group of implementations of one method (First-Block Cache: the harness's
``fbcache``, diffusers' FirstBlockCache hook, cache-dit's DBCache F1B0; TaylorSeer: the harness's
official-code ``taylorseer`` and diffusers' TaylorSeerCache, another method at the same NFC), and for
the full step (the harness's site-by-site forward and the transformer's own diffusers forward, no
cache), every implementation, on its own copy of the same weights, runs one whole sampling loop per
round, the implementations interleaved within each round, after an untimed warm-up loop. A figure
is the median over rounds of the per-loop medians of its full steps and of its cached steps (a step
= the announcements, the decision and the model call), and of the whole loop. First-Block Cache's
threshold is searched on the harness's method to ``target_nfc`` and used by all three (their
decisions are the same, tests/test_peers.py); every row records its NFC, and a group whose NFCs
differ says so.

Ratios are what to read on a shared machine: ``cached_over_fastest_peer`` (the harness's cached
step over the fastest other implementation's) and ``full_over_native`` (the harness's full step over
the diffusers forward's). The JSON (device with its CPU model, torch and library versions, threads,
the other processes' load during the run) goes to results/bench/peers_<device>_<time>.json.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import platform
import statistics
import sys
from contextlib import AbstractContextManager, nullcontext
from importlib import metadata
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import Bench, Built, make_method  # noqa: E402  (the latency benchmark's loop and timing)

from rfc.cache import CacheMethod, NoCache  # noqa: E402
from rfc.cache.peers import PeerMethod  # noqa: E402
from rfc.models.family import family_of  # noqa: E402
from rfc.run.build import device_name, resolve_device  # noqa: E402
from rfc.tools.calibration import bisect_tau  # noqa: E402
from rfc.utils.devices import LoadSample, others_load  # noqa: E402
from rfc.utils.files import atomic_write_text  # noqa: E402


class NativeForward(PeerMethod):
    """No cache: every step through the transformer's own diffusers forward (the full-step reference
    of the peers), counted as full compute."""

    name = "native-forward"
    library = "no library"

    def apply(self, transformer: torch.nn.Module, num_steps: int) -> None:
        pass

    def restart(self, transformer: torch.nn.Module) -> None:
        pass

    def remove(self, transformer: torch.nn.Module) -> None:
        pass

    def context(self, transformer: torch.nn.Module) -> AbstractContextManager:
        return nullcontext()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def implementations(cfg: DictConfig, bench: Bench) -> dict[str, dict[str, CacheMethod]]:
    """Each group's methods at the group's setting (the searched threshold applied to all)."""
    out: dict[str, dict[str, CacheMethod]] = {"full_step": {"none": NoCache(), "native-forward": NativeForward()}}
    for group, names in cfg.groups.items():
        names = [str(n) for n in names]
        extra: dict[str, tuple[str, ...]] = {n: tuple(str(o) for o in (cfg.nfc_settings.get(n) or ())) for n in names}
        knob = cfg.bisect.get(group)
        if knob is not None:
            first = names[0]

            def nfc_of(value: float, first: str = first, base: tuple[str, ...] = extra[first],
                       knob: str = str(knob)) -> float:
                m = make_method(cfg, first, str(cfg.storage_dtype), (*base, f"method.{knob}={value!r}"))
                m.attach(bench.model)
                try:
                    bench.loop(m)
                finally:
                    m.detach()
                return float(m.stats().full_steps)

            cal = bisect_tau(nfc_of, float(cfg.target_nfc), 0.5, max_iters=int(cfg.bisect_iters))
            print(f"{group}: {knob} = {cal.tau:.6g} gives NFC {cal.nfc:g} on the harness's {first}", flush=True)
            for n in names:
                extra[n] = (*extra[n], f"method.{cfg.bisect_keys[n]}={cal.tau!r}")
        out[str(group)] = {n: make_method(cfg, n, str(cfg.storage_dtype), extra[n]) for n in names}
    return out


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def built_on_device(cfg: DictConfig) -> Built:
    """The config's model (random weights where it says so) on ``device``, with ``threads`` CPU
    threads (0: torch's default), gradients off."""
    torch.set_grad_enabled(False)
    device = resolve_device(str(cfg.device))
    if device.type == "cpu" and int(cfg.threads) > 0:
        torch.set_num_threads(int(cfg.threads))
    family = family_of(cfg.model)
    return Built(cfg, family, family.arch(cfg.model), device)


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench_peers")
def main(cfg: DictConfig) -> None:
    built = built_on_device(cfg)
    device = built.device
    bench = Bench(cfg, built, built.model, int(cfg.batch_size), str(cfg.precision), "eager")
    groups = implementations(cfg, bench)
    # each implementation on its own copy of the weights: a library may leave its patches on the
    # transformer it was applied to (cache-dit's FLUX forward), which must not touch another's runs
    benches = {(g, n): Bench(cfg, built, copy.deepcopy(built.model), int(cfg.batch_size), str(cfg.precision), "eager")
               for g, ms in groups.items() for n in ms}
    times: dict[str, dict[str, list[dict]]] = {g: {n: [] for n in ms} for g, ms in groups.items()}
    loads: list[float] = []
    for r in range(int(cfg.rounds)):
        for group, methods in groups.items():
            for name, method in methods.items():
                before = LoadSample.take(device.type)
                run = benches[group, name].run(method)
                cores, _ = others_load(before, LoadSample.take(device.type))
                if cores is not None:
                    loads.append(cores)
                times[group][name].append(run)
        print(f"round {r + 1}/{cfg.rounds} done", flush=True)

    result: dict = {
        "device": device_name(device), "cpu_model": cpu_model() if device.type == "cpu" else None,
        "torch_version": torch.__version__, "diffusers_version": version("diffusers"),
        "cache_dit_version": version("cache-dit"),
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "other_processes_cores_mean": statistics.mean(loads) if loads else None,
        "other_processes_cores_max": max(loads) if loads else None,
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {k: cfg.model[k] for k in ("name", "image_size", "hidden_size", "num_heads", "depth_double",
                                            "depth_single", "text_tokens")},
        "image_tokens": (int(cfg.model.image_size) // 16) ** 2, "num_steps": int(cfg.sampler.num_steps),
        "batch_size": int(cfg.batch_size), "precision": str(cfg.precision), "rounds": int(cfg.rounds),
        "groups": {},
    }
    for group, methods in groups.items():
        rows = {}
        for name, method in methods.items():
            runs = times[group][name]
            rows[name] = {"nfc": runs[-1]["nfc"], "params": method.params(),
                          "full_ms": median([x["full_ms"] for x in runs]),
                          "cached_ms": median([x["cached_ms"] for x in runs]),
                          "loop_s": median([x["loop_s"] for x in runs])}
        names = list(rows)
        ours = rows[names[0]]
        peers = [rows[n] for n in names[1:]]
        summary: dict = {"implementations": rows, "same_nfc": len({row["nfc"] for row in rows.values()}) == 1}
        if group == "full_step":
            summary["full_over_native"] = ours["full_ms"] / rows["native-forward"]["full_ms"]
        else:
            cached = [p["cached_ms"] for p in peers if p["cached_ms"] is not None]
            if ours["cached_ms"] is not None and cached:
                summary["cached_over_fastest_peer"] = ours["cached_ms"] / min(cached)
            summary["loop_over_fastest_peer"] = ours["loop_s"] / min(p["loop_s"] for p in peers)
        result["groups"][group] = summary

    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cuda" if device.type == "cuda" else "cpu"
    path = out_dir / f"peers_{slug}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    for group, summary in result["groups"].items():
        print(f"\n{group}:" + ("" if summary["same_nfc"] else "  (NFCs differ)"))
        for name, row in summary["implementations"].items():
            cached = f"{row['cached_ms']:.2f}" if row["cached_ms"] is not None else "-"
            print(f"  {name:32s} NFC {row['nfc']:2d}  full {row['full_ms']:.2f} ms  cached {cached} ms  "
                  f"loop {row['loop_s']:.3f} s")
        for key in ("full_over_native", "cached_over_fastest_peer", "loop_over_fastest_peer"):
            if key in summary:
                print(f"  {key}: {summary[key]:.3f}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
