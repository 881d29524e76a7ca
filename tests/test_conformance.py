"""Conformance with the official code: the golden fixture's cases (official DiT, TaylorSeer, FORA
and ToCa outputs on one random 28-block DiT) replayed through the harness's public API.

Per-site paths must reproduce the official final latents bit for bit, with the same blocks
computing attention in full at every model call; fused cached steps sum the same terms in another
order and must stay within the fixture's tolerance (1e-5 x max |latent|). Bit identity can only
be shown on a CPU whose kernels reproduce the fixture's plain DiT (``probe_platform``); elsewhere
the bit-for-bit tests are skipped with the measured distance in the reason, and every per-site
path is still held to the tolerance and the exact schedules. The fixture lives
outside the repository (``../shared/conformance`` or ``$RFC_CONFORMANCE``); without it these tests
are skipped with that path in the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rfc.models.dit import DiT
from rfc.tools.conformance import (
    CASES,
    FIXTURE_ENV,
    PROBE_CASE,
    RELATIVE_TOLERANCE,
    CaseResult,
    Fixture,
    Platform,
    fixture_dir,
    probe_platform,
    run_case,
)

FOLDER = fixture_dir()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    if not (FOLDER / "fixture.json").is_file():
        pytest.skip(f"conformance fixture not found at {FOLDER} (set ${FIXTURE_ENV} to its folder)")
    return Fixture(FOLDER)


_per_site: dict[str, CaseResult] = {}


def per_site(fixture: Fixture, case) -> CaseResult:
    """Each per-site case replayed once per session (the bit test and the tolerance test share it)."""
    if case.name not in _per_site:
        _per_site[case.name] = run_case(fixture, case)
    return _per_site[case.name]


@pytest.fixture(scope="module")
def cpu(fixture) -> Platform:
    platform = probe_platform(fixture)
    _per_site.setdefault(PROBE_CASE, platform.probe)
    return platform


def test_script_without_fixture_names_the_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "conformance.py"), "--fixture", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr


def test_the_fixture_model_is_ours(fixture):
    """The official weights load strictly into our DiT, and our fixed sin-cos table is theirs."""
    official = torch.load(fixture.folder / "weights.pt", weights_only=True)
    assert set(official) == set(fixture.model.state_dict())
    assert torch.equal(DiT(fixture.config).pos_embed, official["pos_embed"])


def test_every_official_case_is_covered(fixture):
    cases = {k for k in fixture.expected if "__" not in k}
    assert cases == {c.name for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_per_site_path_is_bit_identical_to_the_official_code(fixture, cpu, case):
    if not cpu.exact:
        pytest.skip(cpu.describe())
    r = per_site(fixture, case)
    assert r.bit_identical, f"{case.name}: max abs diff {r.max_abs:.3g} ({r.rel:.2e} of max |latent|)"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_per_site_path_follows_the_official_code(fixture, case):
    """On every CPU: the same blocks full at every call, the papers' NFC, and the latents within
    float reordering of the official ones."""
    r = per_site(fixture, case)
    assert r.within_tolerance, f"{case.name}: {r.rel:.2e} of max |latent| > {RELATIVE_TOLERANCE}"
    assert r.same_full_blocks, f"{case.name}: full steps {r.full_steps}"
    assert r.same_full_steps
    # the NFC a row reports is the papers' count: steps at which block 0 computed in full
    assert r.nfc == r.block0_full_steps == int(fixture.expected[f"{case.name}__full_blocks"][:, 0].sum())


@pytest.mark.parametrize("case", [c for c in CASES if c.fusable], ids=[c.name for c in CASES if c.fusable])
def test_fused_path_is_within_the_fixture_tolerance(fixture, case):
    r = run_case(fixture, case, fused=True)
    assert r.within_tolerance, f"{case.name}: {r.rel:.2e} of max |latent| > {RELATIVE_TOLERANCE}"
    assert r.same_full_blocks and r.nfc == len(r.full_steps)


def test_toca_schedule_of_the_fixture_has_block0_only_steps(fixture):
    """The case that tells the official per-block rescheduling apart: at s = 45 and 32 only
    block 0 is full (so 20 block-0 full steps, 18 with every block)."""
    blocks = fixture.expected["toca_ddim50_N3_R0.07__full_blocks"]
    partly = [49 - k for k in range(50) if blocks[k, 0] and not blocks[k].all()]
    assert partly == [45, 32] and int(blocks[:, 0].sum()) == 20 and int(blocks.all(axis=1).sum()) == 18
    assert np.all(blocks[:, 1:] == blocks[:, 1:2])  # blocks 1.. always agree


def _result(path: str, rel: float, bits: bool, blocks: bool = True) -> CaseResult:
    return CaseResult(case="c", path=path, max_abs=rel * 500, rel=rel, bit_identical=bits, full_steps=[],
                      same_full_steps=blocks, same_full_blocks=blocks, nfc=0, block0_full_steps=0)


def test_the_per_site_rule_follows_the_probe():
    """Where the probe case is bit-identical, per-site paths must be too; where the CPU cannot show
    it, they are held to the tolerance, and a schedule difference fails everywhere."""
    exact, foreign = Platform(_result("per-site", 0.0, True)), Platform(_result("per-site", 1.2e-6, False))
    assert exact.exact and not foreign.exact and "1.2e-06" in foreign.describe()
    reordered = _result("per-site", 6e-7, False)
    assert not reordered.passed(exact.exact) and reordered.passed(foreign.exact)
    assert not _result("per-site", 2.5e-3, False).passed(foreign.exact)
    assert not _result("per-site", 0.0, True, blocks=False).passed(exact.exact)
    assert _result("fused", 6e-7, False).passed(exact.exact) and not _result("fused", 2e-5, False).passed(True)
