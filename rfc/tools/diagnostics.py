"""The paper's analysis figures, measured on any model: how wrong each method's cached outputs are.

A probe wraps an attached method's ``branch``: whenever a site is not computed in full, it also
runs the real module on the real input of that step (the cached trajectory's own input, so every
method is judged on identical inputs along its own path) and records

* the relative L1 error of the method's output against that full computation (paper Fig. 1c,
  per module, averaged over cached steps);
* the input-change ratio s_k = ||O(t-k) - O(t)|| / ||I(t-k) - I(t)|| with the true output, against
  the last full step t (Fig. 2a: how constant the ratio is, as relative standard deviation);
* the relative L1 error of a Taylor forecast of the input (order m over the full steps, as RCS
  forecasts it) next to the output error, per step (Fig. 2b).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rfc.cache.base import BranchInput, CacheMethod, Site
from rfc.cache.predictors import TaylorFactors
from rfc.method import relative_l1


@dataclass
class ProbeRecord:
    """Measurements of one method along its own cached trajectory."""

    label: str
    nfc: float = 0.0
    output_error: dict[tuple[int, int], float] = field(default_factory=dict)  # (step, module) -> rel L1
    input_error: dict[tuple[int, int], float] = field(default_factory=dict)
    ratio: dict[tuple[int, int], tuple[int, float]] = field(default_factory=dict)  # -> (k, s_k)


class Probe:
    """Wraps ``method.branch`` on the instance (the method's own code is untouched)."""

    def __init__(self, method: CacheMethod, label: str, order: int = 2) -> None:
        self.method, self.record, self.order = method, ProbeRecord(label), order
        self.last: dict[Site, tuple[torch.Tensor, torch.Tensor]] = {}  # site -> (O(t), I(t)) at last full
        self.forecast: dict[Site, TaylorFactors] = {}
        if method.programs:  # attached with step programs: no per-site branch to wrap
            raise ValueError("diagnostics need the per-site path: set method.fused = False before attach")
        self._inner = method.branch
        method.branch = self.branch  # instance attribute shadows the class method

    def remove(self) -> None:
        vars(self.method).pop("branch", None)

    def branch(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        out = self._inner(site, inp, module)
        index = self.method.step.index
        x_in = inp.full()
        if self.method.full:
            self.last[site] = (out.detach().float(), x_in.detach().float())
            self.forecast.setdefault(site, TaylorFactors(self.order)).update(x_in.detach().float(), index)
            return out
        with torch.no_grad():
            truth = module(x_in).float()
        key = (index, site.module_index)
        self.record.output_error[key] = relative_l1(truth, out.float())
        if site in self.forecast:
            self.record.input_error[key] = relative_l1(x_in.float(), self.forecast[site].predict(index))
        if site in self.last:
            o_t, i_t = self.last[site]
            d_in = float((x_in.float() - i_t).norm())
            if d_in > 0:
                k = index - self.forecast[site].last_index
                self.record.ratio[key] = (k, float((truth - o_t).norm()) / d_in)
        return out


def ratio_rsd(record: ProbeRecord) -> dict[int, float]:
    """Per module: relative standard deviation of s_k within each full-step interval, averaged over
    intervals (the paper's ~2 %); modules with fewer than two cached steps in an interval are skipped."""
    groups: dict[tuple[int, int], list[float]] = defaultdict(list)
    for (step, module), (k, s) in record.ratio.items():
        groups[(module, step - k)].append(s)
    per_module: dict[int, list[float]] = defaultdict(list)
    for (module, _), values in groups.items():
        if len(values) >= 2 and np.mean(values) > 0:
            per_module[module].append(float(np.std(values) / np.mean(values)))
    return {m: float(np.mean(v)) for m, v in sorted(per_module.items())}


def write_outputs(records: list[ProbeRecord], out_dir: Path, depth: int) -> dict[str, object]:
    """The three CSVs, three PNG plots and a summary; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = range(2 * depth)
    summary: dict[str, object] = {"methods": {}}

    with (out_dir / "module_errors.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "nfc", "module", "block", "branch", "mean_rel_l1", "cached_steps"])
        for r in records:
            for m in modules:
                errs = [e for (s, mm), e in r.output_error.items() if mm == m]
                w.writerow([r.label, r.nfc, m, m // 2, "attn" if m % 2 == 0 else "mlp",
                            np.mean(errs) if errs else "", len(errs)])
            all_errs = list(r.output_error.values())
            summary["methods"][r.label] = {"nfc": r.nfc, "mean_output_rel_l1": float(np.mean(all_errs)) if all_errs
                                           else None}

    with (out_dir / "ratio.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "step", "module", "k", "s_k"])
        for r in records:
            for (step, m), (k, s) in sorted(r.ratio.items()):
                w.writerow([r.label, step, m, k, s])
        for r in records:
            rsd = ratio_rsd(r)
            summary["methods"][r.label]["ratio_rsd_mean"] = float(np.mean(list(rsd.values()))) if rsd else None

    with (out_dir / "error_curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "step", "input_rel_l1", "output_rel_l1"])
        for r in records:
            for step in sorted({s for s, _ in r.output_error}):
                ins = [e for (s, _), e in r.input_error.items() if s == step]
                outs = [e for (s, _), e in r.output_error.items() if s == step]
                w.writerow([r.label, step, np.mean(ins) if ins else "", np.mean(outs)])

    _plots(records, out_dir, depth)
    return summary


def _plots(records: list[ProbeRecord], out_dir: Path, depth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for r in records:
        means = [np.mean([e for (s, m), e in r.output_error.items() if m == mod] or [np.nan])
                 for mod in range(2 * depth)]
        ax.plot(range(2 * depth), means, marker="o", ms=3, label=f"{r.label} (NFC {r.nfc:g})")
    ax.set(xlabel="module (attn, mlp of block 0, 1, ...)", ylabel="relative L1 error",
           title="Prediction error per module vs full compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "module_errors.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in records:
        if not r.ratio:
            continue
        rsd = ratio_rsd(r)
        axes[1].plot(list(rsd), [100 * v for v in rsd.values()], marker="o", ms=3, label=r.label)
    rfc = next((r for r in records if r.label.startswith("rfc")), records[-1])
    for module in sorted({m for _, m in rfc.ratio})[:: max(1, depth // 3)]:
        pts = sorted((s, v[1]) for (s, m), v in rfc.ratio.items() if m == module)
        if pts:
            axes[0].plot(*zip(*pts, strict=True), marker=".", label=f"module {module}")
    axes[0].set(xlabel="step", ylabel="s_k", title=f"s_k over cached steps ({rfc.label})")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="module", ylabel="RSD of s_k (%)", title="Relative std of s_k within intervals")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "ratio.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, r in enumerate(records):
        color = f"C{i}"
        steps = sorted({s for s, _ in r.output_error})
        ax.plot(steps, [np.mean([e for (s, _), e in r.output_error.items() if s == st]) for st in steps],
                marker=".", color=color, label=f"{r.label} output")
        ax.plot(steps, [np.mean([e for (s, _), e in r.input_error.items() if s == st] or [np.nan])
                        for st in steps], ls="--", color=color, label=f"{r.label} input forecast")
    ax.set(xlabel="step (0 = noisiest)", ylabel="relative L1 error", title="Input vs output error over steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "error_curves.png", dpi=120)
    plt.close(fig)
