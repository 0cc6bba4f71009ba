"""The PEFT layout: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

Keys look like ``base_model.model.<module>.lora_A.weight`` (r x in) and ``.lora_B.weight``
(out x r); the module name is the key stem without ``base_model.model.``. PEFT's update is
dW = scale * B @ A with scale = alpha / r (alpha / sqrt(r) with ``use_rslora``), r and alpha
looked up per module in ``rank_pattern`` / ``alpha_pattern`` with PEFT's rule: the first pattern,
in order, that matches the end of the module name at a segment boundary (the regular expression
``(.*\\.)?(pattern)$``), else the config's ``r`` / ``lora_alpha``.

Writing (decision): when the adapter came from a PEFT config that still implies every module's
rank and scale, that config is kept and the tensors are written as they are (a read -> write ->
read round trip is exact). Otherwise (a conversion, new ranks, new scales, or ``fold_scale=True``)
the scale is folded into B (B' = scale * B), the config gets ``lora_alpha = r`` and
``use_rslora = false``, and modules of another rank get explicit ``rank_pattern`` entries mirrored
in ``alpha_pattern``, checked against PEFT's matching rule so that no pattern catches a module it
was not written for. Either way PEFT computes exactly the adapter's dW. ``target_modules`` is kept
when it covers every written module and extended (or replaced by the list of names) otherwise.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from core.adapter import AdapterLayout, LoraAdapter, LoraModule
from core.errors import CorruptFileError, ShapeMismatchError, UnknownLayoutError
from core.formats.naming import PEFT_WRAPPER, dotted_stems, require_unique
from core.formats.pairing import (
    PairStyle,
    kind_from_metadata,
    metadata_for_write,
    module_from_tensors,
    scaled_up,
    split_pairs,
    tensors_of_module,
)
from core.formats.tensorfile import (
    json_writer,
    read_pickle,
    read_safetensors,
    safetensors_writer,
    write_folder_atomic,
)

__all__ = [
    "CONFIG_NAME",
    "PICKLE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "implied_rank_and_scale",
    "pattern_value",
    "read_peft",
    "write_peft",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_STYLE = PairStyle(down=".lora_A.weight", up=".lora_B.weight")
# PEFT's own defaults when a config omits them.
_DEFAULT_R = 8
_DEFAULT_ALPHA = 8
# Initialisations whose adapters are relative to a modified base weight: their dW is not B @ A.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA adapters are not supported",
    "lora_embedding_": "embedding LoRAs are not supported",
    ".lora_A.bias": "LoRA biases are not supported",
    ".lora_B.bias": "LoRA biases are not supported",
}

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


def _read_config(path: Path) -> dict[str, object]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"unreadable adapter config ({exc})", path=path) from exc
    if not isinstance(config, dict):
        raise CorruptFileError("adapter config is not a JSON object", path=path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnknownLayoutError(
            f"PEFT adapter of type {peft_type} is not a LoRA", path=path, key="peft_type"
        )
    if config.get("use_dora"):
        raise UnknownLayoutError("DoRA adapters are not supported", path=path, key="use_dora")
    if config.get("fan_in_fan_out"):
        raise UnknownLayoutError(
            "fan_in_fan_out adapters (transposed Conv1D weights, e.g. GPT-2) are not supported: "
            "the LoRA-X math assumes nn.Linear's (out, in) weights",
            path=path,
            key="fan_in_fan_out",
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnknownLayoutError(
            f"init_lora_weights={init!r}: this adapter is relative to a modified base weight, "
            "not a plain LoRA (convert it with PEFT first)",
            path=path,
            key="init_lora_weights",
        )
    return config


def read_peft(folder: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Read a PEFT LoRA folder.

    Args:
        folder: holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
            ``adapter_model.bin``, read only with ``allow_pickle``).
        allow_pickle: opt in to the pickle weights file.

    Returns:
        A :class:`LoraAdapter` (layout PEFT, kind LORA, or LORAX when the weights' metadata marks
        a LoRA-X), module names relative to the wrapped model, ``config`` the parsed config.

    Raises:
        CorruptFileError, NonFiniteError, PickleRefusedError: unreadable files or tensors.
        UnknownLayoutError: not a LoRA (DoRA, other PEFT types, stray tensors); names the key.
        UnpairedTensorError, ShapeMismatchError: a missing half; a rank that does not fit.
    """
    root = Path(folder)
    config = _read_config(root / CONFIG_NAME)
    weights = root / WEIGHTS_NAME
    if weights.exists():
        tensor_file = read_safetensors(weights)
    elif (root / PICKLE_WEIGHTS_NAME).exists():
        weights = root / PICKLE_WEIGHTS_NAME
        tensor_file = read_pickle(weights, allow_pickle=allow_pickle)
    else:
        raise CorruptFileError(f"PEFT folder without {WEIGHTS_NAME}", path=root)
    tensors = tensor_file.tensors
    pairs, rest = split_pairs(tensors, [PEFT_STYLE], path=weights)
    for key in rest:
        reason = next((why for part, why in _UNSUPPORTED_KEYS.items() if part in key), None)
        raise UnknownLayoutError(
            reason or "not a LoRA tensor (full weights such as modules_to_save are not supported)",
            path=weights,
            key=key,
        )
    if not pairs:
        raise UnknownLayoutError("PEFT adapter without LoRA tensors", path=weights)
    modules: dict[str, LoraModule] = {}
    for pair in pairs:
        name = pair.stem.removeprefix(PEFT_WRAPPER)
        r_config, scale = implied_rank_and_scale(config, name)
        r_file = int(tensors[pair.down_key].shape[0])
        if r_file != r_config:
            raise ShapeMismatchError(
                f"rank {r_file} in the file but {r_config} in {CONFIG_NAME} (r / rank_pattern)",
                path=weights,
                key=pair.down_key,
            )
        modules[name] = module_from_tensors(
            name,
            tensors[pair.down_key],
            tensors[pair.up_key],
            scale=scale,
            path=weights,
            key=pair.down_key,
            source_key=pair.stem,
        )
    return LoraAdapter(
        modules=modules,
        kind=kind_from_metadata(tensor_file.metadata),
        layout=AdapterLayout.PEFT,
        config=config,
        metadata=tensor_file.metadata,
        source=str(root),
    )


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


