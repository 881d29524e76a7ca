"""Building a DiT from config and loading checkpoints with a strict, explanatory key check."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from rfc.models.dit import DiT, DiTConfig
from rfc.utils.errors import MissingAssetError, NonFiniteError, RunError, reason


class CheckpointError(RunError):
    """A checkpoint that cannot be read or does not fit the model, with every offending key named."""


FETCH_HINT = "python scripts/fetch_assets.py"


def require_file(path: str | Path, what: str, hint: str = FETCH_HINT) -> Path:
    """Return ``path`` if it exists, else raise a MissingAssetError naming it and the fix."""
    if path is None or str(path) == "":
        raise MissingAssetError(f"missing {what}: no path is set; give one on the command line or in its config")
    p = Path(path)
    if not p.exists():
        raise MissingAssetError(f"missing {what}: {p} does not exist. Fetch it with `{hint}` "
                                f"(assets folder: set paths.assets=... or the RFC_ASSETS environment variable).")
    if p.is_dir():
        raise MissingAssetError(f"{what} {p} is a folder, not a file: point the setting at the file itself")
    if not p.is_file():  # a device, a pipe or a socket: reading it could block or never end
        raise MissingAssetError(f"{what} {p} is not a regular file (a device, pipe or socket): point the setting "
                                "at the file itself")
    return p


def extract_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """A bare state dict, or the EMA weights of a training checkpoint {model, ema, opt, args}."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, expected a state dict")
    if "ema" in obj and isinstance(obj["ema"], dict):
        return obj["ema"]  # the release's training script: EMA weights are the ones to sample with
    if "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    return obj  # type: ignore[return-value]


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor],
                     optional: tuple[str, ...] = ("pos_embed",), source: str | Path = "checkpoint") -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        raise CheckpointError(f"{source} does not match the model config: " + "; ".join(parts))


def read_checkpoint(path: str | Path) -> object:
    """torch.load of a weights file; a file that is empty, truncated, not a checkpoint, or needs
    pickled code becomes one CheckpointError naming it, never a loader traceback."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... by format
        raise CheckpointError(f"cannot read checkpoint {path} ({reason(err)}); it is "
                              "damaged or not a PyTorch weights file: download it again "
                              f"(`{FETCH_HINT}`) or point model.checkpoint at a valid file") from err


def stated_resolution(path: str | Path) -> int | None:
    """The resolution a checkpoint's file name states, as the official release names them
    (DiT-XL-2-256x256.pt: 256), or None."""
    match = re.search(r"(?<!\d)(\d{2,5})x(\d{2,5})(?!\d)", Path(str(path)).name)
    return int(match.group(1)) if match and match.group(1) == match.group(2) else None


def checkpoint_keys(path: str | Path) -> set[str]:
    """The parameter names of a checkpoint, read without loading its tensors where the format
    allows (memory-mapped); a file that cannot be read is left to ``read_checkpoint`` to report
    when the model is built, so this returns the empty set."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return set(extract_state_dict(obj))
    except Exception:  # noqa: BLE001 - read_checkpoint names the file and the damage at build time
        return set()


def check_finite(state: dict[str, torch.Tensor], source: str, fix: str) -> None:
    """Refuse weights (DiT or VAE) holding NaN or infinity: they turn every sample into garbage
    that would otherwise be scored and recorded as a result. ``source`` names the file, ``fix``
    says what to do."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise NonFiniteError(f"{source}: {key} holds {bad} non-finite value(s) (NaN or inf); {fix}")


def load_checkpoint(model: DiT, path: str | Path) -> DiT:
    """Load ``path`` into ``model`` strictly. ``pos_embed`` may be absent (it is a fixed
    function of the config and recomputed); every other difference is an error, and so is a
    non-finite weight."""
    state = extract_state_dict(read_checkpoint(path))
    check_state_dict(model, state, source=f"checkpoint {path}")
    check_finite(state, f"checkpoint {path}", "the weights are damaged: download or train them again")
    if "pos_embed" not in state:
        state = dict(state, pos_embed=model.pos_embed)
    model.load_state_dict(state, strict=True)
    return model


def build_dit(config: DiTConfig, checkpoint: str | Path | None = None, init: str = "dense",
              seed: int = 0) -> DiT:
    """A DiT in eval mode: loaded from ``checkpoint``, or random.

    Random weights use ``init``: "dit" is the training init (adaLN-Zero: the network outputs zeros),
    "dense" also randomises the zero-initialised layers so outputs and caches are non-trivial.
    """
    if init not in ("dit", "dense"):
        raise ValueError(f"model init must be 'dit' or 'dense', got {init!r}")
    if checkpoint is not None:
        require_file(checkpoint, "DiT checkpoint")
    with torch.random.fork_rng(devices=[]):  # never disturb the caller's global RNG
        torch.manual_seed(seed)
        model = DiT(config)
        if checkpoint is None and init == "dense":
            model.initialize_dense(torch.Generator().manual_seed(seed + 1))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval().requires_grad_(False)
