"""A model family in one place: everything the run layer needs to know about a kind of model
(DiT, FLUX.1, and what comes next), behind one interface, so that planning, building, sampling,
decoding, the sample setting and the FLOPs never ask which family they run.

A family says how its architecture is read and checked from the model config (``arch``), what
has to exist before anything is built (``check``), how the model and its decoder are built
(``build``, ``build_vae``), how it is guided (``guidance``: classifier-free guidance for DiT, none
for FLUX.1-dev, whose guidance is a model input), what a sample's latent looks like (``latent_shape``,
any rank: images (C, H, W) now, video (C, T, H, W) next), how a batch is conditioned
(``conditioning``: class labels drawn from each sample's stream, or prompt indices), how latents
become images (``decode``), what the sampler needs from it (``sampler_args``), its sites per block
(``sites``) and what each site kind costs (``cost``).

Families register themselves (``register_family``) and are found from a run's model config
(``family_of``: its ``family`` key, ``dit`` when absent) or from a built model (``family_of_model``:
the family whose ``model_class`` it is). ``register_builtin`` imports the families of this package
(every ``rfc/models/*_family.py``); a family defined elsewhere (a test file, a plug-in) registers
itself the same way.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from omegaconf import DictConfig
from torch import nn

from rfc.models.flops import CostModel
from rfc.models.hub import hf_snapshot
from rfc.models.prompts import PromptSet, load_prompts
from rfc.models.vae import decode
from rfc.utils.errors import ConfigError
from rfc.utils.seeding import SampleStreams

FAMILY_SUFFIX = "_family"  # rfc/models/<name>_family.py: a module that registers a family
DEFAULT_FAMILY = "dit"  # a model config without a ``family`` key (configs/model/dit-*.yaml)

_FAMILIES: dict[str, ModelFamily] = {}


class ModelFamily:
    """One kind of model, as the run layer sees it. Subclasses set ``name``, ``tiny`` (the model
    config of its small offline model, e.g. ``dit-tiny``), ``model_class`` and implement the
    methods below; the defaults are those of a class-conditional image model."""

    name: ClassVar[str]
    tiny: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]
    row_kind: ClassVar[str] = "class"  # the kind of its rows (eval.registry: class, t2i, t2v): their metrics

    # ---- the model config ----------------------------------------------------------------------
    def arch(self, m: DictConfig) -> Any:
        """The architecture (a frozen dataclass: the built model's ``config``) from the model
        config, every size checked; raises ConfigError naming the key at fault."""
        raise NotImplementedError

    def check(self, cfg: DictConfig, arch: Any, paths: Mapping[str, Any], score: bool) -> None:
        """Every check of the family's settings and files (weights, decoder) before anything is
        built: a mistake costs seconds, not a sampling job."""

    def prompts(self, cfg: DictConfig) -> PromptSet | None:
        """The prompt set of a text-conditioned family (sample i is drawn for prompt i), else None."""
        return None

    def notes(self, cfg: DictConfig, arch: Any) -> list[str]:
        """What every row of this setting must say about it (read before sampling, cheaply): a
        checkpoint whose native resolution cannot be known, say. Empty by default."""
        return []

    def random_note(self, m: DictConfig) -> str:
        """What ``model.pretrained=false`` means for this family, for the person at the terminal."""
        return "random weights (timing is real, images are not)"

    def setting(self, cfg: DictConfig, arch: Any, paths: Mapping[str, Any]) -> dict[str, object]:
        """The family's values of the sample setting (rfc.run.setting.SAMPLE_KEYS): model, arch,
        image_size, vae, cfg_scale, guided_channels, checkpoint (weights named by content or by
        their random init), and any key of its own (a text-conditioned family's ``prompts``)."""
        raise NotImplementedError

    def guidance_line(self, setting: Mapping[str, object]) -> str:
        """How this family guides, in words (run.log's config summary)."""
        scale = float(setting["cfg_scale"])
        return (
            f"cfg_scale {scale:g} on {setting['guided_channels']} channel(s)"
            if scale > 1
            else f"none (cfg_scale {scale:g})"
        )

    # ---- building ------------------------------------------------------------------------------
    def build(self, cfg: DictConfig, arch: Any, device: torch.device, prompts: list[str] | None) -> nn.Module:
        """The model on ``device``, weights loaded (or drawn from ``cfg.seed``) and checked, in
        fp32: the run layer applies the run's precision afterwards. Its ``config`` is ``arch``
        (sampling code handed only the model reads the latent shape from it). ``prompts``: the run's prompts,
        for a text-conditioned family."""
        raise NotImplementedError

    def guidance(self, cfg: DictConfig, arch: Any) -> dict[str, object]:
        """The guidance wrapper's arguments (rfc.samplers.sampling.CFGDenoiser: ``scale``,
        ``null_class``, ``guided_channels``): classifier-free guidance by default; a family whose
        guidance is distilled into the model's input returns scale 1 (no second half)."""
        return dict(
            scale=float(cfg.cfg_scale), null_class=arch.num_classes, guided_channels=int(cfg.model.guided_channels)
        )

    def build_vae(self, cfg: DictConfig, paths: Mapping[str, Any], device: torch.device) -> nn.Module | None:
        """The decoder from latents to images on ``device``, or None for a pixel-space model."""
        return None

    def sampler_args(self, arch: Any) -> dict[str, object]:
        """Keyword arguments the sampler's config cannot know (DiT: whether the model learns sigma)."""
        return {}

    # ---- sampling ------------------------------------------------------------------------------
    def latent_shape(self, arch: Any) -> tuple[int, ...]:
        """One sample's latent, without the batch dimension: channels first, then any number of
        spatial (or temporal) dimensions."""
        raise NotImplementedError

    def conditioning(self, model: nn.Module, streams: SampleStreams, batch: range) -> torch.Tensor:
        """Each sample's conditioning (B,): by default a class label drawn first from its stream."""
        return streams.labels(model.config.num_classes)

    def decode(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, C, *spatial) in about [-1, 1]."""
        return decode(vae, latents)

    # ---- accounting ----------------------------------------------------------------------------
    def sites(self, arch: Any) -> tuple[str, ...]:
        """Every site's kind in execution order (DiT: attn, mlp per block)."""
        raise NotImplementedError

    def cost(self, arch: Any) -> CostModel:
        """FLOPs per unit of work for ``arch``: each site kind's cost, modulation and norms."""
        raise NotImplementedError


class PromptFamily(ModelFamily):
    """A text-conditioned family whose guidance is distilled into the model's input (FLUX.1,
    HunyuanVideo): sample i is drawn for prompt i of the run's prompt set (DrawBench unless
    ``prompts`` names another), no classifier-free guidance, the guidance value recorded as the
    setting's ``cfg_scale``. Its built model has ``prompt_count``."""

    def prompts(self, cfg: DictConfig) -> PromptSet:
        return load_prompts(str(cfg.get("prompts") or "drawbench"))

    def guidance_line(self, setting: Mapping[str, object]) -> str:
        guidance = setting.get("cfg_scale")
        text = f"distilled guidance {guidance} (a model input, no CFG)" if guidance is not None else "none"
        return f"{text}; prompts {setting.get('prompts')}"

    def guidance(self, cfg: DictConfig, arch: Any) -> dict[str, object]:
        """No classifier-free guidance: the guidance is distilled into the model's input."""
        return dict(scale=1.0, null_class=0, guided_channels=arch.in_channels)

    def conditioning(self, model: nn.Module, streams: SampleStreams, batch: range) -> torch.Tensor:
        """Sample i's prompt index (i modulo the table's size); its stream then gives only its noise."""
        count = model.prompt_count
        return torch.tensor([i % count for i in batch], dtype=torch.long, device=streams.device)

    @staticmethod
    def weights_id(m: DictConfig, arch: Mapping[str, Any]) -> str:
        """The setting's name of the weights: the Hugging Face snapshot (hf:<repo>@<commit>) of a
        pretrained model, else the random init of ``arch`` (``random_weights_id``)."""
        if m.pretrained:
            return f"hf:{m.repo}@{Path(hf_snapshot(str(m.repo))).name[:12]}"
        return random_weights_id(m.init, arch)

    @staticmethod
    def load_dtype(cfg: DictConfig) -> torch.dtype:
        """What the snapshot loads in: bfloat16 directly under precision=bf16, else fp32."""
        return torch.bfloat16 if str(cfg.get("precision")) == "bf16" else torch.float32


def random_weights_id(init: object, arch: Mapping[str, Any]) -> str:
    """The sample-setting name of random weights: their init and a hash of the architecture that
    draws them (every family names random weights alike, so two runs compare only when both match)."""
    body = json.dumps(dict(arch), sort_keys=True)
    return f"random:{init}:{hashlib.sha256(body.encode()).hexdigest()[:8]}"


F = TypeVar("F", bound=type[ModelFamily])


def register_family(cls: F) -> F:
    """Register a family (usable as a class decorator); a second family of the same name is
    refused unless it is the same class (a module imported twice)."""
    name = cls.name
    known = _FAMILIES.get(name)
    if known is not None and type(known).__qualname__ != cls.__qualname__:
        raise ValueError(f"model family {name!r} is already registered ({type(known).__name__})")
    _FAMILIES[name] = cls()
    return cls


def unregister_family(name: str) -> None:
    """Forget a registered family (a test that registered its own undoes it)."""
    _FAMILIES.pop(name, None)


def register_builtin() -> None:
    """Import (and so register) the families of this package: every ``rfc/models/*_family.py``,
    so a new family is its own file and nothing here lists it."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.endswith(FAMILY_SUFFIX):
            importlib.import_module(f"{__package__}.{info.name}")


def families() -> dict[str, ModelFamily]:
    """Every registered family by name."""
    register_builtin()
    return dict(_FAMILIES)


def family_of(m: DictConfig) -> ModelFamily:
    """The family of a run's model config: its ``family`` key (``dit`` when absent), refused with
    the names known when no family of that name is registered."""
    name = str(m.get("family") or DEFAULT_FAMILY)
    known = families()
    if name not in known:
        raise ConfigError(f"model.family={name!r} is not a registered model family; known: {', '.join(sorted(known))}")
    return known[name]


def family_of_model(model: nn.Module) -> ModelFamily:
    """The family a built model belongs to (the one whose ``model_class`` it is an instance of):
    sampling code that is handed a model finds its latent shape and conditioning here."""
    for family in families().values():
        if isinstance(model, family.model_class):
            return family
    raise TypeError(f"{type(model).__name__} belongs to no registered model family")
