"""kohya files: underscored names resolved against a diffusers UNet (bare and in a pipeline),
1x1 convolutions, alpha, ss_* metadata, writing, and what diffusers' own loader makes of it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from core.adapter import AdapterLayout
from core.errors import (
    MissingModuleError,
    ShapeMismatchError,
    UnpairedTensorError,
)
from core.formats import MatchRule, UnmatchedReason, read_adapter, resolve_modules, write_adapter
from core.selection import ModuleSelector
from tests.core.lora_models import (
    KOHYA_BLOCK,
    KOHYA_METADATA,
    KOHYA_MODULES,
    KOHYA_TE_MODULE,
    make_kohya,
    shapes_of,
    tiny_bert,
    tiny_unet,
    unet_inputs,
    unet_output,
    weights_2d,
    with_deltas,
)

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return tiny_unet(0)


def _text_encoder_shapes() -> dict[str, tuple[int, int]]:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=100,
    )
    return shapes_of(CLIPTextModel(config))


def test_read_resolves_against_a_bare_unet(unet: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    deltas = make_kohya(path, unet)
    raw = read_adapter(path)
    assert raw.layout is AdapterLayout.KOHYA
    assert all(name.startswith("lora_unet_") for name in raw.modules)
    adapter, report = resolve_modules(raw, shapes_of(unet))
    assert set(adapter.modules) == set(KOHYA_MODULES)
    assert {m.rule for m in report.matched} == {MatchRule.KOHYA} and report.complete
    assert len(report.untouched) == len(shapes_of(unet)) - len(KOHYA_MODULES)
    attention = ModuleSelector().select(shapes_of(unet))
    _, targeted = resolve_modules(raw, shapes_of(unet), targeted=attention)
    assert set(targeted.untouched) == set(attention) - set(KOHYA_MODULES)
    assert len(targeted.untouched) == len(attention) - 3  # to_q, to_out.0, attn2.to_k
    assert targeted.as_dict()["matched"][0]["rule"] == "kohya"
    conv = adapter.modules[f"{KOHYA_BLOCK}.proj_in"]
    assert conv.weight_shape == (32, 32, 1, 1) and conv.down.shape == (4, 32)
    for name, delta in deltas.items():
        assert adapter.modules[name].scale == 0.5
        torch.testing.assert_close(adapter.modules[name].delta(), delta)
    assert dict(adapter.metadata)["ss_output_name"] == "style"


@pytest.mark.parametrize("te_prefix", ["lora_te_", "lora_te1_"])
def test_read_resolves_against_a_pipeline(unet: nn.Module, tmp_path: Path, te_prefix: str) -> None:
    path = tmp_path / "pipe.safetensors"
    make_kohya(path, unet, te_prefix=te_prefix)
    base = shapes_of(unet, "unet.") | {
        f"text_encoder.{n}": s for n, s in _text_encoder_shapes().items()
    }
    adapter = read_adapter(path, base_modules=base)
    assert set(adapter.modules) == {f"unet.{n}" for n in KOHYA_MODULES} | {
        f"text_encoder.{KOHYA_TE_MODULE}"
    }


def test_round_trip_keeps_keys_shapes_alpha_and_metadata(unet: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    make_kohya(path, unet)
    adapter = read_adapter(path, base_modules=shapes_of(unet))
    out = write_adapter(adapter, tmp_path / "out.safetensors")[0]
    before, after = load_file(path), load_file(out)
    assert set(after) == set(before)
    for key, tensor in before.items():
        assert after[key].shape == tensor.shape, key
        torch.testing.assert_close(after[key], tensor, rtol=0, atol=0)
    with safe_open(str(out), "pt") as fh:
        metadata = fh.metadata()
    assert {k: metadata[k] for k in KOHYA_METADATA} == KOHYA_METADATA


def test_renamed_module_gets_its_own_key(unet: nn.Module, tmp_path: Path) -> None:
    """A module moved to another base module (a rematch) must not keep its old key."""
    path = tmp_path / "style.safetensors"
    make_kohya(path, unet)
    adapter = read_adapter(path, base_modules=shapes_of(unet))
    old = f"{KOHYA_BLOCK}.transformer_blocks.0.attn1.to_q"
    new = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    modules = {
        (new if n == old else n): (dataclasses.replace(m, name=new) if n == old else m)
        for n, m in adapter.modules.items()
    }
    out = write_adapter(
        dataclasses.replace(adapter, modules=modules), tmp_path / "moved.safetensors"
    )[0]
    keys = set(load_file(out))
    assert (
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        in keys
    )
    assert not any(
        k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
        for k in keys
    )


def test_diffusers_loader_applies_what_we_write(unet: nn.Module, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "style.safetensors"
    make_kohya(path, unet)
    adapter = read_adapter(path, base_modules=shapes_of(unet))
    # a scale no alpha of the input gives: the writer must store alpha = scale * r. (One scale
    # for all: diffusers 0.42 drops per-module alphas of attention modules in kohya files.)
    modules = {n: dataclasses.replace(m, scale=0.3) for n, m in adapter.modules.items()}
    changed = dataclasses.replace(adapter, modules=modules)
    out = write_adapter(changed, tmp_path / "written.safetensors")[0]
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(out))
    loaded = tiny_unet(0)
    loaded.load_lora_adapter(state, network_alphas=alphas, prefix="unet")
    inputs = unet_inputs()
    expected = unet_output(with_deltas(unet, {n: m.delta() for n, m in modules.items()}), inputs)
    assert not torch.allclose(expected, unet_output(unet, inputs), atol=1e-4)
    torch.testing.assert_close(unet_output(loaded, inputs), expected, rtol=0, atol=1e-5)


def test_underscore_collision_is_ambiguous(tmp_path: Path) -> None:
    path = tmp_path / "amb.safetensors"
    save_file(
        {
            "lora_unet_a_b_c.lora_down.weight": torch.ones(2, 4),
            "lora_unet_a_b_c.lora_up.weight": torch.ones(4, 2),
        },
        str(path),
    )
    base = {"a_b.c": (4, 4), "a.b_c": (4, 4)}
    _, report = resolve_modules(read_adapter(path), base, strict=False)
    assert [u.reason for u in report.unmatched] == [UnmatchedReason.AMBIGUOUS]
    with pytest.raises(MissingModuleError, match="ambiguous"):
        read_adapter(path, base_modules=base)


def test_adapter_for_another_architecture(unet: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    make_kohya(path, unet)
    bert = shapes_of(tiny_bert(0))
    with pytest.raises(MissingModuleError) as err:
        read_adapter(path, base_modules=bert)
    assert "style.safetensors" in str(err.value) and "lora_unet_down_blocks_0" in str(err.value)
    adapter, report = resolve_modules(read_adapter(path), bert, strict=False)
    assert not adapter.modules and len(report.unmatched) == len(KOHYA_MODULES)
    assert {u.reason for u in report.unmatched} == {UnmatchedReason.NO_SUCH_MODULE}
    assert set(report.untouched) == set(bert)


def test_wrong_shape_for_the_base(unet: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    make_kohya(path, unet)
    base = shapes_of(unet)
    name = f"{KOHYA_BLOCK}.transformer_blocks.0.ff.net.0.proj"
    base[name] = (128, 32)
    with pytest.raises(ShapeMismatchError) as err:
        read_adapter(path, base_modules=base)
    message = str(err.value)
    assert "ff_net_0_proj" in message and "(128, 32)" in message and "(256, 32)" in message


def test_incomplete_loha_refused_by_key(tmp_path: Path) -> None:
    path = tmp_path / "loha.safetensors"
    save_file(
        {
            "lora_unet_x.lora_down.weight": torch.ones(2, 4),
            "lora_unet_x.lora_up.weight": torch.ones(4, 2),
            "lora_unet_y.hada_w1_a": torch.ones(4, 2),
        },
        str(path),
    )
    with pytest.raises(UnpairedTensorError, match="hada_w1_b") as err:
        read_adapter(path)
    assert "lora_unet_y.hada_w1_a" in str(err.value)


def test_alpha_without_module(tmp_path: Path) -> None:
    path = tmp_path / "alpha.safetensors"
    save_file(
        {
            "lora_unet_x.lora_down.weight": torch.ones(2, 4),
            "lora_unet_x.lora_up.weight": torch.ones(4, 2),
            "lora_unet_z.alpha": torch.tensor(1.0),
        },
        str(path),
    )
    with pytest.raises(UnpairedTensorError, match=r"lora_unet_z\.alpha"):
        read_adapter(path)


def test_weights_of_the_unet_match_the_resolved_shapes(unet: nn.Module) -> None:
    """Guard for the helpers: 1x1 convolutions appear in the 2-D view."""
    assert weights_2d(unet)[f"{KOHYA_BLOCK}.proj_in"].shape == (32, 32)


SD15_LOCON = {
    "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1",  # 3x3
    "lora_unet_down_blocks_0_downsamplers_0_conv": "down_blocks.0.downsamplers.0.conv",  # 3x3
    "lora_unet_up_blocks_1_resnets_0_conv_shortcut": "up_blocks.1.resnets.0.conv_shortcut",
    f"lora_unet_{KOHYA_BLOCK.replace('.', '_')}_proj_in": f"{KOHYA_BLOCK}.proj_in",  # 1x1
    f"lora_unet_{KOHYA_BLOCK.replace('.', '_')}_transformer_blocks_0_ff_net_0_proj": (
        f"{KOHYA_BLOCK}.transformer_blocks.0.ff.net.0.proj"  # GEGLU, 2x width
    ),
    f"lora_unet_{KOHYA_BLOCK.replace('.', '_')}_transformer_blocks_0_ff_net_2": (
        f"{KOHYA_BLOCK}.transformer_blocks.0.ff.net.2"
    ),
}


def test_sd15_locon_carried_to_a_successor_and_loaded_by_diffusers(
    unet: nn.Module, tmp_path: Path
) -> None:
    """LoCon on 3x3 convolutions (lora_down [r, C, 3, 3], lora_up [C', r, 1, 1]), a 1x1 conv
    and the feed-forward: resolved, carried to a successor with cosine > 0.9 per module,
    written back under the same keys, and applied by diffusers as by hand."""
    from diffusers import StableDiffusionPipeline

    from core.factorize import FactorStore
    from core.transfer import transfer_adapter
    from core.weights import WeightSource
    from tests.core.lora_models import perturbed, save_weights
    from tests.core.sdxl_adapters import in_subspace_pair

    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for stem, name in SD15_LOCON.items():
        weight = unet.get_submodule(name).weight.detach()
        down, up = in_subspace_pair(weight, 4, g)
        if weight.ndim == 4:
            down, up = down.reshape(4, *weight.shape[1:]), up.reshape(-1, 4, 1, 1)
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        tensors[f"{stem}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "locon.safetensors"
    save_file(tensors, str(path))
    successor = perturbed(unet, eps=0.02, seed=3)
    source = WeightSource.open(save_weights(unet, tmp_path / "s" / "unet.safetensors"))
    target = WeightSource.open(save_weights(successor, tmp_path / "t" / "unet.safetensors"))
    adapter = read_adapter(path, base_modules={i.name: i.shape for i in source.modules()})
    assert adapter.modules["down_blocks.0.resnets.0.conv1"].weight_shape == (32, 32, 3, 3)
    result = transfer_adapter(adapter, FactorStore(source), FactorStore(target))
    assert result.modules_transferred == len(SD15_LOCON) and not result.left_out
    for name, module in adapter.modules.items():
        before, after = module.delta().flatten(), result.adapter.modules[name].delta().flatten()
        assert float(before @ after / (before.norm() * after.norm())) > 0.9, name
    out = write_adapter(result.adapter, tmp_path / "carried.safetensors")[0]
    written = load_file(out)
    assert set(written) == set(tensors)
    assert written["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (
        4,
        32,
        3,
        3,
    )
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(out))
    loaded = perturbed(unet, eps=0.02, seed=3)
    loaded.load_lora_adapter(state, network_alphas=alphas, prefix="unet")
    inputs = unet_inputs()
    deltas = {n: m.delta() for n, m in result.adapter.modules.items()}
    expected = unet_output(with_deltas(successor, deltas), inputs)
    assert not torch.allclose(expected, unet_output(successor, inputs), atol=1e-4)
    torch.testing.assert_close(unet_output(loaded, inputs), expected, rtol=1e-4, atol=1e-5)
