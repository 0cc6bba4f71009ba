"""Tiny real models (transformers BERT, diffusers UNet) and their LoRA files for the format tests.

Everything is built from configs (no download). PEFT initialises lora_B to zero, so the helpers
randomise it: an adapter whose update is zero would make every comparison trivially true.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

BERT_KW = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=100,
)
UNET_KW = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_bert(seed: int = 0) -> nn.Module:
    """A 2-layer BertModel, hidden 64, in eval mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(**BERT_KW)).eval()


def tiny_unet(seed: int = 0) -> nn.Module:
    """A small UNet2DConditionModel (SD-style blocks, 1x1 conv proj_in/proj_out), eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_KW).eval()


def perturbed(model: nn.Module, eps: float = 0.05, seed: int = 1) -> nn.Module:
    """A copy of ``model`` whose weights moved by ``eps`` relative Gaussian noise (a successor)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * eps * p.std().nan_to_num(0.0))
    return other


def save_weights(model: nn.Module, path: Path) -> Path:
    """The model's state dict as one safetensors file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def randomise_lora_b(model: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give every lora_B a non-zero value (PEFT starts them at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def weights_2d(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> weight viewed as (m, n), for 2-D weights and 1x1 convolutions."""
    out = {}
    for key, value in model.state_dict().items():
        if not key.endswith(".weight"):
            continue
        if value.ndim == 2 or (value.ndim == 4 and value.shape[2:] == (1, 1)):
            out[key.removesuffix(".weight")] = value.reshape(value.shape[0], -1)
    return out


def shapes_of(model: nn.Module, prefix: str = "") -> dict[str, tuple[int, int]]:
    """base_modules for :func:`core.formats.resolve_modules`: name -> (m, n)."""
    return {prefix + n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights_2d(model).items()}


def with_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with W + dW set by hand (dW (m, n), reshaped to the stored shape)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = other.get_submodule(name).weight
            weight.add_(delta.reshape(weight.shape).to(weight.dtype))
    return other


def bert_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=g)}


def bert_output(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def unet_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
    }


def unet_output(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def peft_adapter(
    model: nn.Module,
    folder: Path,
    *,
    targets: Iterable[str],
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    **config: object,
) -> nn.Module:
    """Wrap a copy of ``model`` with a PEFT LoRA, randomise lora_B, save it to ``folder``.

    Returns:
        The PEFT model (its merged weights are the reference dW).
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **config)  # type: ignore[arg-type]
    wrapped = get_peft_model(copy.deepcopy(model), lora)
    randomise_lora_b(wrapped, seed=seed)
    wrapped.save_pretrained(str(folder))
    return wrapped


def merged_deltas(peft_model: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's own dW per adapted module: merged weight minus base weight, (m, n)."""
    merged = weights_2d(copy.deepcopy(peft_model).merge_and_unload())
    original = weights_2d(base)
    return {
        name: merged[name] - original[name]
        for name in merged
        if not torch.equal(merged[name], original[name])
    }


KOHYA_BLOCK = "down_blocks.0.attentions.0"
KOHYA_MODULES = [
    f"{KOHYA_BLOCK}.proj_in",  # 1x1 convolution
    f"{KOHYA_BLOCK}.transformer_blocks.0.attn1.to_q",
    f"{KOHYA_BLOCK}.transformer_blocks.0.attn1.to_out.0",
    f"{KOHYA_BLOCK}.transformer_blocks.0.attn2.to_k",  # 32 x 32 (cross-attention dim)
    f"{KOHYA_BLOCK}.transformer_blocks.0.ff.net.0.proj",
]
KOHYA_TE_MODULE = "text_model.encoder.layers.0.self_attn.q_proj"
KOHYA_METADATA = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_output_name": "style"}


def make_kohya(
    path: Path, unet: nn.Module, *, te_prefix: str | None = None, r: int = 4
) -> dict[str, torch.Tensor]:
    """A kohya file on KOHYA_MODULES (alpha 2, so scale 0.5), plus one text-encoder module.

    Returns:
        Bare module name (``te:`` + name for the text encoder) -> expected dW (m, n).
    """
    g = torch.Generator().manual_seed(0)
    stored = unet.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    entries = [(n, "lora_unet_", tuple(stored[n + ".weight"].shape)) for n in KOHYA_MODULES]
    if te_prefix is not None:
        entries.append((KOHYA_TE_MODULE, te_prefix, (32, 32)))
    for name, prefix, shape in entries:
        m, n = shape[0], shape[1]
        down, up = torch.randn(r, n, generator=g) * 0.1, torch.randn(m, r, generator=g) * 0.1
        stem = prefix + name.replace(".", "_")
        conv = len(shape) == 4
        tensors[stem + ".lora_down.weight"] = down.reshape(r, n, 1, 1) if conv else down
        tensors[stem + ".lora_up.weight"] = up.reshape(m, r, 1, 1) if conv else up
        tensors[stem + ".alpha"] = torch.tensor(2.0)
        deltas[("te:" if prefix != "lora_unet_" else "") + name] = (2.0 / r) * up @ down
    save_file(tensors, str(path), metadata=KOHYA_METADATA)
    return deltas
