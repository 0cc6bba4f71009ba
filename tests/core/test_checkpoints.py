"""Single-file SD checkpoints in LDM/SGM naming read in the diffusers naming: the block
arithmetic against diffusers' own converters, the same modules from both layouts, fused OpenCLIP
q/k/v as row blocks, and the architecture found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.checkpoints import (
    Architecture,
    UnetBlocks,
    architecture_of_adapter,
    diffusers_unet_name,
    ldm_unet_name,
    map_checkpoint,
)
from core.digest import tensor_digest
from core.weights import WeightSource
from tests.fixtures.sdxl import TinySdxl, sgm_state_dict

pytestmark = pytest.mark.interop

SDXL = UnetBlocks(2, (True, True, False))  # real SDXL: up blocks 0 and 1 have attention
SD15 = UnetBlocks(2, (False, True, True, True))  # real SD 1.5: four blocks, up block 0 plain

SDXL_CASES = [
    ("input_blocks.0.0", "conv_in"),
    ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks.2.0.emb_layers.1", "down_blocks.0.resnets.1.time_emb_proj"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    (
        "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
    ),
    ("middle_block.0.out_layers.3", "mid_block.resnets.0.conv2"),
    ("middle_block.1.proj_in", "mid_block.attentions.0.proj_in"),
    ("middle_block.2.in_layers.0", "mid_block.resnets.1.norm1"),
    ("output_blocks.0.1.proj_out", "up_blocks.0.attentions.0.proj_out"),
    ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    (
        "output_blocks.5.1.transformer_blocks.1.attn2.to_k",
        "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_k",
    ),
    ("output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("out.2", "conv_out"),
]


@pytest.mark.parametrize(("ldm", "diffusers"), SDXL_CASES)
def test_sdxl_block_arithmetic_both_ways(ldm: str, diffusers: str) -> None:
    assert diffusers_unet_name(ldm, SDXL) == diffusers
    assert ldm_unet_name(diffusers, SDXL) == ldm


def test_sd15_upsampler_without_attention_sits_at_index_one() -> None:
    # SD 1.5's first up block has no transformer: its upsampler is output_blocks.2.1.conv
    assert diffusers_unet_name("output_blocks.2.1.conv", SD15) == "up_blocks.0.upsamplers.0.conv"
    assert ldm_unet_name("up_blocks.0.upsamplers.0.conv", SD15) == "output_blocks.2.1.conv"
    assert ldm_unet_name("up_blocks.1.upsamplers.0.conv", SD15) == "output_blocks.5.2.conv"
    assert (
        diffusers_unet_name("input_blocks.11.0.out_layers.3", SD15)
        == "down_blocks.3.resnets.1.conv2"
    )


def test_blocks_are_found_from_either_naming(tiny_sdxl: TinySdxl) -> None:
    unet = tiny_sdxl.components["unet"]
    diffusers_names = [k.rpartition(".")[0] for k in unet.state_dict()]
    from_diffusers = UnetBlocks.from_diffusers_names(diffusers_names)
    ldm_names = [
        k.removeprefix("model.diffusion_model.").rpartition(".")[0]
        for k in sgm_state_dict({"unet": unet})
    ]
    from_ldm = UnetBlocks.from_ldm_names(ldm_names)
    assert from_diffusers == from_ldm == UnetBlocks(2, (True, True, False))
    assert UnetBlocks.from_dict(from_ldm.as_dict()) == from_ldm
    assert UnetBlocks.from_diffusers_names(["encoder.layer.0.query"]) is None


def test_our_sgm_file_is_what_diffusers_converters_read(tiny_sdxl: TinySdxl) -> None:
    """The inverse map (used to write the fixture) against diffusers' single-file converters:
    together they prove the forward map's arithmetic is diffusers' arithmetic."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    components = tiny_sdxl.components
    sgm = sgm_state_dict(components)
    assert any(k.endswith("attn.in_proj_weight") for k in sgm)
    te1_keys = {k: v for k, v in sgm.items() if k.startswith("conditioner.embedders.0.")}
    converted = {
        "unet": convert_ldm_unet_checkpoint(sgm, dict(components["unet"].config)),
        "vae": convert_ldm_vae_checkpoint(sgm, dict(components["vae"].config)),
        "text_encoder": convert_ldm_clip_checkpoint(te1_keys),
        "text_encoder_2": convert_open_clip_checkpoint(
            components["text_encoder_2"], sgm, prefix="conditioner.embedders.1.model."
        ),
    }
    for name, state in converted.items():
        original = {
            k: v for k, v in components[name].state_dict().items() if not k.endswith("position_ids")
        }
        assert set(state) == set(original), name
        for key, tensor in original.items():
            assert torch.equal(state[key].reshape(tensor.shape), tensor), f"{name}.{key}"


