"""DoRA: the magnitude rule (identity, within the noise of a successor), PEFT's own DoRA read and
written back for PEFT to load, a DoRA adapter on a tiny Llama carried to a successor and
reloaded by PEFT, and LyCORIS dora_scale (both conventions) by a hand-applied check."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core.adapter import MagnitudeAxis
from core.dora import carry_dora_magnitudes, carry_magnitude, dora_weight, weight_norms
from core.factorize import FactorStore
from core.formats import read_adapter, resolve_modules, write_adapter
from core.kinds import DORA_GAIN
from core.transfer import transfer_adapter
from core.weights import WeightSource
from tests.core.lora_models import perturbed, save_weights, weights_2d

pytestmark = pytest.mark.interop

LLAMA_TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return LlamaForCausalLM(config).eval()


def dora_peft(model: nn.Module, folder: Path, seed: int = 0) -> nn.Module:
    """A PEFT DoRA on LLAMA_TARGETS with random B and magnitudes moved off their init."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True)
    wrapped = get_peft_model(copy.deepcopy(model), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    wrapped.save_pretrained(str(folder))
    return wrapped.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_rule_is_the_identity_on_the_same_base() -> None:
    g = torch.Generator().manual_seed(0)
    w, dw = torch.randn(6, 5, generator=g), 0.1 * torch.randn(6, 5, generator=g)
    m = weight_norms(w, dw).float() * (1 + 0.2 * torch.rand(6, generator=g))
    norms = weight_norms(w, dw)
    carried = carry_magnitude(m, norms, norms)
    assert not torch.allclose(m.double(), norms)  # a trained magnitude, not its init
    torch.testing.assert_close(carried, m, rtol=0, atol=0)


@pytest.mark.parametrize("axis", [MagnitudeAxis.OUT, MagnitudeAxis.IN])
def test_merged_weight_on_a_noisy_successor_stays_within_the_noise(axis: MagnitudeAxis) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 24, generator=g)
    dw = 0.1 * torch.randn(32, 4, generator=g) @ torch.randn(4, 24, generator=g) / 2
    units = 32 if axis is MagnitudeAxis.OUT else 24
    m = (weight_norms(w, dw, axis=axis) * (1 + 0.2 * torch.rand(units, generator=g))).float()
    noise = 0.02 * w.std() * torch.randn(w.shape, generator=g)
    w_t = w + noise
    m_t = carry_magnitude(m, weight_norms(w, dw, axis=axis), weight_norms(w_t, dw, axis=axis))
    merged_s = dora_weight(w, dw, m, axis=axis)
    merged_t = dora_weight(w_t, dw, m_t, axis=axis)
    gain_max = float((m.double() / weight_norms(w, dw, axis=axis)).max())
    assert not torch.allclose(merged_s, w + dw, atol=1e-3)  # the magnitude does something
    gap = float((merged_t - merged_s).norm())
    assert gap <= gain_max * float(noise.norm()) * 1.0001
    # copying the magnitude instead would not keep the successor's own norms
    copied = dora_weight(w_t, dw, m, axis=axis)
    assert not torch.allclose(copied, merged_t, atol=1e-6)


def test_input_channel_norms_group_a_convolution_kernel() -> None:
    g = torch.Generator().manual_seed(2)
    w4 = torch.randn(6, 4, 3, 3, generator=g)
    # LyCORIS: weight.transpose(0, 1).reshape(in, -1).norm(dim=1)
    expected = w4.transpose(0, 1).reshape(4, -1).norm(dim=1)
    got = weight_norms(w4.reshape(6, -1), torch.zeros(6, 36), axis=MagnitudeAxis.IN, channels=4)
    torch.testing.assert_close(got.float(), expected)


