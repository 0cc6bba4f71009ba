"""A module that matches no base module is refused with its likely cause, not a blanket
"another model?": another family by metadata, a missing pipeline component, another naming or
block layout for a module kind the base has, or a kind the base does not hold."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter, LoraModule
from core.errors import MissingModuleError
from core.formats import UnmatchedReason, resolve_modules

BASE = {
    "unet.down_blocks.0.attentions.0.proj_in": (8, 8),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
    "unet.up_blocks.0.resnets.0.conv1": (8, 72),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (8, 8),
}


def _adapter(stem: str, metadata: dict[str, str] | None = None) -> LoraAdapter:
    module = LoraModule(stem, torch.ones(8, 2), torch.ones(2, 8), source_key=stem)
    return LoraAdapter(
        {stem: module}, AdapterKind.LORA, AdapterLayout.KOHYA, metadata=metadata or {}, source="x"
    )


@pytest.mark.parametrize(
    ("stem", "metadata", "cause"),
    [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
            {"ss_base_model_version": "sdxl_base_v1-0"},
            "metadata says it is for SDXL but the base looks like SD 1.x/2.x",
        ),
        (
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
            None,
            "the base has no text_encoder_2",
        ),
        (
            "lora_unet_down_blocks_3_attentions_1_transformer_blocks_0_attn1_to_q",
            None,
            "the base has to_q modules but none at this path",
        ),
        ("lora_unet_down_blocks_0_widget_gizmo", None, "no module of this kind (widget_gizmo)"),
    ],
)
def test_likely_cause_is_named(stem: str, metadata: dict[str, str] | None, cause: str) -> None:
    adapter = _adapter(stem, metadata)
    _, report = resolve_modules(adapter, BASE, strict=False)
    (unmatched,) = report.unmatched
    assert unmatched.reason is UnmatchedReason.NO_SUCH_MODULE and cause in unmatched.detail
    with pytest.raises(MissingModuleError) as err:
        resolve_modules(adapter, BASE)
    assert f"[{stem}]" in str(err.value) and cause in str(err.value)
    assert "is the adapter for another model?" not in str(err.value)


def test_sdxl_metadata_on_an_sdxl_base_is_no_mismatch() -> None:
    base = {**BASE, "unet.add_embedding.linear_1": (8, 8)}
    adapter = _adapter("lora_unet_down_blocks_0_widget_gizmo", {"ss_base_model_version": "sdxl"})
    _, report = resolve_modules(adapter, base, strict=False)
    assert "metadata" not in report.unmatched[0].detail
    assert (
        dataclasses.asdict(report.unmatched[0])["adapter_name"]
        == "lora_unet_down_blocks_0_widget_gizmo"
    )
