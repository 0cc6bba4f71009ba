"""LoRA-X training layers: learning, frozen factors, the sigma + d >= 0 bound, export and reload."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from core.adapter import AdapterKind, AdapterLayout
from core.errors import BaseMismatchError, SubspaceError
from core.formats import read_adapter, write_adapter
from core.training import (
    LoraXLinear,
    constrain_lorax_,
    export_lorax,
    inject_lorax,
    load_lorax,
)
from tests.core.lora_models import with_deltas

PATTERNS = [r"^(0|2)$"]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 12), nn.Tanh(), nn.Linear(12, 4)
    )


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, generator=g)
    teacher = _mlp(7)
    with torch.no_grad():
        return x, teacher(x)


def _train(model: nn.Module, steps: int = 30, lr: float = 0.05) -> list[float]:
    x, y = _data()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        constrain_lorax_(model)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("full", [False, True])
def test_training_lowers_the_loss_and_only_ds_learns(full: bool) -> None:
    model = _mlp()
    layers = inject_lorax(model, PATTERNS, rank=None, full=full)
    assert set(layers) == {"0", "2"} and isinstance(model[0], LoraXLinear)
    assert layers["0"].rank == 16 and layers["2"].rank == 12
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.ds", "2.ds"}
    buffers = {n for n, _ in model.named_buffers()}
    assert {"0.U", "0.V", "0.S", "2.U", "2.V", "2.S"} <= buffers
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model)
    assert losses[-1] < 0.8 * losses[0]
    for name, param in model.named_parameters():
        if name.endswith(".ds"):
            assert param.grad is not None and float(param.grad.abs().sum()) > 0
            assert float(param.detach().abs().max()) > 0
        else:
            assert param.grad is None, name
            assert torch.equal(param, frozen[name]), name


def test_forward_equals_the_weight_update() -> None:
    model = _mlp()
    layers = inject_lorax(model, PATTERNS, rank=8)
    with torch.no_grad():
        for layer in layers.values():
            layer.ds.copy_(torch.linspace(-0.3, 0.5, layer.rank))
    x, _ = _data()
    reference = with_deltas(_mlp(), {n: layer.delta_weight() for n, layer in layers.items()})
    with torch.no_grad():
        assert not torch.allclose(model(x), _mlp()(x), atol=1e-4)
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)


def test_singular_values_stay_non_negative() -> None:
    model = _mlp()
    layer = inject_lorax(model, PATTERNS, rank=6)["0"]
    with torch.no_grad():
        layer.ds.fill_(-10.0)  # far below -sigma_i
    assert bool((layer.S + layer.effective_ds() >= 0).all())
    weight = layer.base.weight.detach() + layer.delta_weight().detach()
    # sigma_i + d_i = 0 removes the top singular directions: the update is -U_r S_r V_r^T
    torch.testing.assert_close(layer.delta_weight(), -(layer.U * layer.S) @ layer.V.T)
    assert torch.linalg.matrix_rank(weight).item() == 16 - 6
    layer.constrain_()
    assert bool((layer.S + layer.ds >= 0).all()) and torch.allclose(layer.ds, -layer.S)
    _train(model, steps=20, lr=0.5)
    assert bool((layer.S + layer.ds.detach() >= -1e-7).all())


def test_one_by_one_convolution() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(6, 10, kernel_size=1, stride=2, padding=1))
    reference = copy.deepcopy(conv)
    layer = inject_lorax(conv, [r"^0$"], rank=4)["0"]
    with torch.no_grad():
        layer.ds.copy_(torch.tensor([0.4, -0.2, 0.1, 0.3]))
    x = torch.randn(2, 6, 5, 5)
    expected = with_deltas(reference, {"0": layer.delta_weight().detach()})
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected(x), rtol=0, atol=1e-6)
    adapter = export_lorax(conv)
    assert adapter.modules["0"].weight_shape == (10, 6, 1, 1)


def _trained(full: bool = False) -> tuple[nn.Sequential, dict[str, LoraXLinear]]:
    model = _mlp()
    layers = inject_lorax(model, PATTERNS, rank=10, full=full)
    _train(model, steps=10)
    return model, layers


@pytest.mark.parametrize("full", [False, True])
def test_expanded_export_reproduces_outputs(full: bool) -> None:
    model, _ = _trained(full)
    adapter = export_lorax(model)
    assert adapter.kind is AdapterKind.LORAX and adapter.layout is AdapterLayout.PEFT
    module = adapter.modules["0"]
    assert module.scale == 1.0 and module.ds is not None and module.ds.ndim == (2 if full else 1)
    assert torch.equal(module.up, model[0].U)
    x, _ = _data()
    applied = with_deltas(_mlp(), {n: m.delta() for n, m in adapter.modules.items()})
    with torch.no_grad():
        assert not torch.allclose(model(x), _mlp()(x), atol=1e-4)
        torch.testing.assert_close(applied(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("form", "layout", "file"),
    [
        ("expanded", AdapterLayout.PEFT, "adapter"),
        ("expanded", AdapterLayout.KOHYA, "adapter.safetensors"),
        ("expanded", AdapterLayout.DIFFUSERS, "adapter.safetensors"),
        ("compact", AdapterLayout.PEFT, "adapter.safetensors"),
    ],
)
def test_written_adapter_loads_back_into_fresh_layers(
    tmp_path: Path, form: str, layout: AdapterLayout, file: str
) -> None:
    model, _ = _trained()
    write_adapter(export_lorax(model, form=form, layout=layout), tmp_path / file)
    adapter = read_adapter(tmp_path / file)
    assert adapter.kind is (AdapterKind.LORAX if form == "expanded" else AdapterKind.LORAX_COMPACT)
    fresh = _mlp()
    inject_lorax(fresh, PATTERNS, rank=10)
    x, _ = _data()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), model(x), atol=1e-4)
    assert load_lorax(fresh, adapter) == ["0", "2"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-6)


def test_compact_adapter_refuses_another_base() -> None:
    model, _ = _trained()
    adapter = export_lorax(model, form="compact")
    other = _mlp(5)
    inject_lorax(other, PATTERNS, rank=10)
    with pytest.raises(BaseMismatchError, match="0"):
        load_lorax(other, adapter)


def test_plain_lora_cannot_load_into_lorax_layers() -> None:
    from tests.core.synthetic import adapter_of, lora_module

    model = _mlp()
    inject_lorax(model, PATTERNS, rank=4)
    adapter = adapter_of([lora_module("0", 32, 16, 2, seed=3)], kind=AdapterKind.LORA)
    with pytest.raises(SubspaceError, match="0"):
        load_lorax(model, adapter)


def test_injection_needs_a_match() -> None:
    with pytest.raises(ValueError, match="no linear module"):
        inject_lorax(_mlp(), [r"attention"], rank=4)
