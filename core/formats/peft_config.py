"""PEFT LoRA configurations: the rank and scale a config gives each module, and configs that
give each module the rank and scale it has (see :mod:`core.formats.peft` for when each is used).

PEFT looks r and alpha up per module in ``rank_pattern`` / ``alpha_pattern`` with its rule: the
first pattern, in order, that matches the end of the module name at a segment boundary (the
regular expression ``(.*\\.)?(pattern)$``), else the config's ``r`` / ``lora_alpha``; the scale is
alpha / r (alpha / sqrt(r) with ``use_rslora``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import TypeVar

__all__ = [
    "fresh_config",
    "implied_rank_and_scale",
    "pattern_value",
    "same_rank_and_scale",
    "with_targets",
]

# PEFT's own defaults when a config omits them.
_DEFAULT_R = 8
_DEFAULT_ALPHA = 8

V = TypeVar("V")


def pattern_value(patterns: Mapping[str, V], name: str) -> V | None:
    """The value of the first pattern matching ``name`` by PEFT's rule, or None.

    Args:
        patterns: pattern -> value (a ``rank_pattern`` or ``alpha_pattern``), in order.
        name: module name relative to the wrapped model.
    """
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return None


def implied_rank_and_scale(config: Mapping[str, object], name: str) -> tuple[int, float]:
    """(r, scale) PEFT gives module ``name`` under ``config``."""
    r_pattern = pattern_value(_mapping(config.get("rank_pattern")), name)
    alpha_pattern = pattern_value(_mapping(config.get("alpha_pattern")), name)
    r = int(_number(config.get("r") if r_pattern is None else r_pattern, _DEFAULT_R))
    alpha = _number(
        config.get("lora_alpha") if alpha_pattern is None else alpha_pattern, _DEFAULT_ALPHA
    )
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, scale


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _number(value: object, default: float) -> float:
    return float(value) if isinstance(value, int | float) else float(default)


def _explicit_patterns(values: Mapping[str, int], default: int) -> dict[str, int]:
    """Pattern entries (most specific first) under which PEFT's rule gives every module its value.

    Raises:
        ValueError: when no such set exists (cannot happen for distinct module names).
    """
    entries = {name: v for name, v in values.items() if v != default}
    for _ in range(2):
        ordered = dict(
            sorted(entries.items(), key=lambda kv: (-kv[0].count("."), -len(kv[0]), kv[0]))
        )
        wrong = [n for n, v in values.items() if (pattern_value(ordered, n) or default) != v]
        if not wrong:
            return ordered
        entries.update({n: values[n] for n in wrong})
    raise ValueError(f"no rank_pattern expresses the ranks of modules {wrong[:3]}")


def _covers(target_modules: object, name: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if isinstance(target_modules, list | tuple | set):
        return any(name == t or name.endswith(f".{t}") for t in target_modules)
    return False


def with_targets(config: dict[str, object], names: list[str]) -> dict[str, object]:
    targets = config.get("target_modules")
    missing = [n for n in names if not _covers(targets, n)]
    if missing and isinstance(targets, list | tuple | set):
        config["target_modules"] = sorted(set(targets) | set(missing))
    elif missing:  # a regex (or "all-linear") that misses a module: list the names instead
        config["target_modules"] = sorted(names)
    excluded = config.get("exclude_modules")
    if excluded and any(_covers(excluded, n) for n in names):
        config["exclude_modules"] = None
    return config


def fresh_config(
    config: dict[str, object], ranks: Mapping[str, int], *, dora: bool
) -> dict[str, object]:
    r = Counter(ranks.values()).most_common(1)[0][0]
    patterns = _explicit_patterns(ranks, r)
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=r,
        use_rslora=False,
        use_dora=dora,
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
    )
    defaults: dict[str, object] = {
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "task_type": None,
        "base_model_name_or_path": None,
    }
    for key, value in defaults.items():
        config.setdefault(key, value)
    return config


def same_rank_and_scale(implied: tuple[int, float], actual: tuple[int, float]) -> bool:
    return implied[0] == actual[0] and math.isclose(implied[1], actual[1], rel_tol=1e-9)
