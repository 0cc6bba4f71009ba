"""Build a runnable base's models, run probe batches through them, apply an adapter in place.

Models are built with the libraries' own loaders (transformers ``AutoModel`` / diffusers
``UNet2DConditionModel``) from safetensors only, never with the folder's own code, in float32 on
the given device, in eval mode without gradients. Module names follow
:class:`core.weights.WeightSource` (a diffusers sub-folder is the first segment; a checkpoint's
``bert.`` / ``model.`` prefix is found either way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.adapter import LoraModule
from core.errors import InputError
from core.safetensors_header import read_header
from migrator.functional.layout import Component, NotRunnableError

__all__ = ["LoadedComponent", "applied", "captured", "load_component", "parameter_count", "pool"]


def parameter_count(folder: Path) -> int:
    """Entries of every tensor in the folder's safetensors files (headers only)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        for entry in read_header(file).tensors.values():
            n = 1
            for d in entry.shape:
                n *= d
            total += n
    return total


@dataclass
class LoadedComponent:
    """A built model of one component, with its tokenizer (text) and device."""

    spec: Component
    model: nn.Module
    tokenizer: Any | None
    device: torch.device

    def submodule(self, name: str) -> tuple[str, nn.Module]:
        """The model's submodule for a WeightSource module name (prefix already removed).

        Raises:
            InputError: no submodule of that name, with or without the model's base prefix.
        """
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        if prefix:
            candidates.append(f"{prefix}.{name}")
        for candidate in candidates:
            try:
                return candidate, self.model.get_submodule(candidate)
            except AttributeError:
                continue
        raise InputError(
            f"the built model has no module {name}", path=self.spec.model_dir, key=name
        )


def _load_text(spec: Component) -> tuple[nn.Module, Any | None]:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight on stderr otherwise
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report goes to stdout; missing keys are checked below
    try:
        model, info = AutoModel.from_pretrained(
            str(spec.model_dir),
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [
        k
        for k in info.get("missing_keys", [])
        if not k.endswith(("position_ids", "pooler.dense.weight", "pooler.dense.bias"))
    ]
    if missing:
        raise NotRunnableError(
            f"the weights do not fit config.json: {len(missing)} weights missing ({missing[0]}, ...)",
            path=spec.model_dir,
        )
    tokenizer = None
    if spec.tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(spec.tokenizer_dir), local_files_only=True)
    return model, tokenizer


def _load_unet(spec: Component) -> nn.Module:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(
        str(spec.model_dir), local_files_only=True, use_safetensors=True
    )
    config = model.config
    if getattr(config, "class_embed_type", None) is not None or getattr(
        config, "num_class_embeds", None
    ):
        raise NotRunnableError(
            "the UNet needs class labels (class_embed_type), which probes do not provide",
            path=spec.model_dir,
        )
    kind = getattr(config, "addition_embed_type", None)
    if kind not in (None, "text_time"):
        raise NotRunnableError(
            f"the UNet's addition_embed_type {kind!r} is not supported", path=spec.model_dir
        )
    return model


def load_component(
    spec: Component, *, device: str | torch.device, max_parameters: int
) -> LoadedComponent:
    """Build one component in float32 on ``device``, in eval mode, without gradients.

    Raises:
        NotRunnableError: above ``max_parameters``, or the library refuses the folder (the
            library's message is kept).
    """
    count = parameter_count(spec.model_dir)
    if count > max_parameters:
        raise NotRunnableError(
            f"{count / 1e9:.2f} B parameters, above functional_max_parameters "
            f"({max_parameters / 1e9:.2f} B)",
            path=spec.model_dir,
        )
    try:
        if spec.kind == "unet":
            model, tokenizer = _load_unet(spec), None
        else:
            model, tokenizer = _load_text(spec)
    except NotRunnableError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise NotRunnableError(f"cannot build the model ({exc})", path=spec.model_dir) from exc
    where = torch.device(device)
    model = model.to(device=where, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return LoadedComponent(spec, model, tokenizer, where)


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str = "mean") -> torch.Tensor:
    """One vector per probe from a layer's output, float64 on the CPU.

    (n, L, d) token states: ``mean`` over ``mask`` (all positions without one), ``cls`` (the
    first position) or ``max``; (n, C, H, W) feature maps: ``flatten`` keeps everything, any
    other pooling averages over H, W; (n, d) as is.
    """
    hidden = hidden.detach().to(device="cpu", dtype=torch.float64)
    if hidden.ndim == 4:
        return hidden.flatten(1) if how == "flatten" else hidden.mean(dim=(2, 3))
    if hidden.ndim == 2:
        return hidden
    if hidden.ndim != 3:
        return hidden.flatten(1)
    if how == "cls":
        return hidden[:, 0]
    if mask is None or mask.shape[:2] != hidden.shape[:2]:
        return hidden.max(1).values if how == "max" else hidden.mean(1)
    m = mask.to(device="cpu", dtype=torch.float64).unsqueeze(-1)
    if how == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(1).values
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@contextlib.contextmanager
def captured(
    component: LoadedComponent, layers: Sequence[str]
) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks keeping the raw output (its first tensor) of each named layer."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        _, module = component.submodule(layer)

        def hook(_m: nn.Module, _i: Any, out: Any, layer: str = layer) -> None:
            tensor = out[0] if isinstance(out, tuple | list) else out
            if hasattr(tensor, "sample"):
                tensor = tensor.sample
            outputs[layer] = tensor

        handles.append(module.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def applied(component: LoadedComponent, modules: Mapping[str, LoraModule]) -> Iterator[None]:
    """The component with each module's update dW = scale * up @ down added to its weight,
    restored exactly afterwards (names without the component prefix).

    Raises:
        InputError: a compact module (decode it first), a module the model lacks, or an update
            whose size differs from the weight's.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, module in modules.items():
                if module.is_compact:
                    raise InputError(
                        "compact LoRA-X module: decode it against its base first", key=name
                    )
                _, target = component.submodule(name)
                weight = getattr(target, "weight", None)
                delta = module.delta()
                if not isinstance(weight, torch.Tensor) or weight.numel() != delta.numel():
                    raise InputError(
                        f"update {tuple(delta.shape)} does not fit the weight of {name}",
                        path=component.spec.model_dir,
                        key=name,
                    )
                saved.append((weight, weight.detach().clone()))
                weight.add_(delta.reshape(weight.shape).to(weight.device, weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