def _with_targets(config: dict[str, object], names: list[str]) -> dict[str, object]:
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


def _fresh_config(config: dict[str, object], ranks: Mapping[str, int]) -> dict[str, object]:
    r = Counter(ranks.values()).most_common(1)[0][0]
    patterns = _explicit_patterns(ranks, r)
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=r,
        use_rslora=False,
        use_dora=False,
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


def write_peft(
    adapter: LoraAdapter, folder: str | Path, *, fold_scale: bool | None = None
) -> list[Path]:
    """Write an adapter as a PEFT folder that ``PeftModel.from_pretrained`` loads.

    Args:
        adapter: the adapter (any layout; names relative to the model PEFT will wrap).
        folder: the output folder (created; files in it are replaced atomically).
        fold_scale: True folds every scale into B and rewrites the config's r / alpha; None (the
            default) does so only when the adapter's own PEFT config no longer implies its ranks
            and scales (see the module docstring); False is the same as None.

    Returns:
        [weights path, config path].

    Raises:
        ValueError: two modules that would share one key.
    """
    modules = list(adapter.modules.values())
    same_layout = adapter.layout is AdapterLayout.PEFT
    stems = dotted_stems(modules, default_add=PEFT_WRAPPER, use_source_keys=same_layout)
    require_unique(stems)
    names = [stem.removeprefix(PEFT_WRAPPER) for stem in stems]
    config = dict(adapter.config) if same_layout else {}
    keep = (
        bool(config)
        and not fold_scale
        and all(
            _same(implied_rank_and_scale(config, n), (m.rank, m.scale))
            for n, m in zip(names, modules, strict=True)
        )
    )
    if not keep:
        config = _fresh_config(config, {n: m.rank for n, m in zip(names, modules, strict=True)})
    config = _with_targets(config, names)
    tensors = {}
    for stem, module in zip(stems, modules, strict=True):
        down, up = tensors_of_module(module, None if keep else scaled_up(module))
        tensors[stem + PEFT_STYLE.down] = down
        tensors[stem + PEFT_STYLE.up] = up
    metadata = {"format": "pt", **metadata_for_write(adapter, keep=same_layout)}
    return write_folder_atomic(
        folder,
        {
            WEIGHTS_NAME: safetensors_writer(tensors, metadata),
            CONFIG_NAME: json_writer(config),
        },
    )


def _same(implied: tuple[int, float], actual: tuple[int, float]) -> bool:
    return implied[0] == actual[0] and math.isclose(implied[1], actual[1], rel_tol=1e-9)
