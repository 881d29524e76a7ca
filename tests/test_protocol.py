"""The cache protocol's shape: model-agnostic (nothing under rfc/cache reads the DiT module), three
hook levels (guidance, blocks, branches) each usable by a method defined here alone, and the run
in four parts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from test_cache import ROOT, TINY, sample_with

from rfc.cache import CacheMethod, NoCache
from rfc.models.load import build_dit
from rfc.samplers.sampling import DDIMSampler, StepInfo

CACHE = ROOT / "rfc" / "cache"


@pytest.fixture(scope="module")
def tiny():
    return build_dit(TINY, ROOT / "checkpoints" / "dit-tiny-digits.pt")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_cache_package_does_not_know_the_model():
    """No module under rfc/cache imports a model file or names DiT: methods see what the model
    exposes by name (embed, blocks, head, modulation, stacked_modulation ...)."""
    files = sorted(CACHE.glob("*.py"))
    assert files
    for path in files:
        assert not {m for m in imported_modules(path) if m.startswith("rfc.models")}, path.name
        assert "DiT" not in path.read_text(), path.name


def test_the_runner_is_the_four_parts_joined():
    runner = ROOT / "rfc" / "run" / "runner.py"
    assert len(runner.read_text().splitlines()) < 200
    assert {"rfc.run.build", "rfc.run.generate", "rfc.run.score", "rfc.run.record"} <= imported_modules(runner)


class GuidanceReuse(CacheMethod):
    """A guidance-level method defined here alone (FasterCache's CFG reuse, simplified): every
    ``interval``-th step runs both halves and keeps uncond - cond of the model output; the steps
    between run the conditional rows only and add the kept difference back."""

    name = "guidance_reuse"

    def __init__(self, interval: int) -> None:
        super().__init__()
        self.interval = interval
        self.rows: list[int] = []

    def reset(self) -> None:
        super().reset()
        self.delta: torch.Tensor | None = None

    def decide(self, step: StepInfo) -> bool:
        return step.index % self.interval == 0

    def branch(self, site, inp, module):
        return self.run_full(site, module, inp.full())  # the rows the model is given, always computed

    def guidance(self, denoiser, x, t, y):
        B = x.shape[0]
        if self.full or self.delta is None:
            out = denoiser.model(*denoiser.rows(x, t, y))
            self.rows.append(out.shape[0])
            self.delta = out[B:] - out[:B]
            return denoiser.combine(out, B)
        cond = denoiser.model(x, t, y)
        self.rows.append(cond.shape[0])
        return denoiser.combine(torch.cat([cond, cond + self.delta]), B)


def test_a_guidance_level_method_is_defined_outside_the_package(tiny):
    sampler = DDIMSampler(num_steps=20)
    full = sample_with(tiny, NoCache(), sampler, n=3)
    every = GuidanceReuse(interval=1)
    assert torch.equal(sample_with(tiny, every, sampler, n=3), full)  # every step both halves: exact
    assert every.rows == [6] * 20
    reuse = GuidanceReuse(interval=4)
    out = sample_with(tiny, reuse, sampler, n=3)
    assert reuse.rows == [6 if i % 4 == 0 else 3 for i in range(20)]  # half the rows between full steps
    assert torch.isfinite(out).all() and not torch.equal(out, full)
    assert "cache_method" not in vars(tiny) and "forward" not in vars(tiny)  # detached
