"""kohya SDXL LoRAs (SGM block names, te1, te2, ff / proj / 3x3 conv modules) on the tiny
SDXL-shaped pipeline: resolved against either base layout, written back in SGM names with their
ss_* metadata, loaded by diffusers' own ``load_lora_weights``; and carried to a successor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core.adapter import AdapterLayout
from core.factorize import FactorStore
from core.formats import MatchRule, read_adapter, resolve_modules, write_adapter
from core.transfer import transfer_adapter
from core.weights import WeightSource
from tests.core.sdxl_adapters import (
    SDXL_KOHYA_METADATA,
    SDXL_KOHYA_MODULES,
    make_kohya_sdxl,
    outputs,
    pipeline,
    with_component_deltas,
)
from tests.fixtures.sdxl import TinySdxl

pytestmark = pytest.mark.interop


def _shapes(source: WeightSource) -> dict[str, tuple[int, int]]:
    return {info.name: info.shape for info in source.modules()}


@pytest.mark.parametrize("layout", ["folder", "single_file"])
def test_sgm_names_resolve_against_either_base_layout(
    tiny_sdxl: TinySdxl, tmp_path: Path, layout: str
) -> None:
    path = tmp_path / "style.safetensors"
    deltas = make_kohya_sdxl(path, tiny_sdxl.components)
    base = WeightSource.open(getattr(tiny_sdxl, layout))
    raw = read_adapter(path)
    assert raw.layout is AdapterLayout.KOHYA and raw.architecture is not None
    adapter, report = resolve_modules(raw, _shapes(base))
    assert report.complete and set(adapter.modules) == {name for _, name in SDXL_KOHYA_MODULES}
    rules = {m.adapter_name: m.rule for m in report.matched}
    assert rules["lora_unet_middle_block_1_proj_in"] is MatchRule.KOHYA_SGM
    assert rules["lora_te2_text_model_encoder_layers_1_self_attn_v_proj"] is MatchRule.KOHYA
    assert adapter.config["unet_naming"] == "sgm"
    conv = adapter.modules["unet.up_blocks.0.upsamplers.0.conv"]
    assert conv.weight_shape == (32, 32, 3, 3) and conv.down.shape == (4, 32 * 9)
    for name, delta in deltas.items():
        torch.testing.assert_close(adapter.modules[name].delta(), delta)


def test_written_back_in_sgm_names_with_metadata(tiny_sdxl: TinySdxl, tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    make_kohya_sdxl(path, tiny_sdxl.components)
    adapter = read_adapter(path, base_modules=_shapes(WeightSource.open(tiny_sdxl.folder)))
    out = write_adapter(adapter, tmp_path / "out.safetensors")[0]
    before, after = load_file(path), load_file(out)
    assert set(after) == set(before)
    for key, tensor in before.items():
        torch.testing.assert_close(after[key], tensor, rtol=0, atol=0)
    with safe_open(str(out), "pt") as fh:
        metadata = fh.metadata()
    kept = {k: v for k, v in SDXL_KOHYA_METADATA.items() if not k.startswith("sshs_")}
    assert {k: metadata[k] for k in kept} == kept
    assert "sshs_model_hash" not in metadata  # a hash of other tensors would be stale


def test_diffusers_loads_what_we_write_into_the_sdxl_pipeline(
    tiny_sdxl: TinySdxl, tmp_path: Path
) -> None:
    path = tmp_path / "style.safetensors"
    deltas = make_kohya_sdxl(path, tiny_sdxl.components)
    adapter = read_adapter(path, base_modules=_shapes(WeightSource.open(tiny_sdxl.single_file)))
    out = write_adapter(adapter, tmp_path / "written.safetensors")[0]
    pipe = pipeline(tiny_sdxl.components)
    pipe.load_lora_weights(str(out))
    loaded = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    by_hand = with_component_deltas(tiny_sdxl.components, deltas)
    expected = outputs(by_hand["unet"], by_hand["text_encoder"], by_hand["text_encoder_2"])
    plain = outputs(
        tiny_sdxl.components["unet"],
        tiny_sdxl.components["text_encoder"],
        tiny_sdxl.components["text_encoder_2"],
    )
    for part, value in expected.items():
        assert not torch.allclose(value, plain[part], atol=1e-4), part
        torch.testing.assert_close(loaded[part], value, rtol=1e-4, atol=1e-5, msg=part)


def test_carried_to_a_successor_and_loaded_by_diffusers(
    tiny_sdxl: TinySdxl, tiny_sdxl_successor: TinySdxl, tmp_path: Path
) -> None:
    """Acceptance: every module carried (source + 2% noise) with cosine > 0.9 of its delta,
    written back in SGM names, and the successor pipeline loaded with diffusers gives the
    outputs of the transferred deltas applied by hand. The source is the single SGM file, the
    target the diffusers folder: the layouts do not matter."""
    path = tmp_path / "style.safetensors"
    make_kohya_sdxl(path, tiny_sdxl.components)
    source = WeightSource.open(tiny_sdxl.single_file)
    target = WeightSource.open(tiny_sdxl_successor.folder)
    adapter = read_adapter(path, base_modules=_shapes(source))
    result = transfer_adapter(adapter, FactorStore(source), FactorStore(target))
    assert result.modules_transferred == len(SDXL_KOHYA_MODULES) and result.modules_skipped == 0
    for name, module in adapter.modules.items():
        before, after = module.delta().flatten(), result.adapter.modules[name].delta().flatten()
        cosine = float(before @ after / (before.norm() * after.norm()))
        assert cosine > 0.9, (name, cosine)
    out = write_adapter(result.adapter, tmp_path / "carried.safetensors")[0]
    assert {k.partition(".")[0] for k in load_file(out)} == {s for s, _ in SDXL_KOHYA_MODULES}
    pipe = pipeline(tiny_sdxl_successor.components)
    pipe.load_lora_weights(str(out))
    loaded = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    carried = {n: m.delta() for n, m in result.adapter.modules.items()}
    by_hand = with_component_deltas(tiny_sdxl_successor.components, carried)
    expected = outputs(by_hand["unet"], by_hand["text_encoder"], by_hand["text_encoder_2"])
    for part, value in expected.items():
        torch.testing.assert_close(loaded[part], value, rtol=1e-4, atol=1e-5, msg=part)


def test_fp16_in_fp16_out(tiny_sdxl: TinySdxl, tmp_path: Path) -> None:
    path = tmp_path / "half.safetensors"
    make_kohya_sdxl(path, tiny_sdxl.components, dtype=torch.float16)
    adapter = read_adapter(path, base_modules=_shapes(WeightSource.open(tiny_sdxl.folder)))
    assert adapter.dtype is torch.float16
    out = write_adapter(adapter, tmp_path / "out.safetensors")[0]
    written = load_file(out)
    assert {t.dtype for t in written.values()} == {torch.float16}
    for key, tensor in load_file(path).items():
        torch.testing.assert_close(written[key], tensor, rtol=0, atol=0)


def test_converted_lycoris_metadata_says_lora(tiny_sdxl: TinySdxl, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "loha.safetensors"
    g = torch.Generator().manual_seed(0)
    stem = SDXL_KOHYA_MODULES[0][0]
    save_file(
        {
            f"{stem}.hada_w1_a": torch.randn(32, 2, generator=g),
            f"{stem}.hada_w1_b": torch.randn(2, 32, generator=g),
            f"{stem}.hada_w2_a": torch.randn(32, 2, generator=g),
            f"{stem}.hada_w2_b": torch.randn(2, 32, generator=g),
            f"{stem}.alpha": torch.tensor(1.0),
        },
        str(path),
        metadata={
            "ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps({"algo": "loha", "conv_dim": "4"}),
            "ss_network_dim": "2",
        },
    )
    adapter = read_adapter(path, base_modules=_shapes(WeightSource.open(tiny_sdxl.folder)))
    (record,) = adapter.conversions
    assert record.kind == "loha" and record.key == stem
    out = write_adapter(adapter, tmp_path / "out.safetensors")[0]
    with safe_open(str(out), "pt") as fh:
        metadata = fh.metadata()
        keys = set(fh.keys())
    assert metadata["ss_network_module"] == "networks.lora"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4"}
    assert metadata["ss_network_dim"] == str(record.rank)
    assert f"{stem}.lora_down.weight" in keys and not any("hada" in k for k in keys)
