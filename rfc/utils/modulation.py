"""adaLN modulation arithmetic shared by the models and the caching methods: x * (1 + scale) + shift
and the gated residual x + gate * out, with vectors per sample (B, C), per token (B, T, C) or per
token span (``TokenSpans``). It sits below both layers because a method computes a branch's input
exactly as the block does (``plain_branch``, probes, signals) without importing a model file."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TokenSpans:
    """Per-token adaLN vectors (B, T, C) held as one (B, C) vector per contiguous span of tokens: a
    stream model's double-stream block modulates its text and its image tokens by different vectors.

    Why not the (B, T, C) tensor itself: building it copies each vector to every token, six per block
    per step, and every use reads it back; ``modulate`` and ``gated_add`` instead work span by span
    into one output tensor, with the same elementwise arithmetic (so the same bits). Code that needs
    the tensor (a token subset's vectors, a slice) gets it from ``dense()`` or indexing; so does code
    being compiled (Dynamo does not trace ``out=`` into a strided view)."""

    def __init__(self, vectors: Sequence[torch.Tensor], lengths: Sequence[int]) -> None:
        if len(vectors) != len(lengths) or not vectors:
            raise ValueError(f"TokenSpans needs one vector per span, got {len(vectors)} for {len(lengths)} spans")
        self.vectors, self.lengths = tuple(vectors), tuple(int(n) for n in lengths)
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for n in self.lengths:
            self.bounds.append((start, start + n))
            start += n

    def dim(self) -> int:
        return 3

    @property
    def shape(self) -> torch.Size:
        B, C = self.vectors[0].shape
        return torch.Size((B, sum(self.lengths), C))

    def dense(self) -> torch.Tensor:
        """The (B, T, C) tensor: each token its span's vector."""
        B, C = self.vectors[0].shape
        return torch.cat([v.unsqueeze(1).expand(B, n, C) for v, n in zip(self.vectors, self.lengths, strict=True)],
                         dim=1)

    def __getitem__(self, key: object) -> torch.Tensor:
        return self.dense()[key]


def dense(v: torch.Tensor | TokenSpans) -> torch.Tensor:
    """A modulation vector as a tensor (TokenSpans built out; a tensor as it is)."""
    return v.dense() if isinstance(v, TokenSpans) else v


def _span_output(x: torch.Tensor, v: TokenSpans) -> torch.Tensor:
    if x.shape[1] != v.shape[1]:
        raise ValueError(f"per-span modulation of {v.shape[1]} tokens applied to {x.shape[1]} tokens")
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, v.vectors[0].dtype), device=x.device)


def modulate(x: torch.Tensor, shift: torch.Tensor | TokenSpans, scale: torch.Tensor | TokenSpans) -> torch.Tensor:
    """adaLN modulation: x (B, T, C) scaled and shifted per sample by (B, C) vectors, or per token
    by (B, T, C) ones or TokenSpans (FLUX's double-stream blocks modulate text and image tokens
    differently): x * (1 + scale) + shift."""
    if isinstance(shift, TokenSpans) and isinstance(scale, TokenSpans) and not torch.compiler.is_compiling():
        out = _span_output(x, shift)
        for (lo, hi), sh, sc in zip(shift.bounds, shift.vectors, scale.vectors, strict=True):
            part = out[:, lo:hi]
            torch.mul(x[:, lo:hi], 1 + sc.unsqueeze(1), out=part)
            part.add_(sh.unsqueeze(1))
        return out
    shift, scale = dense(shift), dense(scale)
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


def gated_add(x: torch.Tensor, gate: torch.Tensor | TokenSpans, out: torch.Tensor) -> torch.Tensor:
    """The residual update x + gate * out, gate per sample (B, C), per token (B, T, C) or TokenSpans."""
    if isinstance(gate, TokenSpans) and not torch.compiler.is_compiling():
        res = _span_output(x, gate)
        for (lo, hi), g in zip(gate.bounds, gate.vectors, strict=True):
            part = res[:, lo:hi]
            torch.mul(g.unsqueeze(1), out[:, lo:hi], out=part)
            part.add_(x[:, lo:hi])
        return res
    gate = dense(gate)
    return x + (gate.unsqueeze(1) if gate.dim() == 2 else gate) * out
