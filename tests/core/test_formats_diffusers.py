"""diffusers LoRA files: written by diffusers itself (model and pipeline level), read, written
back and loaded by diffusers; older key styles; conversion to PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from core.adapter import AdapterLayout
from core.formats import read_adapter, write_adapter
from tests.core.lora_models import (
    UNET_TARGETS,
    randomise_lora_b,
    shapes_of,
    tiny_unet,
    unet_inputs,
    unet_output,
    with_deltas,
)

pytestmark = pytest.mark.interop

RANK8 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return tiny_unet(0)


@pytest.fixture(scope="module")
def adapted(unet: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The UNet with a diffusers-added PEFT LoRA (alpha 2, r 4; one module r 8), and the dW PEFT
    computes for each adapted module (m, n)."""
    import copy

    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    model = copy.deepcopy(unet)
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=2, target_modules=UNET_TARGETS, rank_pattern={f"^{RANK8}": 8})
    )
    randomise_lora_b(model)
    with torch.no_grad():
        deltas = {
            name: layer.get_delta_weight("default").flatten(1)
            for name, layer in model.named_modules()
            if isinstance(layer, LoraLayer)
        }
    return model, deltas


def _check(adapter, deltas: dict[str, torch.Tensor], prefix: str = "") -> None:
    assert set(adapter.modules) == {prefix + n for n in deltas}
    for name, delta in deltas.items():
        assert float(delta.abs().max()) > 1e-3
        torch.testing.assert_close(adapter.modules[prefix + name].delta(), delta, rtol=0, atol=1e-6)


def test_model_level_file_takes_scale_from_its_metadata(adapted, tmp_path: Path) -> None:
    model, deltas = adapted
    model.save_lora_adapter(str(tmp_path))
    adapter = read_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    assert adapter.layout is AdapterLayout.DIFFUSERS
    assert adapter.modules[RANK8].rank == 8 and adapter.modules[RANK8].scale == 0.25
    assert {m.scale for n, m in adapter.modules.items() if n != RANK8} == {0.5}
    _check(adapter, deltas)


def test_pipeline_file_with_prefixed_keys_and_metadata(
    adapted, unet: nn.Module, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    model, deltas = adapted
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=get_peft_model_state_dict(model),
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    _check(read_adapter(path), deltas, prefix="unet.")
    _check(read_adapter(path, base_modules=shapes_of(unet)), deltas)  # suffix rule: unet. dropped


def test_written_file_loads_in_diffusers(adapted, unet: nn.Module, tmp_path: Path) -> None:
    model, deltas = adapted
    model.save_lora_adapter(str(tmp_path / "in"))
    adapter = read_adapter(tmp_path / "in")  # a folder holding one adapter file
    out = write_adapter(adapter, tmp_path / "out.safetensors")[0]
    assert set(load_file(out)) == set(
        load_file(tmp_path / "in" / "pytorch_lora_weights.safetensors")
    )
    with safe_open(str(out), "pt") as fh:
        config = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    again = read_adapter(out)
    assert {m.scale for m in again.modules.values()} == {1.0}  # folded into up
    _check(again, deltas)
    loaded = tiny_unet(0)
    loaded.load_lora_adapter(str(out), prefix=None)
    inputs = unet_inputs()
    expected = unet_output(with_deltas(unet, deltas), inputs)
    assert not torch.allclose(expected, unet_output(unet, inputs), atol=1e-4)
    torch.testing.assert_close(unet_output(loaded, inputs), expected, rtol=0, atol=1e-5)


def test_older_key_styles_and_alpha(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {
        f"{block}.processor.to_q_lora.down.weight": torch.randn(2, 32, generator=g),
        f"{block}.processor.to_q_lora.up.weight": torch.randn(32, 2, generator=g),
        f"{block}.processor.to_out_lora.down.weight": torch.randn(2, 32, generator=g),
        f"{block}.processor.to_out_lora.up.weight": torch.randn(32, 2, generator=g),
        "unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.randn(
            2, 32, 1, 1, generator=g
        ),
        "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": torch.randn(
            32, 2, 1, 1, generator=g
        ),
        "unet.down_blocks.0.attentions.0.proj_in.alpha": torch.tensor(1.0),
    }
    save_file(tensors, str(tmp_path / "old.safetensors"))
    adapter = read_adapter(tmp_path / "old.safetensors")
    assert set(adapter.modules) == {
        f"{block}.to_q",
        f"{block}.to_out.0",
        "unet.down_blocks.0.attentions.0.proj_in",
    }
    conv = adapter.modules["unet.down_blocks.0.attentions.0.proj_in"]
    assert conv.scale == 0.5 and conv.weight_shape == (32, 32, 1, 1)
    assert adapter.modules[f"{block}.to_q"].scale == 1.0
    out = write_adapter(adapter, tmp_path / "new.safetensors")[0]
    written = load_file(out)
    assert f"{block}.to_out.0.lora.down.weight" in written
    assert written["unet.down_blocks.0.attentions.0.proj_in.lora.up.weight"].shape == (32, 2, 1, 1)
    again = read_adapter(out)
    for name, module in adapter.modules.items():
        torch.testing.assert_close(again.modules[name].delta(), module.delta(), rtol=0, atol=1e-6)


def test_conversion_to_peft_loads_in_peft(adapted, unet: nn.Module, tmp_path: Path) -> None:
    from peft import PeftModel

    model, deltas = adapted
    model.save_lora_adapter(str(tmp_path / "in"))
    adapter = read_adapter(tmp_path / "in", base_modules=shapes_of(unet))
    assert {m.scale for m in adapter.modules.values()} == {0.5, 0.25}
    write_adapter(adapter, tmp_path / "peft", layout=AdapterLayout.PEFT)
    assert read_adapter(tmp_path / "peft").layout is AdapterLayout.PEFT
    loaded = PeftModel.from_pretrained(tiny_unet(0), str(tmp_path / "peft")).eval()
    inputs = unet_inputs()
    torch.testing.assert_close(
        unet_output(loaded, inputs),
        unet_output(with_deltas(unet, deltas), inputs),
        rtol=0,
        atol=1e-5,
    )
