"""Paired randomness: every random draw of sample i comes from its own generator seeded by
(seed, i), never from the global RNG.

Consequences the comparisons rely on: every method sees the same starting noise, labels and
per-step noise; a sample set does not depend on the batch size or on how indices are split
across processes; and CPU and GPU runs start from the same noise (draws happen on the CPU).
Order of draws for one sample: label, starting noise, then one noise tensor per stochastic step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded with ``seed`` (SeedSequence mixing, so
    nearby (seed, index) pairs give unrelated streams)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class SampleStreams:
    """Per-sample generators for one batch of sample indices."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.indices = list(indices)
        self.device = torch.device(device)
        self.generators = []
        for i in self.indices:
            g = torch.Generator(device="cpu")
            g.manual_seed(sample_seed(seed, i))
            self.generators.append(g)

    def labels(self, num_classes: int) -> torch.Tensor:
        """One uniform class label per sample (B,), drawn first from each stream."""
        draws = [torch.randint(num_classes, (1,), generator=g) for g in self.generators]
        return torch.cat(draws).to(self.device)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """One standard-normal tensor of ``shape`` per sample, stacked to (B, *shape)."""
        draws = [torch.randn(tuple(shape), generator=g) for g in self.generators]
        return torch.stack(draws).to(self.device)

    def noise_source(self, shape: Sequence[int]):  # noqa: ANN201 - a NoiseSource closure
        """A callable that returns the next per-step noise batch, for stochastic samplers."""
        return lambda: self.randn(shape)
