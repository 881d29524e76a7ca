"""schedule_scope=sample: an image that does not depend on its batch neighbours.

In sample scope every sample keeps its own copy of the method's schedule (and RFC its own RFE
predictor) and decides alone (its guidance halves together); a step where some samples compute
runs the computation on every row (a masked full step) and only those samples take the result.
So a sample's decisions and image are the same whichever samples share its batch: bit for bit
wherever full compute itself is (batch 16 against two batches of 8 here, and two torchrun ranks
against one process). At batch 1 this CPU's full compute is not batch-invariant itself (a one- or
two-row matmul takes another kernel: 2e-6 on dit-tiny), so in the default numerics batch 1 is
compared within that tolerance; with the batch-invariant numerics (``batch_invariant``,
rfc.utils.invariance.FixedShapes) a sample alone is bit for bit its image in a batch of 8 or 16,
in process and through run.py. Batch scope is the default and unchanged (the conformance and
equivalence tests elsewhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cache import TINY, sample_with
from test_flux import sample, tiny_flux

from baselines.dbcache import DBCache
from baselines.fbcache import FBCache
from baselines.teacache import TeaCache
from rfc.cache import NoCache
from rfc.method import RFC
from rfc.models.load import build_dit
from rfc.run.build import plan_run
from rfc.run.runner import run
from rfc.run.setting import setting_id
from rfc.samplers.sampling import DDIMSampler
from rfc.utils.errors import ConfigError
from rfc.utils.invariance import FixedShapes

ROOT = Path(__file__).resolve().parents[1]
ROWS = 512  # rows per tile of the batch-invariant numerics: a batch of 16 guided dit-tiny samples is one tile
METHODS = {
    "fbcache": lambda scope, th=0.08: FBCache(th, schedule_scope=scope),
    "teacache": lambda scope, th=0.045: TeaCache(th, schedule_scope=scope),
    "dbcache": lambda scope, th=0.08: DBCache(threshold=th, warmup=2, schedule_scope=scope),
    "rfc": lambda scope, th=0.1: RFC(tau=th, schedule_scope=scope),
}


@pytest.fixture(scope="module")
def dit():
    return build_dit(TINY, ROOT / "checkpoints" / "dit-tiny-digits.pt")


def dit_samples(model, method, ids: list[int], steps: int = 50):
    """The final latents of samples ``ids`` (DDIM, guidance 1.5) and the method's accounting."""
    return sample_with(model, method, DDIMSampler(num_steps=steps), ids=ids), method.stats()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_samples_image_and_schedule_do_not_depend_on_its_batch_on_dit(dit, name):
    make = METHODS[name]
    whole, stats = dit_samples(dit, make("sample"), list(range(16)))
    halves = [dit_samples(dit, make("sample"), list(range(a, a + 8))) for a in (0, 8)]
    assert torch.equal(whole, torch.cat([h[0] for h in halves]))
    per_sample = stats.sample_full_indices
    assert per_sample == halves[0][1].sample_full_indices + halves[1][1].sample_full_indices
    nfcs = [len(i) for i in per_sample]
    union = sorted({i for indices in per_sample for i in indices})
    assert stats.full_indices == union and stats.full_steps >= max(nfcs)  # masked steps: the work done
    alone, alone_stats = dit_samples(dit, make("sample"), [3])
    assert alone_stats.sample_full_indices == [per_sample[3]]
    torch.testing.assert_close(alone, whole[3:4], rtol=0, atol=1e-4)  # full compute's own batch-1 noise


@pytest.mark.parametrize("name", sorted(METHODS))
def test_with_batch_invariant_numerics_a_sample_alone_is_its_image_in_any_batch_on_dit(dit, name):
    """batch_invariant (rfc.utils.invariance): the same sample drawn in a batch of 16, of 8 and
    alone: the same schedule and the same image, bit for bit (25 steps: the default numerics
    already differ at batch 1 after a few)."""
    make = METHODS[name]
    with FixedShapes(ROWS):
        drawn = {n: dit_samples(dit, make("sample"), ids, steps=25)
                 for n, ids in ((16, list(range(16))), (8, list(range(8))), (1, [3]))}
    images = {n: out for n, (out, _) in drawn.items()}
    schedules = {n: stats.sample_full_indices for n, (_, stats) in drawn.items()}
    assert torch.equal(images[8], images[16][:8]) and torch.equal(images[1], images[16][3:4])
    assert schedules[8] == schedules[16][:8] and schedules[1] == [schedules[16][3]]


