"""LyCORIS modules in kohya files: LoHa and LoKr expanded as PEFT's own LoHa / LoKr layers
compute them, the best rank-r LoRA with its kept energy, Tucker LoCon exactly, kinds that
cannot be expanded refused by key; and LoHa / LoKr converted, carried and reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.errors import UnknownLayoutError
from core.factorize import FactorStore
from core.formats import LycorisOptions, read_adapter, resolve_modules, write_adapter
from core.transfer import transfer_adapter
from core.weights import WeightSource
from tests.fixtures.sdxl import TinySdxl

pytestmark = pytest.mark.interop

FULL = LycorisOptions(rank=10_000)  # every singular value: the exact update


class Two(nn.Module):
    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.lin = nn.Linear(width, 8)
        self.conv = nn.Conv2d(4, 6, 3)


def _peft(config: object, width: int = 12) -> nn.Module:
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Two(width), config)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _lycoris_file(model: nn.Module, path: Path, alpha: float) -> dict[str, torch.Tensor]:
    """PEFT's LoHa/LoKr parameters under kohya/LyCORIS keys; returns PEFT's own dW per stem."""
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for layer in ("lin", "conv"):
        peft_layer = model.base_model.model.get_submodule(layer)
        stem = f"lora_unet_{layer}"
        for name, p in peft_layer.named_parameters():
            if name.startswith(("hada_", "lokr_")):
                tensors[f"{stem}.{name.split('.')[0]}"] = p.detach().clone()
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        deltas[stem] = peft_layer.get_delta_weight("default").detach()
    save_file(tensors, str(path))
    return deltas


def test_loha_expands_as_peft_computes_it(tmp_path: Path) -> None:
    from peft import LoHaConfig

    model = _peft(LoHaConfig(r=3, alpha=6, target_modules=["lin", "conv"]))
    path = tmp_path / "loha.safetensors"
    deltas = _lycoris_file(model, path, alpha=6.0)
    adapter = read_adapter(path, lycoris=FULL)
    assert {c.kind for c in adapter.conversions} == {"loha"}
    for stem, delta in deltas.items():
        module = adapter.modules[stem]
        assert module.rank > 3  # a Hadamard product has more than the factors' rank
        torch.testing.assert_close(
            module.delta(), delta.reshape(delta.shape[0], -1), atol=1e-5, rtol=1e-4
        )
    assert all(c.energy_kept == pytest.approx(1.0) for c in adapter.conversions)


def test_energy_threshold_keeps_the_best_rank_r_lora(tmp_path: Path) -> None:
    from peft import LoHaConfig

    model = _peft(LoHaConfig(r=3, alpha=6, target_modules=["lin", "conv"]))
    path = tmp_path / "loha.safetensors"
    deltas = _lycoris_file(model, path, alpha=6.0)
    adapter = read_adapter(path, lycoris=LycorisOptions(energy=0.8))
    for record in adapter.conversions:
        delta = deltas[record.key].reshape(deltas[record.key].shape[0], -1).double()
        s = torch.linalg.svdvals(delta)
        assert record.rank < min(delta.shape)
        kept = float(s[: record.rank].square().sum() / s.square().sum())
        assert record.energy_kept == pytest.approx(kept) and kept >= 0.8
        assert float(s[: record.rank - 1].square().sum() / s.square().sum()) < 0.8  # fewest
        error = (adapter.modules[record.key].delta().double() - delta).norm()
        assert float(error) == pytest.approx(float(s[record.rank :].norm()), rel=1e-4)


def test_lokr_expands_as_peft_computes_it(tmp_path: Path) -> None:
    from peft import LoKrConfig

    config = LoKrConfig(r=2, alpha=4, target_modules=["lin"], decompose_both=True)
    model = _peft(config, width=64)
    layer = model.base_model.model.lin
    names = {n.split(".")[0] for n, _ in layer.named_parameters() if n.startswith("lokr_")}
    assert {"lokr_w1_a", "lokr_w2_a"} <= names  # both factors decomposed: scale alpha / r
    path = tmp_path / "lokr.safetensors"
    tensors = {
        f"lora_unet_lin.{n.split('.')[0]}": p.detach().clone()
        for n, p in layer.named_parameters()
        if n.startswith("lokr_")
    }
    tensors["lora_unet_lin.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    adapter = read_adapter(path, lycoris=FULL)
    expected = layer.get_delta_weight("default").detach()
    torch.testing.assert_close(
        adapter.modules["lora_unet_lin"].delta(), expected, atol=1e-5, rtol=1e-4
    )
    assert adapter.conversions[0].kind == "lokr"


def test_lokr_with_two_full_factors_ignores_alpha_and_keeps_conv_shape(tmp_path: Path) -> None:
    """LyCORIS: scale 1 when neither factor is decomposed; a 4-D w2 makes a convolution."""
    g = torch.Generator().manual_seed(2)
    w1, w2 = torch.randn(2, 2, generator=g), torch.randn(3, 2, 3, 3, generator=g)
    path = tmp_path / "lokr.safetensors"
    save_file(
        {
            "lora_unet_conv.lokr_w1": w1,
            "lora_unet_conv.lokr_w2": w2,
            "lora_unet_conv.alpha": torch.tensor(7.0),
        },
        str(path),
    )
    module = read_adapter(path, lycoris=FULL).modules["lora_unet_conv"]
    by_hand = torch.kron(w1[:, :, None, None], w2)  # (6, 4, 3, 3)
    assert module.weight_shape == (6, 4, 3, 3)
    torch.testing.assert_close(module.delta(), by_hand.reshape(6, -1), atol=1e-5, rtol=1e-4)


def test_tucker_locon_is_converted_exactly(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    down, mid, up = (
        torch.randn(2, 4, 1, 1, generator=g),
        torch.randn(2, 2, 3, 3, generator=g),
        torch.randn(6, 2, 1, 1, generator=g),
    )
    path = tmp_path / "locon.safetensors"
    save_file(
        {
            "lora_unet_conv.lora_down.weight": down,
            "lora_unet_conv.lora_mid.weight": mid,
            "lora_unet_conv.lora_up.weight": up,
            "lora_unet_conv.alpha": torch.tensor(1.0),
        },
        str(path),
    )
    adapter = read_adapter(path)
    module = adapter.modules["lora_unet_conv"]
    # LyCORIS: dW[i, j, ...] = sum_mn up[i, m] mid[m, n, ...] down[n, j], times alpha / r
    by_hand = 0.5 * torch.einsum("mnhw,im,nj->ijhw", mid, up[:, :, 0, 0], down[:, :, 0, 0])
    assert module.rank == 2 and module.weight_shape == (6, 4, 3, 3)
    torch.testing.assert_close(module.delta(), by_hand.reshape(6, -1), atol=1e-5, rtol=1e-4)
    assert [(c.kind, c.energy_kept) for c in adapter.conversions] == [("locon-tucker", 1.0)]


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("lora_unet_x.oft_blocks", "OFT"),
        ("lora_unet_x.a1.weight", "GLoRA"),
        ("lora_unet_x.lokr_t1", "lokr_t1"),
    ],
)
def test_what_cannot_be_expanded_is_refused_by_key(tmp_path: Path, key: str, words: str) -> None:
    path = tmp_path / "odd.safetensors"
    save_file(
        {
            "lora_unet_y.lora_down.weight": torch.ones(2, 4),
            "lora_unet_y.lora_up.weight": torch.ones(4, 2),
            key: torch.ones(2, 2),
        },
        str(path),
    )
    with pytest.raises(UnknownLayoutError, match=words) as err:
        read_adapter(path)
    assert key in str(err.value)


def test_loha_and_lokr_converted_carried_and_reported(
    tiny_sdxl: TinySdxl, tiny_sdxl_successor: TinySdxl, tmp_path: Path
) -> None:
    g = torch.Generator().manual_seed(4)
    loha = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # 32 x 32
    lokr = "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_v"  # 32 x 32
    path = tmp_path / "lyco.safetensors"
    save_file(
        {
            f"{loha}.hada_w1_a": torch.randn(32, 2, generator=g) * 0.2,
            f"{loha}.hada_w1_b": torch.randn(2, 32, generator=g) * 0.2,
            f"{loha}.hada_w2_a": torch.randn(32, 2, generator=g) * 0.2,
            f"{loha}.hada_w2_b": torch.randn(2, 32, generator=g) * 0.2,
            f"{loha}.alpha": torch.tensor(2.0),
            f"{lokr}.lokr_w1": torch.randn(4, 4, generator=g) * 0.2,
            f"{lokr}.lokr_w2_a": torch.randn(8, 2, generator=g) * 0.2,
            f"{lokr}.lokr_w2_b": torch.randn(2, 8, generator=g) * 0.2,
            f"{lokr}.alpha": torch.tensor(1.0),
        },
        str(path),
    )
    source = WeightSource.open(tiny_sdxl.single_file)
    target = WeightSource.open(tiny_sdxl_successor.single_file)
    shapes = {i.name: i.shape for i in source.modules()}
    adapter, report = resolve_modules(
        read_adapter(path, lycoris=LycorisOptions(energy=0.95)), shapes
    )
    assert report.complete
    kinds = {c.key: c for c in adapter.conversions}
    assert kinds[loha].kind == "loha" and kinds[lokr].kind == "lokr"
    assert all(0.95 <= c.energy_kept <= 1.0 for c in adapter.conversions)
    result = transfer_adapter(adapter, FactorStore(source), FactorStore(target))
    assert result.modules_transferred == 2 and not result.left_out
    assert result.adapter.conversions == adapter.conversions  # the record travels with it
    out = write_adapter(result.adapter, tmp_path / "out.safetensors")[0]
    written = load_file(out)
    assert {k.partition(".")[0] for k in written} == {loha, lokr}
    assert not any(".hada_" in k or ".lokr_" in k for k in written)
    ranks = {stem: int(written[f"{stem}.lora_down.weight"].shape[0]) for stem in (loha, lokr)}
    assert ranks == {loha: kinds[loha].rank, lokr: kinds[lokr].rank}