def test_diffusers_folder_and_single_file_give_the_same_modules(tiny_sdxl: TinySdxl) -> None:
    folder = WeightSource.open(tiny_sdxl.folder)
    single = WeightSource.open(tiny_sdxl.single_file)
    assert (folder.naming, single.naming) == ("native", "ldm")
    assert folder.architecture is single.architecture is Architecture.SDXL
    assert folder.unet_blocks == single.unet_blocks == UnetBlocks(2, (True, True, False))
    assert len(folder) > 200 and set(single.names) == set(folder.names)
    assert set(single.skipped()) == set(folder.skipped())  # norms, on both sides
    assert all("1-D" in why for why in single.skipped().values())
    for name in folder.names:
        a, b = folder.info(name), single.info(name)
        assert a.shape == b.shape, name
        assert torch.equal(folder.matrix(name), single.matrix(name)), name
    # a 3x3 convolution is a matrix; fused q/k/v are row blocks with their own content digest
    conv = single.info("unet.down_blocks.0.resnets.0.conv1")
    assert conv.shape == (16, 16 * 9) and conv.stored_shape == (16, 16, 3, 3)
    q = single.info("text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj")
    v = single.info("text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj")
    assert (
        q.key
        == v.key
        == "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    )
    assert (q.rows, v.rows) == ((0, 16), (32, 48))
    for name in (q.name, v.name, "text_encoder_2.text_projection"):
        assert (
            single.digest(name) == folder.digest(name) == tensor_digest(single.stored_tensor(name))
        )
    assert single.digest(q.name) != single.digest(v.name)
    proj = single.info("text_encoder_2.text_projection")
    assert proj.transposed and proj.shape == (16, 16)


def test_unmapped_keys_are_named_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": torch.randn(8, 8, 3, 3),
            "model.diffusion_model.mystery.weight": torch.randn(4, 4),
            "model_ema.decay": torch.tensor(0.9999),
            "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight": torch.randn(
                4, 4
            ),
        },
        str(path),
    )
    source = WeightSource.open(path)
    assert "unet.conv_in" in source and "unet.down_blocks.0.resnets.0.conv1" in source
    # an SD 1.x checkpoint from before transformers 4 lacks the text_model level
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in source
    assert "no diffusers name" in source.skipped()["model.diffusion_model.mystery"]


def test_openclip_fused_block_must_split_in_three() -> None:
    mapped = map_checkpoint(
        {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (10, 4)}
    )
    assert not mapped.params
    assert "three equal blocks" in next(iter(mapped.unmapped.values()))


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"ss_base_model_version": "sdxl_base_v1-0"}, Architecture.SDXL),
        ({"ss_base_model_version": "sd_v1"}, Architecture.SD1),
        ({"ss_base_model_version": "sd_v2_768_v"}, Architecture.SD2),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, Architecture.SDXL),
        ({"modelspec.architecture": "stable-diffusion-v2-512/lora"}, Architecture.SD2),
        ({"modelspec.architecture": "flux-1-dev/lora"}, None),
        ({}, None),
    ],
)
def test_adapter_architecture_from_metadata(metadata: dict[str, str], expected: object) -> None:
    assert architecture_of_adapter(metadata) is expected


def test_sd1_and_sd2_single_files_are_told_apart(tmp_path: Path) -> None:
    sd1 = tmp_path / "sd1.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.randn(8, 8, 1, 1),
            "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(
                8, 4
            ),
        },
        str(sd1),
    )
    sd2 = tmp_path / "sd2.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.randn(8, 8),
            "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(8, 4),
        },
        str(sd2),
    )
    assert WeightSource.open(sd1).architecture is Architecture.SD1
    two = WeightSource.open(sd2)
    assert two.architecture is Architecture.SD2
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1" in two