def test_teacache_samples_decide_differently_and_batch_scope_keeps_one_schedule(dit):
    _, stats = dit_samples(dit, TeaCache(0.045, schedule_scope="sample"), list(range(16)))
    assert len({len(i) for i in stats.sample_full_indices}) > 1  # a per-sample NFC spread
    _, batch = dit_samples(dit, TeaCache(0.045), list(range(16)))
    assert batch.sample_full_indices == [] and batch.sample_nfc(16) == [batch.full_steps] * 16


@pytest.mark.parametrize("name", ["fbcache", "teacache", "rfc"])
def test_sample_scope_is_batch_independent_on_flux(name):
    model = tiny_flux(prompts=tuple(f"prompt {i}" for i in range(4)))
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(4)
    make = {"fbcache": lambda: FBCache(0.25, schedule_scope="sample"),
            "teacache": lambda: TeaCache(0.3, schedule_scope="sample"),
            "rfc": lambda: RFC(tau=0.3, order=1, schedule_scope="sample")}[name]
    whole, stats = sample(model, x, y, make(), steps=28)
    parts = [sample(model, x[a:a + 2], y[a:a + 2], make(), steps=28) for a in (0, 2)]
    assert torch.equal(whole, torch.cat([p[0] for p in parts]))
    assert stats.sample_full_indices == parts[0][1].sample_full_indices + parts[1][1].sample_full_indices
    assert 1 < min(len(i) for i in stats.sample_full_indices) < 28
    with FixedShapes(ROWS):  # batch-invariant numerics: sample 1 alone against it in the batch of 4
        whole, stats = sample(model, x, y, make(), steps=28)
        alone, alone_stats = sample(model, x[1:2], y[1:2], make(), steps=28)
    assert torch.equal(alone, whole[1:2]) and alone_stats.sample_full_indices == stats.sample_full_indices[1:2]


def test_rfc_batch_scope_depends_on_the_batch_and_keeps_its_step_programs(dit):
    """The issue's measurement, kept as the reason for sample scope: in batch scope RCS sums its
    error over the batch, so a batch of 16 and two of 8 give other schedules and images; sample
    scope runs the per-site path (the step programs decide per batch)."""
    whole, _ = dit_samples(dit, RFC(tau=0.1), list(range(16)))
    halves = torch.cat([dit_samples(dit, RFC(tau=0.1), list(range(a, a + 8)))[0] for a in (0, 8)])
    assert not torch.equal(whole, halves)
    assert RFC().can_fuse() and not RFC(schedule_scope="sample").can_fuse()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_threshold_0_in_sample_scope_is_full_compute(dit, name):
    reference, _ = dit_samples(dit, NoCache(), list(range(4)), steps=10)
    ours, stats = dit_samples(dit, METHODS[name]("sample", 0.0), list(range(4)), steps=10)
    assert torch.equal(ours, reference) and all(len(i) == 10 for i in stats.sample_full_indices)


def test_the_row_and_schedules_record_each_samples_nfc(make_cfg, tmp_path):
    rec = run(make_cfg("method=teacache", "method.schedule_scope=sample", "eval.num_samples=6", "eval.batch_size=4",
                       "eval.paired=off", "eval.score=false"), tmp_path / "run", progress=False)
    schedules = json.loads((tmp_path / "run" / "schedules.json").read_text())
    nfcs = [len(s) for entry in schedules for s in entry["samples"]]
    assert len(nfcs) == 6 and rec.nfc == pytest.approx(sum(nfcs) / 6)
    assert (rec.nfc_min, rec.nfc_max) == (min(nfcs), max(nfcs))
    assert json.loads(rec.method_params)["schedule_scope"] == "sample"


def test_an_unknown_scope_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="method.schedule_scope"):
        FBCache(schedule_scope="row")


TORCHRUN = {  # model: (its overrides, samples, batch per rank; one process draws them in one batch)
    "dit-tiny": (["method=teacache"], 16, 8),
    "flux-tiny": (["model=flux-tiny", "method=rfc", "method.order=1", "method.tau=0.1"], 8, 4),
}


