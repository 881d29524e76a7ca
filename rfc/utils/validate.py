"""Typed reads of config values: a key that must be an integer is one (``seed=1.5`` is refused, not
truncated to 1), a number is finite (``cfg_scale=nan`` never reaches the sampler), and every
refusal names the key. Methods and samplers are checked against their constructors' annotations,
so a new method's keys are checked without listing them here."""

from __future__ import annotations

import inspect
import math
import types
import typing
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from rfc.utils.errors import ConfigError


def as_int(value: Any, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int, or a ConfigError naming ``key``. Integral floats (8.0) and numeric
    strings are refused too: the config said something other than an integer."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    _check_range(value, key, minimum, maximum)
    return value


def as_float(value: Any, key: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a finite float (ints welcome), or a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    _check_range(value, key, minimum, maximum)
    return float(value)


def as_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _check_range(value: float, key: str, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be <= {maximum}, got {value!r}")


def _allowed(hint: Any) -> tuple[set[type], bool]:
    """The plain types a constructor annotation admits, and whether None is one of them."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return {a for a in args if a is not type(None)}, type(None) in args


def check_arguments(node: DictConfig, group: str) -> None:
    """Check each key of a ``_target_`` config group (method, sampler) against the annotation of
    the constructor parameter it fills: int, float (finite), bool. Keys with other annotations
    (strings, choices) are left to the constructor, which names them itself. A ``_target_`` may
    be a class (its ``__init__`` is read) or a factory function (its own parameters are)."""
    target = node.get("_target_")
    if not target:
        return
    try:
        obj = get_object(str(target))
        init = obj.__init__ if inspect.isclass(obj) else obj
        hints = typing.get_type_hints(init)
        params = inspect.signature(init).parameters
    except Exception as err:  # an unknown _target_: Hydra's instantiate reports it with the key
        raise ConfigError(f"{group}._target_ {target!r} cannot be loaded ({err})") from err
    values = OmegaConf.to_container(node, resolve=True)
    for key, value in values.items():
        if key.startswith("_"):
            continue
        if key not in params:
            raise ConfigError(f"{group}.{key} is not a setting of {target} "
                              f"(its settings: {', '.join(p for p in params if p != 'self')})")
        types_, nullable = _allowed(hints.get(key, Any))
        name = f"{group}.{key}"
        if value is None:
            if types_ & {int, float, bool} and not nullable:
                raise ConfigError(f"{name} must be set, got null")
            continue
        if bool in types_ and not types_ - {bool}:
            as_bool(value, name)
        elif int in types_ and float not in types_:
            as_int(value, name)
        elif float in types_:
            as_float(value, name)
