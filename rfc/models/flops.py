"""The papers' analytic FLOPs: transformer blocks only (no embedders, final layer or VAE),
a multiply-add counted as 2 FLOPs, B rows per sample step (2 with guidance). DiT first; FLUX.1's
double- and single-stream blocks below, with the conventions that reproduce the papers' FLUX row.

A model family prices its sites here (``CostModel``: one ``SiteCost`` per site kind, the
modulation of a step and the layer norms), so the accounting of what a method ran (the counters
of rfc.cache.base.MethodStats, read by name) turns into FLOPs the same way for every family: a
site is charged what its own kind costs, and a forward that ran fewer rows than guidance asks for
is charged only the rows it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


def attention_flops(B: int, N: int, C: int, h: int) -> float:
    d = C / h
    return (2 * B * N * C * 3 * C  # qkv projection
            + B * h * N * d  # query scaling
            + 2 * B * h * N * N * d  # q k^T
            + 5 * B * h * N * N  # softmax
            + 2 * B * h * N * N * d  # attention x v
            + 2 * B * N * C * C)  # output projection


def mlp_flops(B: int, N: int, C: int) -> float:
    return 2 * 2 * B * N * C * 4 * C + 6 * B * N * 4 * C  # two linears + GELU(tanh)


def norm_flops(B: int, N: int, C: int) -> float:
    return 2 * B * N * C


def adaln_flops(B: int, C: int) -> float:
    return B * C + 6 * B * C * C


def block_flops(B: int, N: int, C: int, h: int) -> float:
    """One full block as the papers count it: attention, MLP, one layer-norm term, adaLN
    (16.954 GFLOPs for DiT-XL/2 at 256 px with guidance; 23.735 TFLOPs for DDIM-50)."""
    return attention_flops(B, N, C, h) + mlp_flops(B, N, C) + norm_flops(B, N, C) + adaln_flops(B, C)


def full_step_flops(B: int, N: int, C: int, h: int, depth: int) -> float:
    return depth * block_flops(B, N, C, h)


# --------------------------------------------------------------------------------------------
# FLUX.1 (diffusers FluxTransformer2DModel): 19 double-stream and 38 single-stream blocks
# --------------------------------------------------------------------------------------------
#
# The same papers' count as the DiT functions above, applied to FLUX's blocks (B rows; FLUX.1-dev
# has guidance distilled into an embedding, so B = 1), with these conventions:
#
# - a multiply-add is 2 FLOPs everywhere, the modulation linears included (2*C*6C per
#   Linear(C, 6C), plus C for the SiLU of the conditioning vector);
# - the attention terms of the DiT count (q, k, v projections, query scaling, q k^T, attention x v,
#   output projections) and the MLP terms (two linears, tanh-GELU at 6 FLOPs per element); a
#   layer norm + modulate is C FLOPs per token it normalises (two per stream in a double-stream
#   block, one in a single-stream block); RMS q/k norms and RoPE are not counted (elementwise, as
#   the DiT count has no elementwise terms but GELU, softmax, scaling and norm);
# - the softmax is NOT counted by default (``softmax=True`` adds the DiT count's 5 FLOPs per score).
#   The papers' FLUX figures leave it out: TaylorSeer's full-compute FLUX.1-dev row (50 steps,
#   1024x1024, n_img 4096, n_txt 512) is 3719.50 TFLOPs; this count gives 3719.485 T (0.015 T
#   below), and with the softmax 3726.747 T (7.26 T above, more than the whole difference the
#   other conventions could explain). The small terms (scaling, GELU, norms, modulation: 1.39 T
#   together) are not pinned down one by one by a single total; the matmuls alone give 3718.10 T.
# - RFC's Table 2 (ICLR 2026) full-compute row, 2813.50 T, is reproduced by no setting tried:
#   896x896 (n_img 3136) with 512 text tokens gives 2822.01 T (+8.51), 1024x768 2764.48 T,
#   1024x1024 with 256 text tokens 3473.85 T, no text-token MLPs 3646.00 T, 38 steps at 1024x1024
#   2826.81 T (2813.50 T is 37.82 steps' worth), and adding the softmax moves each of these up
#   (tests/test_flops_flux.py checks these and a grid of resolutions, text lengths and steps).
#
# Partial computation (ToCa-style: a subset of tokens recomputed, the rest reused from the cache):
# the recomputed tokens' q, k, v projections, their scores against the keys of all N tokens (the
# other tokens' keys and values come from the cache, at no cost), attention x v for them, and their
# output projection (flux_joint_attention_flops / flux_single_block_flops with ``queries``). A
# partial double-stream MLP counts its tokens over the concatenated text + image tokens. flux_flops
# prices a partial single-stream site as the one method that makes them runs it (ToCa's FLUX code):
# the tokens' proj_mlp, GELU and proj_out, their attention reused (flux_single_partial_flops).


def _flux_attention_core(B: int, queries: int, keys: int, C: int, h: int, softmax: bool) -> float:
    """q, k, v projections of the query tokens, scaling, scores against ``keys`` tokens, (softmax),
    attention x v: what joint attention and a single-stream block's attention share."""
    d = C / h
    return (2 * B * queries * C * 3 * C  # q, k, v projections (image: to_q/k/v, text: add_q/k/v_proj)
            + B * h * queries * d  # query scaling
            + 2 * B * h * queries * keys * d  # q k^T
            + (5 * B * h * queries * keys if softmax else 0)  # softmax
            + 2 * B * h * queries * keys * d)  # attention x v


