"""FLUX.1's analytic FLOPs (rfc/models/flops.py): the papers' full-compute figure, the accounting of
cached and partial steps from MethodStats-like counters, and the DiT numbers left as they were."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rfc.models.flops import (
    block_flops,
    flux_double_modulation_flops,
    flux_flops,
    flux_full_step_flops,
    flux_joint_attention_flops,
    flux_mlp_flops,
    flux_single_block_flops,
    flux_single_modulation_flops,
    full_step_flops,
)

DEV = dict(hidden=3072, heads=24, n_double=19, n_single=38)  # FLUX.1-dev
N_IMG, N_TXT = 4096, 512  # 1024x1024: 64x64 patches; T5 max_sequence_length 512


def _stats(**kw):
    base = dict(block_calls=0, full_attn=0, full_mlp=0, full_total=0, partial_attn_tokens=[],
                partial_mlp_tokens=[], partial_total_tokens=[], norm_tokens=0)
    return SimpleNamespace(**{**base, **kw})


def _full_steps(steps: int, n_img: int = N_IMG, n_txt: int = N_TXT) -> SimpleNamespace:
    """Counters of ``steps`` full steps as a FLUX forward records them."""
    n = n_img + n_txt
    return _stats(block_calls=57 * steps, full_attn=19 * steps, full_mlp=19 * steps, full_total=38 * steps,
                  norm_tokens=steps * (19 * 2 * n + 38 * n))


def test_full_compute_reproduces_taylorseers_flux_dev_row():
    """TaylorSeer's FLUX.1-dev full compute: 3719.50 TFLOPs (50 steps, 1024x1024); tolerance 0.05 T."""
    step = flux_full_step_flops(1, N_IMG, N_TXT, **DEV)
    assert abs(50 * step / 1e12 - 3719.50) < 0.05
    assert abs(step / 1e12 - 74.3897) < 1e-4
    # the same total through the counters a 50-step full-compute run records
    assert flux_flops(_full_steps(50), 1, N_IMG, N_TXT, **DEV) == pytest.approx(50 * step, rel=1e-12)


def test_the_softmax_term_is_what_the_papers_flux_figure_leaves_out():
    """With the DiT count's 5 FLOPs per attention score the total is 3726.75 T, 7.26 T above the
    paper: more than every other small term together, so the paper's figure has no softmax."""
    with_softmax = 50 * flux_full_step_flops(1, N_IMG, N_TXT, **DEV, softmax=True) / 1e12
    assert abs(with_softmax - 3726.747) < 0.001
    n = N_IMG + N_TXT
    expected_delta = 57 * 5 * 24 * n * n * 50 / 1e12
    assert abs(with_softmax - 50 * flux_full_step_flops(1, N_IMG, N_TXT, **DEV) / 1e12 - expected_delta) < 1e-9
    assert with_softmax - 3719.50 > 7.0


