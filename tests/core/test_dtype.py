"""An fp16 adapter comes back fp16: through a transfer, in every writer, and the library loads it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.factorize import FactorStore
from core.formats import read_adapter, write_adapter
from core.transfer import transfer_adapter
from core.weights import WeightSource
from tests.core.lora_models import (
    bert_inputs,
    bert_output,
    peft_adapter,
    perturbed,
    save_weights,
    tiny_bert,
)
from tests.core.sdxl_adapters import make_kohya_sdxl
from tests.fixtures.sdxl import TinySdxl

pytestmark = pytest.mark.interop


def test_fp16_kohya_sdxl_carried_comes_back_fp16(
    tiny_sdxl: TinySdxl, tiny_sdxl_successor: TinySdxl, tmp_path: Path
) -> None:
    path = tmp_path / "half.safetensors"
    make_kohya_sdxl(path, tiny_sdxl.components, dtype=torch.float16)
    source = WeightSource.open(tiny_sdxl.folder)
    target = WeightSource.open(tiny_sdxl_successor.single_file)
    adapter = read_adapter(path, base_modules={i.name: i.shape for i in source.modules()})
    result = transfer_adapter(adapter, FactorStore(source), FactorStore(target))
    assert result.adapter.dtype is torch.float16
    assert {m.up.dtype for m in result.adapter.modules.values()} == {torch.float32}  # the math
    out = write_adapter(result.adapter, tmp_path / "out.safetensors")[0]
    written = load_file(out)
    assert set(written) == set(load_file(path))
    assert {t.dtype for t in written.values()} == {torch.float16}


@pytest.mark.parametrize("layout", ["peft", "diffusers"])
def test_fp16_peft_carried_comes_back_fp16_and_loads(tmp_path: Path, layout: str) -> None:
    from peft import PeftModel

    base = tiny_bert(0)
    peft_adapter(base, tmp_path / "a", targets=["query", "value"])
    weights = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, str(weights))
    successor = perturbed(base, eps=0.02, seed=2)
    source = WeightSource.open(save_weights(base, tmp_path / "s" / "model.safetensors"))
    target = WeightSource.open(save_weights(successor, tmp_path / "t" / "model.safetensors"))
    adapter = read_adapter(tmp_path / "a", base_modules={i.name: i.shape for i in source.modules()})
    assert adapter.dtype is torch.float16
    result = transfer_adapter(adapter, FactorStore(source), FactorStore(target))
    if layout == "peft":
        files = write_adapter(result.adapter, tmp_path / "out")
        tensors = load_file(files[0])
        reloaded = PeftModel.from_pretrained(copy.deepcopy(successor), str(tmp_path / "out"))
        assert not torch.allclose(
            bert_output(reloaded, bert_inputs()), bert_output(successor, bert_inputs()), atol=1e-4
        )
    else:
        files = write_adapter(result.adapter, tmp_path / "out.safetensors", layout="diffusers")
        tensors = load_file(files[0])
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float16}
