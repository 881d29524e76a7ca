"""Method configs: a typed dataclass per method, validated by Hydra when the config is composed.

A method file declares its config with ``@method_config("name")``: a dataclass whose
``_target_`` builds the method and whose fields are the method's settings, typed. The
decorator stores it in Hydra's ConfigStore, group ``schema/method``, as ``<name>`` (a group of its
own, so Hydra's list of methods shows methods only); the method's YAML file
(``configs/method/<name>.yaml``) starts with ``defaults: [/schema/method/<name>@_here_,
_self_]``, so a mistyped value (``method.interval=abc``) or an unknown key is refused while the
config is composed, naming the key, before anything is built. Range checks (an interval >= 1)
stay in the constructors, which run before any sampling. A method without a YAML file (one
registered at run time, e.g. by a test) is also stored under its own name, so ``method=<name>``
composes it directly.

``register_builtin()`` imports every module of the packages that hold methods (``baselines``
and ``rfc.method``), so a new method is one file plus one YAML file: nothing else is edited.

Every method config also says how to switch its caching off: a ``degenerate`` ClassVar, the
Hydra overrides (``("method.interval=1",)``) under which the method computes every step, so its
samples must equal ``method=none`` bit for bit. ``registered_methods()`` lists every method with
its config, which is how tests/test_matrix.py runs each method on each model, at its default and
at its degenerate setting, without a test per method.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import is_dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "method"
METHOD_PACKAGES = ("baselines",)
METHOD_MODULES = ("rfc.cache.base", "rfc.method")

SCHEMA_GROUP = "schema/method"  # a method's YAML extends /schema/method/<name>@_here_
_METHODS: dict[str, type] = {}


def register_method(name: str, config: type) -> None:
    """Store ``config`` (a dataclass with ``_target_``) as the schema of method ``name``."""
    if not is_dataclass(config) or not hasattr(config, "_target_"):
        raise TypeError(f"the config of method {name!r} must be a dataclass with a _target_ field")
    _METHODS[name] = config
    store = ConfigStore.instance()
    # a name with a folder ("diffusers/first_block_cache", a peer implementation) is stored in that folder
    folder, _, leaf = name.rpartition("/")
    sub = f"/{folder}" if folder else ""
    store.store(group=SCHEMA_GROUP + sub, name=leaf, node=config)  # its own group: not listed among the methods
    if not (CONFIG_DIR / f"{name}.yaml").is_file():
        store.store(group="method" + sub, name=leaf, node=config)


def method_config(name: str) -> Callable[[type], type]:
    """Class decorator: ``@method_config("fora")`` on the method's config dataclass."""

    def decorate(config: type) -> type:
        register_method(name, config)
        return config

    return decorate


def register_builtin() -> None:
    """Import every method module so that their configs are stored (idempotent)."""
    for package in METHOD_PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{package}.{info.name}")
    for module in METHOD_MODULES:
        importlib.import_module(module)


def registered_methods() -> dict[str, type]:
    """Every registered method's name and config class, built-in ones included (imported here
    first), in name order."""
    register_builtin()
    return dict(sorted(_METHODS.items()))


def degenerate_overrides(name: str) -> tuple[str, ...]:
    """The Hydra overrides under which method ``name`` computes every step (its config's
    ``degenerate``). Raises a TypeError naming the method when its config does not declare them:
    without them nobody can check the method against full compute."""
    config = registered_methods().get(name)
    if config is None:
        raise KeyError(f"no method {name!r} is registered")
    overrides = getattr(config, "degenerate", None)
    if not isinstance(overrides, tuple) or not all(isinstance(o, str) for o in overrides):
        raise TypeError(
            f"the config of method {name!r} ({config.__name__}) must declare its full-compute setting: "
            'degenerate: ClassVar[tuple[str, ...]] = ("method.<key>=<value>", ...)'
        )
    return overrides