def test_no_natural_setting_gives_rfc_table2s_2813_50():
    """RFC's Table 2 full-compute row (2813.50 T) matches no FLUX.1-dev setting: square images
    512..1536 px, 256 or 512 text tokens, with or without text-token MLPs, either softmax count
    (50 steps), nor 1..100 steps at 1024x1024. The nearest is 896x896 with 512 text tokens, 8.5 T off."""
    candidates = []
    for px in range(512, 1537, 16):
        for n_txt in (256, 512):
            for softmax in (False, True):
                full = flux_full_step_flops(1, (px // 16) ** 2, n_txt, **DEV, softmax=softmax)
                for text_mlp in (True, False):
                    step = full - (0 if text_mlp else 19 * flux_mlp_flops(1, n_txt, 3072))
                    candidates.append((abs(50 * step / 1e12 - 2813.50), f"{px}px txt{n_txt}"))
    for steps in range(1, 101):
        for softmax in (False, True):
            t = steps * flux_full_step_flops(1, N_IMG, N_TXT, **DEV, softmax=softmax) / 1e12
            candidates.append((abs(t - 2813.50), f"{steps} steps"))
    gap, name = min(candidates)
    assert gap > 8.0 and name == "896px txt512", (gap, name)
    assert abs(50 * flux_full_step_flops(1, 3136, 512, **DEV) / 1e12 - 2822.014) < 0.001


def test_a_cached_step_costs_its_modulations_and_a_fora_schedule_adds_up():
    C = 3072
    per_step_mod = 19 * (2 * C + 24 * C * C) + 38 * (C + 6 * C * C)  # two Linear(C,6C) / one Linear(C,3C) + SiLU
    assert 19 * flux_double_modulation_flops(1, C) + 38 * flux_single_modulation_flops(1, C) == per_step_mod
    assert flux_flops(_stats(block_calls=57), 1, N_IMG, N_TXT, **DEV) == per_step_mod
    # FORA N=3 on 50 steps: 17 full steps, 33 reusing every block's output (modulations still run)
    full = _full_steps(17)
    fora = _stats(**{**vars(full), "block_calls": 57 * 50})
    expected = 17 * flux_full_step_flops(1, N_IMG, N_TXT, **DEV) + 33 * per_step_mod
    assert flux_flops(fora, 1, N_IMG, N_TXT, **DEV) == pytest.approx(expected, rel=1e-12)


def test_partial_sites_by_hand_on_a_small_configuration():
    """C=8, h=2 (d=4), M=32, N=10 tokens, k=3 recomputed: every term written out."""
    B, C, h, N, k = 2, 8, 2, 10, 3
    M, d = 32, 4
    core = 2 * B * k * C * 3 * C + B * h * k * d + 2 * B * h * k * N * d + 2 * B * h * k * N * d
    attn = core + 2 * B * k * C * C  # + to_out / to_add_out of the k tokens
    assert flux_joint_attention_flops(B, N, C, h, queries=k) == attn
    assert flux_joint_attention_flops(B, N, C, h, queries=k, softmax=True) == attn + 5 * B * h * k * N
    assert flux_mlp_flops(B, k, C) == 2 * 2 * B * k * C * M + 6 * B * k * M
    single = core + 2 * B * k * C * M + 6 * B * k * M + 2 * B * k * (C + M) * C
    assert flux_single_block_flops(B, N, C, h, queries=k) == single
    # all tokens recomputed = the full site
    assert flux_joint_attention_flops(B, N, C, h, queries=N) == flux_joint_attention_flops(B, N, C, h)
    assert flux_single_block_flops(B, N, C, h, queries=N) == flux_single_block_flops(B, N, C, h)
    stats = _stats(partial_attn_tokens=[k], partial_mlp_tokens=[k, 5], partial_total_tokens=[k], norm_tokens=7)
    total = flux_flops(stats, B, 6, 4, C, h, n_double=1, n_single=1)
    mlp_part = 2 * B * k * C * M + 6 * B * k * M + 2 * B * k * (C + M) * C  # ToCa reuses the tokens' attention
    assert total == attn + flux_mlp_flops(B, k, C) + flux_mlp_flops(B, 5, C) + mlp_part + B * 7 * C
    with pytest.raises(ValueError, match="0..10"):
        flux_single_block_flops(B, N, C, h, queries=N + 1)


def test_counters_the_stats_do_not_have_yet_count_as_zero():
    """Before MethodStats has full_total / partial_total_tokens, their absence counts as none."""
    old = SimpleNamespace(block_calls=57, full_attn=19, full_mlp=19, partial_attn_tokens=[], partial_mlp_tokens=[],
                          norm_tokens=0)
    new = _stats(block_calls=57, full_attn=19, full_mlp=19)
    assert flux_flops(old, 1, N_IMG, N_TXT, **DEV) == flux_flops(new, 1, N_IMG, N_TXT, **DEV)


def test_dit_numbers_are_unchanged():
    """DiT-XL/2 at 256 px with guidance: 16.954 GFLOPs per block, 23.735 T for DDIM-50 (ToCa's figure)."""
    assert abs(block_flops(2, 256, 1152, 16) / 1e9 - 16.954) < 0.001
    assert abs(50 * full_step_flops(2, 256, 1152, 16, 28) / 1e12 - 23.735) < 0.001