def test_peft_dora_read_matches_peft_merge_and_written_back_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    base = tiny_llama()
    wrapped = dora_peft(base, tmp_path / "dora")
    adapter = read_adapter(tmp_path / "dora")
    assert adapter.is_dora and len(adapter.modules) == 2 * len(LLAMA_TARGETS)
    merged = weights_2d(copy.deepcopy(wrapped).merge_and_unload())
    original = weights_2d(base)
    for name, module in adapter.modules.items():
        assert module.magnitude_axis is MagnitudeAxis.OUT
        expected = merged[name]
        assert not torch.allclose(expected, original[name] + module.delta(), atol=1e-5)
        torch.testing.assert_close(
            dora_weight(original[name], module.delta(), module.magnitude), expected,
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
    out = tmp_path / "written"
    write_adapter(adapter, out)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    torch.testing.assert_close(_logits(reloaded), _logits(wrapped), rtol=1e-5, atol=1e-5)


def test_peft_dora_carried_to_a_successor_and_reloaded_by_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    base = tiny_llama()
    successor = perturbed(base, eps=0.02, seed=5)
    dora_peft(base, tmp_path / "dora")
    source_w = WeightSource.open(save_weights(base, tmp_path / "s" / "model.safetensors"))
    target_w = WeightSource.open(save_weights(successor, tmp_path / "t" / "model.safetensors"))
    adapter, _ = resolve_modules(
        read_adapter(tmp_path / "dora"), {i.name: i.shape for i in source_w.modules()}
    )
    result = transfer_adapter(adapter, FactorStore(source_w), FactorStore(target_w))
    assert result.modules_transferred == len(adapter.modules) and not result.left_out
    assert all(DORA_GAIN in r.notes for r in result.modules)
    carried = result.adapter
    assert carried.is_dora
    # the strategy's finish step is the adapter-level helper, module by module
    fed_by = {r.target: r.source for r in result.modules if r.target}
    bare = dataclasses.replace(
        carried,
        modules={n: dataclasses.replace(m, magnitude=None) for n, m in carried.modules.items()},
    )
    again, notes = carry_dora_magnitudes(adapter, bare, fed_by, source_w.matrix, target_w.matrix)
    assert notes == ()
    for name, module in again.modules.items():
        assert module.magnitude is not None and carried.modules[name].magnitude is not None
        torch.testing.assert_close(module.magnitude, carried.modules[name].magnitude)
    out = tmp_path / "carried"
    write_adapter(carried, out)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(successor), str(out)).eval()
    merged = weights_2d(reloaded.merge_and_unload())
    s_weights, t_weights = weights_2d(base), weights_2d(successor)
    for name, module in adapter.modules.items():
        # PEFT's merged weight is the DoRA weight of the carried direction and magnitude
        expected = dora_weight(
            t_weights[name], carried.modules[name].delta(), carried.modules[name].magnitude
        )
        torch.testing.assert_close(merged[name], expected, rtol=1e-4, atol=1e-5)
        # ... and it differs from the source's DoRA weight by the gain times (the base's change
        # plus the carried update's change): W'_t - W'_s = diag(g) (E + dW_t - dW_s)
        source_merged = dora_weight(s_weights[name], module.delta(), module.magnitude)
        gain = module.magnitude.double() / weight_norms(s_weights[name], module.delta())
        change = (t_weights[name] - s_weights[name]) + (
            carried.modules[name].delta() - module.delta()
        )
        torch.testing.assert_close(
            expected - source_merged, (gain[:, None] * change).float(), rtol=1e-3, atol=1e-5
        )


@pytest.mark.parametrize("on_out", [True, False])
def test_kohya_dora_scale_read_written_and_applied_by_hand(tmp_path: Path, on_out: bool) -> None:
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(8, 6, generator=g)
    down, up = 0.1 * torch.randn(2, 6, generator=g), 0.1 * torch.randn(8, 2, generator=g)
    delta = up @ down  # alpha = r: scale 1
    axis = MagnitudeAxis.OUT if on_out else MagnitudeAxis.IN
    magnitude = (weight_norms(weight, delta, axis=axis) * 1.1).float()
    scale_shape = (8, 1) if on_out else (1, 6)
    path = tmp_path / "dora.safetensors"
    save_file(
        {
            "lora_unet_blk_proj.lora_down.weight": down,
            "lora_unet_blk_proj.lora_up.weight": up,
            "lora_unet_blk_proj.alpha": torch.tensor(2.0),
            "lora_unet_blk_proj.dora_scale": magnitude.reshape(scale_shape),
        },
        str(path),
    )
    adapter, _ = resolve_modules(read_adapter(path), {"blk.proj": (8, 6)})
    module = adapter.modules["blk.proj"]
    assert module.magnitude_axis is axis
    # the LyCORIS formula, written out: W' = W_c * dora_scale / ||W_c|| with its own norm
    combined = weight + delta
    norm = combined.norm(dim=1, keepdim=True) if on_out else combined.norm(dim=0, keepdim=True)
    by_hand = combined * magnitude.reshape(scale_shape) / norm
    torch.testing.assert_close(
        dora_weight(weight, module.delta(), module.magnitude, axis=axis), by_hand
    )
    out = write_adapter(adapter, tmp_path / "out.safetensors")[0]
    from safetensors.torch import load_file

    assert load_file(out)["lora_unet_blk_proj.dora_scale"].shape == scale_shape
    if not on_out:
        with pytest.raises(ValueError, match="no PEFT form"):
            write_adapter(adapter, tmp_path / "peft", layout="peft")


def test_peft_dora_written_in_diffusers_layout_loads_into_a_unet(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from tests.core.lora_models import UNET_TARGETS, tiny_unet, unet_inputs, unet_output

    unet = tiny_unet(0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, use_dora=True)
    wrapped = get_peft_model(copy.deepcopy(unet), config)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    wrapped.save_pretrained(str(tmp_path / "peft"))
    adapter = read_adapter(tmp_path / "peft")
    out = write_adapter(adapter, tmp_path / "dora.safetensors", layout="diffusers")[0]
    from safetensors.torch import load_file

    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(out))
    loaded = tiny_unet(0)
    loaded.load_lora_adapter(str(out), prefix=None)
    inputs = unet_inputs()
    expected = unet_output(wrapped, inputs)
    assert not torch.allclose(expected, unet_output(unet, inputs), atol=1e-4)
    torch.testing.assert_close(unet_output(loaded, inputs), expected, rtol=1e-4, atol=1e-5)