def _queries(N: int, queries: int | None) -> int:
    if queries is None:
        return N
    if not 0 <= queries <= N:
        raise ValueError(f"recomputed tokens must be within 0..{N} (all text + image tokens), got {queries}")
    return queries


def flux_joint_attention_flops(B: int, N: int, C: int, h: int, queries: int | None = None,
                               softmax: bool = False) -> float:
    """A double-stream block's joint attention over N = n_txt + n_img tokens: projections of both
    streams, attention over their concatenation, to_out (image) and to_add_out (text). ``queries``:
    tokens recomputed at a partial site (default all N), attending to all N keys."""
    q = _queries(N, queries)
    return _flux_attention_core(B, q, N, C, h, softmax) + 2 * B * q * C * C  # to_out + to_add_out


def flux_mlp_flops(B: int, tokens: int, C: int, mlp_ratio: float = 4.0) -> float:
    """A double-stream block's two MLPs (ff for image tokens, ff_context for text tokens),
    C -> mlp_ratio*C -> C with tanh-GELU, over ``tokens`` of them together."""
    M = int(C * mlp_ratio)
    return 2 * 2 * B * tokens * C * M + 6 * B * tokens * M


def flux_single_block_flops(B: int, N: int, C: int, h: int, mlp_ratio: float = 4.0, queries: int | None = None,
                            softmax: bool = False) -> float:
    """A single-stream block on all N tokens: attention (no output projection of its own), proj_mlp
    C -> mlp_ratio*C with GELU beside it, proj_out (C + mlp_ratio*C) -> C. ``queries``: tokens
    recomputed at a partial site (default all N); keys and values of the others from the cache."""
    q = _queries(N, queries)
    M = int(C * mlp_ratio)
    return (_flux_attention_core(B, q, N, C, h, softmax)
            + 2 * B * q * C * M + 6 * B * q * M  # proj_mlp + GELU(tanh)
            + 2 * B * q * (C + M) * C)  # proj_out


def flux_single_partial_flops(B: int, k: int, C: int, mlp_ratio: float = 4.0) -> float:
    """A partial single-stream site as ToCa's FLUX code recomputes it: for the k chosen tokens the
    MLP (proj_mlp, GELU) and proj_out of [cached attention, new MLP]; their attention is reused."""
    M = int(C * mlp_ratio)
    return 2 * B * k * C * M + 6 * B * k * M + 2 * B * k * (C + M) * C


def flux_double_modulation_flops(B: int, C: int) -> float:
    """A double-stream block's AdaLayerNormZero for image and for text: two Linear(C, 6C) on
    silu(temb). Every block computes it every step, cached or not."""
    return 2 * (B * C + 2 * B * C * 6 * C)


def flux_single_modulation_flops(B: int, C: int) -> float:
    """A single-stream block's AdaLayerNormZeroSingle: one Linear(C, 3C) on silu(temb)."""
    return B * C + 2 * B * C * 3 * C


def flux_norm_flops(B: int, tokens: int, C: int) -> float:
    """Layer norm + modulate of ``tokens`` tokens, C FLOPs each (the DiT count's norm term per norm)."""
    return B * tokens * C


def flux_full_step_flops(rows: int, n_img: int, n_txt: int, hidden: int, heads: int, n_double: int, n_single: int,
                         mlp_ratio: float = 4.0, softmax: bool = False) -> float:
    """One step computed in full: every block's modulation, joint attention and both MLPs of every
    double-stream block (two norms per token), every single-stream block (one norm per token).
    FLUX.1-dev, 1024x1024, 512 text tokens, B = 1: 74.390 TFLOPs, x 50 steps = 3719.485 T
    (TaylorSeer's 3719.50)."""
    B, N, C = rows, n_img + n_txt, hidden
    double = (flux_double_modulation_flops(B, C) + flux_joint_attention_flops(B, N, C, heads, softmax=softmax)
              + flux_mlp_flops(B, N, C, mlp_ratio) + flux_norm_flops(B, 2 * N, C))
    single = (flux_single_modulation_flops(B, C) + flux_single_block_flops(B, N, C, heads, mlp_ratio, softmax=softmax)
              + flux_norm_flops(B, N, C))
    return n_double * double + n_single * single


