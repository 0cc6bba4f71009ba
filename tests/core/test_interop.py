"""Acceptance: adapters made by real libraries are read, transferred to a related base, written,
and loaded back by those libraries, giving the outputs the transferred dW predicts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter
from core.errors import MissingModuleError
from core.factorize import FactorStore
from core.formats import decode_compact, read_adapter, write_adapter
from core.selection import DEFAULT_PATTERNS
from core.training import export_lorax, inject_lorax
from core.transfer import TransferMode, transfer_adapter
from core.weights import WeightSource
from tests.core.lora_models import (
    KOHYA_METADATA,
    KOHYA_MODULES,
    UNET_TARGETS,
    bert_inputs,
    bert_output,
    make_kohya,
    peft_adapter,
    perturbed,
    save_weights,
    tiny_bert,
    tiny_unet,
    unet_inputs,
    unet_output,
    with_deltas,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def _bases(
    model: nn.Module, root: Path, subfolder: str = ""
) -> tuple[nn.Module, WeightSource, WeightSource]:
    """A successor of ``model`` (weights + 5% noise) and both bases saved as safetensors."""
    successor = perturbed(model)
    name = f"{subfolder}/diffusion_pytorch_model.safetensors" if subfolder else "model.safetensors"
    save_weights(model, root / "base1" / name)
    save_weights(successor, root / "base2" / name)
    return successor, WeightSource.open(root / "base1"), WeightSource.open(root / "base2")


def _shapes(source: WeightSource) -> dict[str, tuple[int, int]]:
    return {info.name: info.shape for info in source.modules()}


def _transfer(adapter: LoraAdapter, src: WeightSource, tgt: WeightSource, **kw) -> LoraAdapter:
    result = transfer_adapter(adapter, FactorStore(src), FactorStore(tgt), **kw)
    assert result.modules_transferred == len(adapter.modules) and result.modules_skipped == 0
    moved = [
        float((result.adapter.modules[n].delta() - m.delta()).norm() / m.delta().norm())
        for n, m in adapter.modules.items()
    ]
    assert max(moved) > 1e-3, "the transfer must change the update, or the test proves nothing"
    return result.adapter


def _deltas(adapter: LoraAdapter, strip: str = "") -> dict[str, torch.Tensor]:
    return {n.removeprefix(strip): m.delta() for n, m in adapter.modules.items()}


def test_peft_bert_adapter_transfers_and_loads_in_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    bert = tiny_bert(0)
    successor, src, tgt = _bases(bert, tmp_path)
    peft_adapter(
        bert,
        tmp_path / "adapter",
        targets=["query", "value", "intermediate.dense"],  # 64 x 64 and 128 x 64
        r=4,
        alpha=8,
        rank_pattern={"value": 6},
    )
    adapter = read_adapter(tmp_path / "adapter", base_modules=_shapes(src))
    assert len(adapter.modules) == 6
    moved = _transfer(adapter, src, tgt, mode=TransferMode.PROJECT, rank=16)
    write_adapter(moved, tmp_path / "out")
    loaded = PeftModel.from_pretrained(copy.deepcopy(successor), str(tmp_path / "out")).eval()
    inputs = bert_inputs()
    expected = bert_output(with_deltas(successor, _deltas(moved)), inputs)
    assert not torch.allclose(expected, bert_output(successor, inputs), atol=1e-4)
    torch.testing.assert_close(bert_output(loaded, inputs), expected, rtol=0, atol=1e-5)


def test_peft_unet_adapter_transfers_and_loads_in_peft_and_diffusers(tmp_path: Path) -> None:
    from peft import PeftModel

    unet = tiny_unet(0)
    successor, src, tgt = _bases(unet, tmp_path)
    peft_adapter(unet, tmp_path / "adapter", targets=UNET_TARGETS, r=4, alpha=4)
    adapter = read_adapter(tmp_path / "adapter", base_modules=_shapes(src))
    moved = _transfer(adapter, src, tgt, mode=TransferMode.SUBSPACE)
    inputs = unet_inputs()
    expected = unet_output(with_deltas(successor, _deltas(moved)), inputs)
    assert not torch.allclose(expected, unet_output(successor, inputs), atol=1e-4)

    write_adapter(moved, tmp_path / "out")
    loaded = PeftModel.from_pretrained(copy.deepcopy(successor), str(tmp_path / "out")).eval()
    torch.testing.assert_close(unet_output(loaded, inputs), expected, rtol=0, atol=1e-5)

    file = write_adapter(moved, tmp_path / "out.safetensors", layout=AdapterLayout.DIFFUSERS)[0]
    via_diffusers = copy.deepcopy(successor)
    via_diffusers.load_lora_adapter(str(file), prefix=None)
    torch.testing.assert_close(unet_output(via_diffusers, inputs), expected, rtol=0, atol=1e-5)


def test_kohya_adapter_transfers_between_pipelines(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    unet = tiny_unet(0)
    successor, src, tgt = _bases(unet, tmp_path, subfolder="unet")
    assert all(name.startswith("unet.") for name in src.names)
    make_kohya(tmp_path / "style.safetensors", unet)
    adapter = read_adapter(tmp_path / "style.safetensors", base_modules=_shapes(src))
    assert set(adapter.modules) == {f"unet.{n}" for n in KOHYA_MODULES}
    moved = _transfer(adapter, src, tgt, mode=TransferMode.PROJECT, rank=8)
    out = write_adapter(moved, tmp_path / "moved.safetensors")[0]

    before, after = load_file(tmp_path / "style.safetensors"), load_file(out)
    assert set(after) == set(before)
    assert all(after[k].shape == before[k].shape for k in before)  # 1x1 conv halves stay 4-D
    with safe_open(str(out), "pt") as fh:
        metadata = fh.metadata()
    assert {k: metadata[k] for k in KOHYA_METADATA} == KOHYA_METADATA
    reread = read_adapter(out, base_modules=_shapes(tgt))
    for name, module in moved.modules.items():
        torch.testing.assert_close(reread.modules[name].delta(), module.delta(), rtol=0, atol=1e-6)

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(out))
    loaded = copy.deepcopy(successor)
    loaded.load_lora_adapter(state, network_alphas=alphas, prefix="unet")
    inputs = unet_inputs()
    expected = unet_output(with_deltas(successor, _deltas(moved, "unet.")), inputs)
    assert not torch.allclose(expected, unet_output(successor, inputs), atol=1e-4)
    torch.testing.assert_close(unet_output(loaded, inputs), expected, rtol=0, atol=1e-5)


def test_trained_lorax_exports_load_in_peft(tmp_path: Path) -> None:
    """A LoRA-X made with core.training, written expanded (PEFT) and compact; both load in PEFT
    with the trained model's outputs, the compact one after decoding against the base file."""
    from peft import PeftModel

    bert = tiny_bert(0)
    save_weights(bert, tmp_path / "base" / "model.safetensors")
    trained = copy.deepcopy(bert)
    layers = inject_lorax(trained, DEFAULT_PATTERNS, rank=32)
    assert len(layers) == 8  # query, key, value, attention.output.dense in 2 layers
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.ds.copy_(torch.randn(layer.rank, generator=g) * 0.2)
    inputs = bert_inputs()
    reference = bert_output(trained, inputs)
    assert not torch.allclose(reference, bert_output(bert, inputs), atol=1e-4)

    write_adapter(export_lorax(trained), tmp_path / "expanded")
    expanded = read_adapter(tmp_path / "expanded")
    assert expanded.kind is AdapterKind.LORAX
    loaded = PeftModel.from_pretrained(tiny_bert(0), str(tmp_path / "expanded")).eval()
    torch.testing.assert_close(bert_output(loaded, inputs), reference, rtol=0, atol=1e-5)

    compact = export_lorax(trained, form="compact")
    (compact_file,) = write_adapter(compact, tmp_path / "c.safetensors")
    store = FactorStore(WeightSource.open(tmp_path / "base"))
    decoded = decode_compact(compact_file, store.view())
    write_adapter(decoded, tmp_path / "decoded")
    loaded = PeftModel.from_pretrained(tiny_bert(0), str(tmp_path / "decoded")).eval()
    torch.testing.assert_close(bert_output(loaded, inputs), reference, rtol=0, atol=1e-5)


def test_adapter_for_another_architecture_is_refused(tmp_path: Path) -> None:
    unet = tiny_unet(0)
    save_weights(unet, tmp_path / "unet.safetensors")
    peft_adapter(tiny_bert(0), tmp_path / "bert-adapter", targets=["query"])
    with pytest.raises(MissingModuleError) as err:
        read_adapter(
            tmp_path / "bert-adapter",
            base_modules=_shapes(WeightSource.open(tmp_path / "unet.safetensors")),
        )
    message = str(err.value)
    assert "bert-adapter" in message and "encoder.layer.0.attention.self.query" in message
