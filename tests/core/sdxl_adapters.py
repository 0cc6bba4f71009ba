"""kohya SDXL adapter files on the tiny SDXL-shaped pipeline (``tests.fixtures.sdxl``), written
with literal SGM key names (not derived by the code under test), and the by-hand checks.

Each module's update lies in its base weight's singular subspaces (B = U_p C, A = D V_p^T with
p = min(m, n)), as the LoRA-X paper assumes of a transferable adapter: a random update outside
the column space of a tall weight would be cut by any projection onto a successor, which is the
method's property and not what these tests are about.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# (kohya key stem, canonical module name): UNet in SGM names (layers_per_block 2), te1, te2.
SDXL_KOHYA_MODULES: tuple[tuple[str, str], ...] = (
    (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    (
        "lora_unet_input_blocks_8_1_transformer_blocks_1_ff_net_0_proj",  # GEGLU: 2x width
        "unet.down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj",
    ),
    (
        "lora_unet_input_blocks_7_1_transformer_blocks_0_ff_net_2",
        "unet.down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2",
    ),
    ("lora_unet_middle_block_1_proj_in", "unet.mid_block.attentions.0.proj_in"),
    (
        "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_k",
        "unet.up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_k",
    ),
    ("lora_unet_output_blocks_5_1_proj_out", "unet.up_blocks.1.attentions.2.proj_out"),
    ("lora_unet_output_blocks_2_2_conv", "unet.up_blocks.0.upsamplers.0.conv"),  # 3x3 LoCon
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet.down_blocks.0.resnets.0.conv1"),  # 3x3
    ("lora_unet_input_blocks_4_0_emb_layers_1", "unet.down_blocks.1.resnets.0.time_emb_proj"),
    (
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    ),
    (
        "lora_te1_text_model_encoder_layers_0_self_attn_out_proj",
        "text_encoder.text_model.encoder.layers.0.self_attn.out_proj",
    ),
    (
        "lora_te1_text_model_encoder_layers_1_mlp_fc1",
        "text_encoder.text_model.encoder.layers.1.mlp.fc1",
    ),
    (
        "lora_te2_text_model_encoder_layers_1_self_attn_v_proj",
        "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj",
    ),
    (
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj",
        "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj",
    ),
    (
        "lora_te2_text_model_encoder_layers_0_mlp_fc2",
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc2",
    ),
)
SDXL_KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_output_name": "sdxl-style",
    "sshs_model_hash": "0" * 64,
}
RANK, ALPHA = 4, 2.0


def module_weight(components: Mapping[str, nn.Module], name: str) -> torch.Tensor:
    """The stored weight of a canonical module name (``unet.x`` -> components['unet'].x)."""
    component, _, rest = name.partition(".")
    return components[component].get_submodule(rest).weight.detach()


def in_subspace_pair(
    weight: torch.Tensor, r: int, g: torch.Generator, std: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (r, in*k*k), up (out, r)) whose product lies in ``weight``'s singular subspaces,
    with ||up @ down|| about ``std`` of ||weight||."""
    matrix = weight.reshape(weight.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    p = s.shape[0]
    up = u @ torch.randn(p, r, generator=g, dtype=torch.float64)
    down = torch.randn(r, p, generator=g, dtype=torch.float64) @ vh
    product = up @ down
    factor = (std * matrix.norm() / product.norm()).sqrt()
    return (down * factor).float(), (up * factor).float()


def make_kohya_sdxl(
    path: Path,
    components: Mapping[str, nn.Module],
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A kohya SDXL LoRA (SGM names, te1, te2, ff, proj and 3x3 conv modules) on the tiny base.

    Returns:
        canonical module name -> dW as a (m, n) float32 matrix (alpha / r applied).
    """
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for stem, name in SDXL_KOHYA_MODULES:
        weight = module_weight(components, name)
        down, up = in_subspace_pair(weight, RANK, g)
        if weight.ndim == 4:
            tensors[stem + ".lora_down.weight"] = down.reshape(RANK, *weight.shape[1:]).to(dtype)
            tensors[stem + ".lora_up.weight"] = up.reshape(-1, RANK, 1, 1).to(dtype)
        else:
            tensors[stem + ".lora_down.weight"] = down.to(dtype)
            tensors[stem + ".lora_up.weight"] = up.to(dtype)
        tensors[stem + ".alpha"] = torch.tensor(ALPHA, dtype=dtype)
        stored_down = tensors[stem + ".lora_down.weight"].float().reshape(RANK, -1)
        stored_up = tensors[stem + ".lora_up.weight"].float().reshape(-1, RANK)
        deltas[name] = (ALPHA / RANK) * stored_up @ stored_down
    save_file(tensors, str(path), metadata=SDXL_KOHYA_METADATA)
    return deltas


def with_component_deltas(
    components: Mapping[str, nn.Module], deltas: Mapping[str, torch.Tensor]
) -> dict[str, nn.Module]:
    """Copies of the components with W + dW set by hand."""
    out = {name: copy.deepcopy(model) for name, model in components.items()}
    with torch.no_grad():
        for name, delta in deltas.items():
            component, _, rest = name.partition(".")
            weight = out[component].get_submodule(rest).weight
            weight.add_(delta.reshape(weight.shape).to(weight.dtype))
    return out


def pipeline(components: Mapping[str, nn.Module]):  # type: ignore[no-untyped-def]
    """A StableDiffusionXLPipeline around copies of the components (no tokenizers: the tests
    call the models directly)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    parts = {name: copy.deepcopy(model) for name, model in components.items()}
    return StableDiffusionXLPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        tokenizer=None,
        tokenizer_2=None,
        unet=parts["unet"],
        scheduler=EulerDiscreteScheduler(),
    )


def outputs(unet: nn.Module, te1: nn.Module, te2: nn.Module) -> dict[str, torch.Tensor]:
    """Seeded forward passes of the three adapted models."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 100, (1, 7), generator=g)
    with torch.no_grad():
        sample = unet(
            torch.randn(1, 4, 8, 8, generator=g),
            torch.tensor([10]),
            encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
            added_cond_kwargs={
                "text_embeds": torch.randn(1, 16, generator=g),
                "time_ids": torch.randn(1, 6, generator=g),
            },
        ).sample
        return {
            "unet": sample,
            "text_encoder": te1(input_ids=ids).last_hidden_state,
            "text_encoder_2": te2(input_ids=ids).last_hidden_state,
        }