def flux_flops(stats: object, rows: int, n_img: int, n_txt: int, hidden: int, heads: int, n_double: int,
               n_single: int, mlp_ratio: float = 4.0, softmax: bool = False) -> float:
    """Analytic FLOPs per sample of what ran, from a MethodStats' counters (read by name, so any
    object with them will do):

    - ``block_calls``: block evaluations that computed their modulation; every block does so every
      step, so block_calls / (n_double + n_single) is the steps, each paying every modulation;
    - ``full_attn`` / ``full_mlp``: full double-stream joint-attention sites / MLP sites (image and
      text MLP together); ``full_total``: full single-stream blocks (0 where the counter is absent);
    - ``partial_attn_tokens`` / ``partial_mlp_tokens`` / ``partial_total_tokens``: token counts of
      partial double-stream attention, double-stream MLP (over text + image tokens) and
      single-stream sites (MLP and proj_out only: ``flux_single_partial_flops``);
    - ``norm_tokens``: tokens pushed through a layer norm + modulate (a full step: 2 N per
      double-stream block, N per single-stream block).

    Like the DiT count, it follows the computation that ran, so a cached step costs its modulations
    (and whatever norms and partial sites it ran), not zero."""
    return flux_cost(n_img, n_txt, hidden, heads, n_double, n_single, mlp_ratio, softmax).flops(stats, rows)


# --------------------------------------------------------------------------------------------
# Cost per site kind: what a model family declares, and the one count of what ran
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteCost:
    """FLOPs of one site kind for B rows: computed on every token (``full(B)``) and recomputed for
    k tokens (``partial(B, k)``, token-wise methods such as ToCa)."""

    full: Callable[[float], float]
    partial: Callable[[float, int], float]


@dataclass(frozen=True)
class CostModel:
    """A model's FLOPs per unit of work, from its family (``ModelFamily.cost``). ``sites``: each
    site kind's cost, in the order the count adds them; ``blocks``: blocks per forward;
    ``step_modulation(B)``: every block's modulation in one forward (a block computes it whenever
    it is called, cached or not); ``norm(B, tokens)``: layer norm + modulate of that many tokens."""

    sites: Mapping[str, SiteCost]
    blocks: int
    step_modulation: Callable[[float], float]
    norm: Callable[[float, int], float]

    def work_flops(self, work: object, rows: float) -> float:
        """FLOPs of the counters of ``work`` (read by name; a missing one counts 0) for ``rows``
        rows: block calls pay the modulation, each site kind its own full and partial cost."""
        B = rows
        total = getattr(work, "block_calls", 0) / self.blocks * self.step_modulation(B)
        for kind, cost in self.sites.items():
            total += getattr(work, f"full_{kind}", 0) * cost.full(B)
        for kind, cost in self.sites.items():
            total += sum(cost.partial(B, k) for k in getattr(work, f"partial_{kind}_tokens", ()))
        return total + self.norm(B, getattr(work, "norm_tokens", 0))

    def flops(self, stats: object, rows: float) -> float:
        """Analytic FLOPs per sample of what ran (``rows``: model rows per sample a guided forward
        computes, 2 with classifier-free guidance). Work done in forwards that computed only a
        fraction f of those rows (guidance-level reuse: the conditional rows alone) is in
        ``stats.reduced_rows`` {f: work} and is charged f of the rows, not all of them."""
        total = self.work_flops(stats, rows)
        for fraction, work in getattr(stats, "reduced_rows", {}).items():
            total -= self.work_flops(work, rows * (1 - fraction))
        return total


def dit_cost(tokens: int, hidden: int, heads: int, depth: int = 1) -> CostModel:
    """DiT's blocks: attention and MLP sites (partial sites: the k recomputed tokens among
    themselves, as the papers' ToCa count does), adaLN per block call, one norm term per token."""
    N, C, h = tokens, hidden, heads
    return CostModel(
        sites={"attn": SiteCost(lambda B: attention_flops(B, N, C, h), lambda B, k: attention_flops(B, k, C, h)),
               "mlp": SiteCost(lambda B: mlp_flops(B, N, C), lambda B, k: mlp_flops(B, k, C))},
        blocks=depth, step_modulation=lambda B: depth * adaln_flops(B, C), norm=lambda B, n: B * n * C)


def flux_cost(n_img: int, n_txt: int, hidden: int, heads: int, n_double: int, n_single: int,
              mlp_ratio: float = 4.0, softmax: bool = False) -> CostModel:
    """FLUX.1's blocks: a double-stream block's joint attention (``attn``) and its two MLPs
    (``mlp``), a single-stream block's one site (``total``), each kind at its own cost, and the
    modulations of both block types every step."""
    N, C = n_img + n_txt, hidden
    return CostModel(
        sites={"attn": SiteCost(lambda B: flux_joint_attention_flops(B, N, C, heads, softmax=softmax),
                                lambda B, k: flux_joint_attention_flops(B, N, C, heads, queries=k, softmax=softmax)),
               "mlp": SiteCost(lambda B: flux_mlp_flops(B, N, C, mlp_ratio),
                               lambda B, k: flux_mlp_flops(B, k, C, mlp_ratio)),
               "total": SiteCost(lambda B: flux_single_block_flops(B, N, C, heads, mlp_ratio, softmax=softmax),
                                 lambda B, k: flux_single_partial_flops(B, k, C, mlp_ratio))},
        blocks=n_double + n_single,
        step_modulation=lambda B: (n_double * flux_double_modulation_flops(B, C)
                                   + n_single * flux_single_modulation_flops(B, C)),
        norm=lambda B, n: flux_norm_flops(B, n, C))
