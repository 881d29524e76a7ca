"""FasterCache (Lv et al., 2025, "FasterCache: Training-Free Video Diffusion Model Acceleration with
High Quality"): dynamic attention reuse on the per-site protocol and CFG-Cache at the guidance level.

Followed: Vchitect/FasterCache at 02d05ef. The official code is one script per model, each with its
schedule written as constants over the 1-based forward counter ``counter``; the defaults here are
its Latte script's (scripts/latte/fastercache_sample_latte.py, 50 steps, a DiT-style model with
classifier-free guidance):

- **Attention reuse** (its transformer block): every self-attention keeps its outputs of the last two
  forwards that computed it, from forward ``cache_start`` (13) on, outputs of forwards that
  approximated it never (its ``sacache``); from forward ``attention_start`` (16) on, at each forward
  whose counter is a multiple of ``attention_interval`` (2), the output is extrapolated,
  ``last + (last - previous) * attention_weight`` (0.5), on the forward's rows (the first rows of
  the kept outputs), provided the kept outputs have that many rows; otherwise it computes. The MLPs
  always run. As for Pyramid Attention Broadcast (baselines/pab.py), the attention output is taken
  before the block's gate, and a single-stream block (FLUX.1, HunyuanVideo) extrapolates its
  attention before ``proj_out`` and computes its MLP.
- **CFG-Cache** (its model forward): from forward ``cfg_start`` (18) on, at each forward whose counter
  is not a multiple of ``cfg_interval`` (5), only the conditional rows are computed; the
  unconditional output is the conditional one plus the stored frequency deltas: both are split by a
  centred 2-D FFT of each frame into a low band (a disc of radius min(H, W) // 5) and the rest,
  ``delta_low`` is multiplied by ``alpha_low`` (1.1) while the counter is below ``low_until`` (45),
  else ``delta_high`` by ``alpha_high`` (1.1) once the counter is above ``high_after`` (35) (the
  script's ``if / elif``: the high band is scaled only from forward 45 on), each multiplication kept
  for the next; and the estimate is the real part of the inverse FFT of the sum, in float32. A
  forward that computes both halves from forward ``delta_start`` (16) on stores the deltas
  (unconditional minus conditional, per band).

Where the harness departs from that script: the conditional rows come first in the harness's
guided batch, so the rows an attention reuses at a forward of the conditional rows alone are the
conditional rows' (the CogVideoX script's ``[:1]``; the Latte script's ``[:1]`` takes its first row,
which its unconditional-first batch makes the unconditional one); the FFT shifts only the frame's
two axes (the script's ``fftshift`` without ``dim`` also rolls the batch and channel axes and its
``ifftshift`` rolls them back: the same numbers); a forward that would extrapolate from a kept
output with fewer rows than it computes computes instead (the script checks the last output only
and would broadcast the older one; its constants never get there). ``attention_start: null`` and
``cfg_start: null`` switch the two parts off; both off is full compute. FLUX.1 and HunyuanVideo
are guidance-distilled (one row per sample): CFG-Cache has nothing to skip there and stays off.
On flux-tiny and DiT-tiny both parts equal the official rules written out in
tests/test_attention_reuse.py bit for bit, and the attention reuse at weight 0 equals diffusers'
FasterCache hook (whose cache also keeps extrapolated outputs: at other weights they differ).

Accounting: a step counts towards NFC when it computed every attention on both halves; a step of
the conditional rows alone is charged for those rows (MethodStats.reduced_rows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from baselines.pab import AttentionReuse
from rfc.cache.base import GuidedModel
from rfc.cache.registry import method_config
from rfc.cache.schedules import require, require_int
from rfc.samplers.sampling import StepInfo


@method_config("fastercache")
@dataclass
class FasterCacheConfig:
    _target_: str = "baselines.fastercache.FasterCache"
    cache_start: int = 13
    attention_start: int | None = 16
    attention_interval: int = 2
    attention_weight: float = 0.5
    cfg_start: int | None = 18
    cfg_interval: int = 5
    delta_start: int = 16
    alpha_low: float = 1.1
    low_until: int = 45
    alpha_high: float = 1.1
    high_after: int = 35
    degenerate: ClassVar[tuple[str, ...]] = ("method.attention_start=null", "method.cfg_start=null")


def frequency_bands(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, H, W) or (B, C, T, H, W), in float32 -> its centred 2-D spectrum per frame, split into
    the low band (a disc of radius min(H, W) // 5 about the centre) and the rest."""
    H, W = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    rows = torch.arange(H, device=x.device).view(H, 1)
    cols = torch.arange(W, device=x.device).view(1, W)
    low = (cols - W // 2) ** 2 + (rows - H // 2) ** 2 <= (min(H, W) // 5) ** 2
    return spectrum * low, spectrum * ~low


def from_bands(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The real signal whose centred spectrum is low + high (frequency_bands inverted)."""
    return torch.fft.ifft2(torch.fft.ifftshift(low + high, dim=(-2, -1))).real


class FasterCache(AttentionReuse):
    name = "fastercache"

    def __init__(self, cache_start: int = 13, attention_start: int | None = 16, attention_interval: int = 2,
                 attention_weight: float = 0.5, cfg_start: int | None = 18, cfg_interval: int = 5,
                 delta_start: int = 16, alpha_low: float = 1.1, low_until: int = 45, alpha_high: float = 1.1,
                 high_after: int = 35) -> None:
        super().__init__()
        for key, value in (("cache_start", cache_start), ("attention_interval", attention_interval),
                           ("cfg_interval", cfg_interval), ("delta_start", delta_start), ("low_until", low_until),
                           ("high_after", high_after)):
            require_int(value, f"method.{key}", 1)
        if attention_start is not None:
            require(isinstance(attention_start, int) and attention_start > cache_start,
                    f"method.attention_start must be an integer > method.cache_start ({cache_start}) or null, got "
                    f"{attention_start}: an attention extrapolates from outputs kept at earlier forwards")
        if cfg_start is not None:
            require(isinstance(cfg_start, int) and cfg_start > delta_start,
                    f"method.cfg_start must be an integer > method.delta_start ({delta_start}) or null, got "
                    f"{cfg_start}: the unconditional estimate needs deltas from an earlier forward")
        self.settings = {"cache_start": cache_start, "attention_start": attention_start,
                         "attention_interval": attention_interval, "attention_weight": float(attention_weight),
                         "cfg_start": cfg_start, "cfg_interval": cfg_interval, "delta_start": delta_start,
                         "alpha_low": float(alpha_low), "low_until": low_until, "alpha_high": float(alpha_high),
                         "high_after": high_after}

    def reset(self) -> None:
        super().reset()
        self.deltas: tuple[torch.Tensor, torch.Tensor] | None = None  # (low, high): unconditional - conditional
        self.conditional_only = False

    # ---- the schedule ---------------------------------------------------------------------------
    def begin_step(self, step: StepInfo) -> None:
        """Both decisions need the forward's rows (known in ``guidance`` / ``run_blocks``); the step is
        counted when it ends."""
        self.step = step
        self.full, self.reusing, self.conditional_only = True, False, False

    def end_step(self, step: StepInfo) -> None:
        self.full = not (self.reusing or self.conditional_only)
        self.count_step(step, self.full)
        super().end_step(step)

    def _counter(self) -> int:
        return self.step.index + 1

    def _may_reuse(self, rows: int) -> bool:
        s, c = self.settings, self._counter()
        if s["attention_start"] is None or c < s["attention_start"] or c % s["attention_interval"] != 0:
            return False
        kept = next(iter(self.kept.values()), None)
        return kept is not None and all(k.shape[0] >= rows for k in kept)

    def run_blocks(self, model: torch.nn.Module, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.step is not None:
            self.reusing = self._may_reuse(tokens.shape[0])
        return super().run_blocks(model, tokens, c)

    # ---- attention reuse ------------------------------------------------------------------------
    def keep(self, index: int, attn: torch.Tensor) -> None:
        c = self._counter() if self.step is not None else 0
        if c == self.settings["cache_start"]:
            self.kept[index] = [attn, attn]
        elif c > self.settings["cache_start"]:
            self.kept[index] = [self.kept[index][-1], attn]

    def reused(self, index: int, rows: int) -> torch.Tensor:
        previous, last = (k[:rows] for k in self.kept[index])
        return last + (last - previous) * self.settings["attention_weight"]

    # ---- CFG-Cache ------------------------------------------------------------------------------
    def guidance(self, denoiser: GuidedModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if denoiser.batch_multiplier != 2 or self.step is None or s["cfg_start"] is None:
            return denoiser.guided(x, t, y)
        c, batch = self._counter(), x.shape[0]
        if c >= s["cfg_start"] and c % s["cfg_interval"] != 0:
            self.conditional_only = True
            cond = denoiser.model(x, t, y)
            low, high = self.deltas
            if c < s["low_until"]:
                low = low * s["alpha_low"]
            elif c > s["high_after"]:
                high = high * s["alpha_high"]
            self.deltas = (low, high)
            cond_low, cond_high = frequency_bands(cond)
            uncond = from_bands(low + cond_low, high + cond_high).to(cond.dtype)
            return denoiser.combine(torch.cat([cond, uncond], dim=0), batch)
        out = denoiser.model(*denoiser.rows(x, t, y))
        if c >= s["delta_start"]:
            cond_low, cond_high = frequency_bands(out[:batch])
            uncond_low, uncond_high = frequency_bands(out[batch:])
            self.deltas = (uncond_low - cond_low, uncond_high - cond_high)
        return denoiser.combine(out, batch)

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        return (*super().cache_tensors(), *(self.deltas or ()))

    def params(self) -> dict[str, object]:
        return dict(self.settings)