@pytest.mark.parametrize("model", sorted(TORCHRUN))
def test_two_torchrun_ranks_draw_the_same_samples_as_one_process_with_other_batches(make_cfg, tmp_path, model):
    """Sample scope under torchrun (2 CPU ranks, one batch each) against one process (one batch of
    all the samples): the same images and the same per-sample schedules."""
    extra, n, per_rank = TORCHRUN[model]
    overrides = [*extra, "method.schedule_scope=sample", f"eval.num_samples={n}", "sampler.num_steps=12",
                 "eval.score=false", "eval.paired=off", "seed=3"]
    port = 29537 + sorted(TORCHRUN).index(model)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "run.py"), *overrides, f"eval.batch_size={per_rank}", f"paths.outputs={tmp_path}/dist",
           f"paths.runs_csv={tmp_path}/dist.csv"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_dir = next(p.parent for p in (tmp_path / "dist").rglob("samples.npz") if "store" not in p.parts)
    single = run(make_cfg(*overrides, f"eval.batch_size={n}"), tmp_path / "single", progress=False)
    with np.load(dist_dir / "samples.npz") as a, np.load(tmp_path / "single" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])

    def per_sample(folder: Path) -> list[list[int]]:
        return [s for entry in json.loads((folder / "schedules.json").read_text()) for s in entry["samples"]]

    assert per_sample(dist_dir) == per_sample(tmp_path / "single")
    assert single.nfc_min < single.nfc_max  # the samples did decide differently


def test_masked_steps_never_recompile_the_compiled_modules(dit):
    """compile=true compiles a per-site method's attention and MLP modules (rfc.run.build.compile_for);
    a masked full step hands them the whole batch, as every full step does, so the shapes never
    change with how many samples compute: the modules trace once for 50 steps of RFC in sample scope
    (with steps where only some samples compute), and the samples equal the eager ones."""
    import torch._dynamo as dynamo

    expected, stats = dit_samples(dit, RFC(tau=0.1, schedule_scope="sample"), list(range(8)))
    full_sets = {tuple(i) for i in stats.sample_full_indices}
    assert len(full_sets) > 1  # some steps computed for some samples only
    traced = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        traced.append(gm)
        return gm.forward

    dynamo.reset()
    modules = [getattr(block, branch) for block in dit.blocks for branch in ("attn", "mlp")]
    for m in modules:
        m.compile(backend=counting, dynamic=False)
    try:
        got, _ = dit_samples(dit, RFC(tau=0.1, schedule_scope="sample"), list(range(8)))
    finally:
        for m in modules:
            m._compiled_call_impl = None  # back to eager for the other tests
        dynamo.reset()
    assert len(traced) == len({type(m) for m in modules})  # one graph per module class (dynamo shares the
    assert torch.equal(got, expected)  # code of same-class modules, their weights as inputs), never a second


def test_run_py_draws_a_sample_alone_as_in_its_batch_with_batch_invariant_numerics(make_cfg, tmp_path):
    """What a user does to regenerate one sample: the run of 1 sample at batch 1 gives sample 0's
    image and schedule of the run of 4 at batch 4; the numerics are in the row and its setting."""
    common = ["method=fbcache", "method.schedule_scope=sample", f"batch_invariant={ROWS}", "sampler.num_steps=20",
              "eval.score=false", "eval.paired=off"]
    batch = run(make_cfg(*common, "eval.num_samples=4", "eval.batch_size=4"), tmp_path / "batch", progress=False)
    alone = run(make_cfg(*common, "eval.num_samples=1", "eval.batch_size=1"), tmp_path / "alone", progress=False)
    with np.load(tmp_path / "batch" / "samples.npz") as a, np.load(tmp_path / "alone" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"][:1], b["arr_0"])

    def first(folder: Path) -> list[int]:
        return json.loads((folder / "schedules.json").read_text())[0]["samples"][0]

    assert first(tmp_path / "batch") == first(tmp_path / "alone")
    assert batch.batch_invariant == alone.batch_invariant == ROWS
    off = plan_run(make_cfg(*common[:2], "eval.num_samples=4", "eval.batch_size=4", "eval.score=false"),
                   tmp_path / "off")
    assert "batch_invariant" not in off.setting and setting_id(off.setting) != batch.setting_id


@pytest.mark.parametrize("value", ["-1", "true", "2.5"])
def test_a_bad_batch_invariant_is_refused_naming_the_key(make_cfg, tmp_path, value):
    with pytest.raises(ConfigError, match="batch_invariant"):
        plan_run(make_cfg(f"batch_invariant={value}"), tmp_path / "out")
