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

DoRA (``use_dora: true``): every module also has ``<stem>.lora_magnitude_vector``, shape
(out_features,) ((1, out, 1, 1) for a convolution), read into :attr:`LoraModule.magnitude` and
written back with ``use_dora`` set (PEFT's magnitude scales output rows: an input-channel
magnitude from a LyCORIS file is refused on write). Tensors are written in the adapter's
:attr:`LoraAdapter.dtype` (the dtype they were read in).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from core.adapter import AdapterLayout, LoraAdapter, LoraModule
from core.errors import (
    CorruptFileError,
    ShapeMismatchError,
    UnknownLayoutError,
    UnpairedTensorError,
)
from core.formats.naming import PEFT_WRAPPER, dotted_stems, require_unique
from core.formats.pairing import (
    PairStyle,
    kind_from_metadata,
    magnitude_tensor,
    metadata_for_write,
    module_from_tensors,
    scaled_up,
    split_pairs,
    storage_dtype,
    tensors_of_module,
)
from core.formats.peft_config import (
    fresh_config,
    implied_rank_and_scale,
    pattern_value,
    same_rank_and_scale,
    with_targets,
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
# Initialisations whose adapters are relative to a modified base weight: their dW is not B @ A.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_MAGNITUDE = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
_UNSUPPORTED_KEYS = {
    "lora_embedding_": "embedding LoRAs are not supported",
    ".lora_A.bias": "LoRA biases are not supported",
    ".lora_B.bias": "LoRA biases are not supported",
}


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
    magnitudes = _magnitudes(rest, {p.stem for p in pairs}, tensors, weights)
    if not pairs:
        raise UnknownLayoutError("PEFT adapter without LoRA tensors", path=weights)
    dora = bool(config.get("use_dora"))
    if magnitudes and not dora:
        raise UnknownLayoutError(
            f"DoRA magnitudes in the weights but use_dora is not set in {CONFIG_NAME}",
            path=weights,
            key=next(iter(magnitudes.values()))[1],
        )
    modules: dict[str, LoraModule] = {}
    for pair in pairs:
        if dora and pair.stem not in magnitudes:
            raise UnknownLayoutError(
                "use_dora is set but this module has no lora_magnitude_vector",
                path=weights,
                key=pair.down_key,
            )
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
            magnitude=(magnitudes[pair.stem][0], "peft") if pair.stem in magnitudes else None,
        )
    return LoraAdapter(
        modules=modules,
        kind=kind_from_metadata(tensor_file.metadata),
        layout=AdapterLayout.PEFT,
        config=config,
        metadata=tensor_file.metadata,
        source=str(root),
        dtype=storage_dtype(t for p in pairs for t in (tensors[p.down_key], tensors[p.up_key])),
    )


def _magnitudes(
    rest: list[str], stems: set[str], tensors: Mapping[str, torch.Tensor], path: Path
) -> dict[str, tuple[torch.Tensor, str]]:
    """stem -> (DoRA magnitude tensor, its key) from the keys that are not LoRA halves.

    Raises:
        UnknownLayoutError: a key that is neither a magnitude nor supported (names it).
        UnpairedTensorError: a magnitude of a module without LoRA tensors.
    """
    found: dict[str, tuple[torch.Tensor, str]] = {}
    for key in rest:
        suffix = next((s for s in _MAGNITUDE if key.endswith(s)), None)
        if suffix is None:
            reason = next((why for part, why in _UNSUPPORTED_KEYS.items() if part in key), None)
            raise UnknownLayoutError(
                reason
                or "not a LoRA tensor (full weights such as modules_to_save are not supported)",
                path=path,
                key=key,
            )
        stem = key[: -len(suffix)]
        if stem not in stems:
            raise UnpairedTensorError(
                "DoRA magnitude of a module with no LoRA tensors", path=path, key=key
            )
        found[stem] = (tensors[key], key)
    return found


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
        ValueError: two modules that would share one key; a DoRA adapter with a module without
            magnitude, or with input-channel magnitudes (which PEFT's DoRA has no form for).
    """
    modules = list(adapter.modules.values())
    dora = _dora_modules(modules)
    same_layout = adapter.layout is AdapterLayout.PEFT
    stems = dotted_stems(modules, default_add=PEFT_WRAPPER, use_source_keys=same_layout)
    require_unique(stems)
    names = [stem.removeprefix(PEFT_WRAPPER) for stem in stems]
    config = dict(adapter.config) if same_layout else {}
    keep = (
        bool(config)
        and not fold_scale
        and bool(config.get("use_dora")) == dora
        and all(
            same_rank_and_scale(implied_rank_and_scale(config, n), (m.rank, m.scale))
            for n, m in zip(names, modules, strict=True)
        )
    )
    if not keep:
        ranks = {n: m.rank for n, m in zip(names, modules, strict=True)}
        config = fresh_config(config, ranks, dora=dora)
    config = with_targets(config, names)
    tensors = {}
    for stem, module in zip(stems, modules, strict=True):
        down, up = tensors_of_module(
            module, None if keep else scaled_up(module), dtype=adapter.dtype
        )
        tensors[stem + PEFT_STYLE.down] = down
        tensors[stem + PEFT_STYLE.up] = up
        if dora:
            tensors[stem + _MAGNITUDE[0]] = magnitude_tensor(
                module, style="peft", dtype=adapter.dtype
            )
    metadata = {"format": "pt", **metadata_for_write(adapter, keep=same_layout)}
    return write_folder_atomic(
        folder,
        {
            WEIGHTS_NAME: safetensors_writer(tensors, metadata),
            CONFIG_NAME: json_writer(config),
        },
    )


def _dora_modules(modules: list[LoraModule]) -> bool:
    """True when the modules are DoRA modules (all of them: PEFT's use_dora is adapter-wide).

    Raises:
        ValueError: some modules have a magnitude and others not.
    """
    without = [m.name for m in modules if not m.is_dora]
    if len(without) in (0, len(modules)):
        return not without
    raise ValueError(
        f"a PEFT DoRA adapter needs a magnitude on every module; {len(without)} have none "
        f"(first: {without[0]})"
    )
