"""Every registered method on every tiny model, end to end through the runner.

One cell per (model, method, setting), generated from the method registry
(rfc.cache.registry.registered_methods) and the model-family registry (each family's ``tiny``
config, rfc.models.family.families), so a new method or model joins
the matrix without a test of its own:

- ``default``: the method at its config's defaults finishes (the runner refuses a non-finite
  sample) and records a consistent schedule;
- ``degenerate``: the method's own full-compute overrides (its config's ``degenerate`` ClassVar)
  give samples equal to ``method=none`` bit for bit, with every step full and nothing cached.

A method that cannot run on a family says so itself (its ``check_model_family``: diffusers' cache
hooks need a diffusers transformer, so DiT is not one of their models); such a cell checks that the
run is refused with that one line before anything is drawn.

Kept fast with one sample per run, a few sampling steps, no scoring, no pairing and no warm-up
pass; the ``method=none`` run each cell is compared with is drawn once per model; and one
intra-op thread: the tiny models' operations take microseconds, so a second thread only adds
synchronisation, which on a shared CPU costs more than the whole computation (about 7x here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from rfc.cache.registry import degenerate_overrides, registered_methods
from rfc.models.family import families
from rfc.run.row import RunRecord
from rfc.run.runner import run

ROOT = Path(__file__).resolve().parents[1]
TINY_MODELS = sorted(family.tiny for family in families().values())  # each registered family's tiny config
METHODS = sorted(registered_methods())
STEPS = 6  # the interval and RCS schedules (FORA, TaylorSeer, ToCa, RFC) reach cached steps at their defaults
SETTINGS = ("default", "degenerate")
FAST = (
    "eval=smoke",
    "eval.num_samples=1",
    "eval.batch_size=1",
    "eval.warmup_batches=0",
    "eval.score=false",
    "eval.paired=off",
    "logger=none",
    f"sampler.num_steps={STEPS}",
)


def compose_run(tmp: Path, model: str, method: str, *overrides: str) -> DictConfig:
    """The run config of ``model`` and ``method`` with every output under ``tmp`` (never the
    results folder) and the fast settings above."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(
            "run",
            overrides=[
                f"paths.runs_csv={tmp / 'runs.csv'}",
                f"paths.outputs={tmp / 'outputs'}",
                f"model={model}",
                f"method={method}",
                *FAST,
                *overrides,
            ],
        )


def run_cell(tmp: Path, model: str, method: str, *overrides: str) -> tuple[RunRecord, np.ndarray]:
    """Run one configuration through the runner; its row and its samples (uint8, as stored)."""
    rec = run(compose_run(tmp, model, method, *overrides), tmp / "run", progress=False)
    assert rec is not None
    with np.load(tmp / "run" / "samples.npz") as z:
        return rec, z["arr_0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Every run of the module on one intra-op thread (see the module docstring); restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def full_compute(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[RunRecord, np.ndarray]]:
    """``method=none`` of a model, drawn once for the whole module, on first use."""
    drawn: dict[str, tuple[RunRecord, np.ndarray]] = {}

    def get(model: str) -> tuple[RunRecord, np.ndarray]:
        if model not in drawn:
            drawn[model] = run_cell(tmp_path_factory.mktemp(f"none-{model}"), model, "none")
        return drawn[model]

    return get


def test_every_method_declares_its_full_compute_setting():
    for name in METHODS:
        overrides = degenerate_overrides(name)
        assert all(o.startswith("method.") for o in overrides), (name, overrides)


def refusal(model: str, method: str) -> str | None:
    """Why ``method`` declares it cannot run on ``model``'s family (its own check), or None."""
    from rfc.models.family import family_of
    from rfc.run.build import build

    cfg = compose_run(Path("/nonexistent"), model, method)
    try:
        family = family_of(cfg.model)
        build(cfg.method, "method").check_model_family(family.name, family.model_class)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", TINY_MODELS)
def test_method_on_model(model, method, setting, full_compute, tmp_path):
    from rfc.utils.errors import ConfigError

    overrides = degenerate_overrides(method) if setting == "degenerate" else ()
    why = refusal(model, method)
    if why is not None:
        with pytest.raises(ConfigError) as refused:
            run_cell(tmp_path, model, method, *overrides)
        assert str(refused.value) == why and "\n" not in why and not (tmp_path / "run" / "samples.npz").exists()
        return
    reference, ref_images = full_compute(model)
    if method == "none" and not overrides:
        rec, images = reference, ref_images  # the very run every cell is compared with: not drawn twice
    else:
        rec, images = run_cell(tmp_path, model, method, *overrides)
    assert rec.method == method and rec.model == model and rec.num_steps == STEPS
    assert images.shape == ref_images.shape and images.dtype == np.uint8
    assert 1 <= rec.nfc <= STEPS  # the first step is always computed
    if setting == "degenerate":
        assert rec.nfc == STEPS and rec.cached_sites == 0 and rec.partial_sites == 0, rec.method_params
        assert rec.full_sites == reference.full_sites  # every site of every step, as full compute counts them
        assert np.array_equal(images, ref_images), f"{method} {overrides} differs from method=none on {model}"
