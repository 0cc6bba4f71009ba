"""Adapters as the service writes them after a transfer: metadata that names the new base."""

from __future__ import annotations

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter, ModuleConversion
from migrator.adapters import conversion_notes, retarget_metadata


def test_kohya_metadata_names_the_new_base_and_drops_the_old_hashes() -> None:
    before = {
        "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
        "ss_sd_model_hash": "be9edd61",
        "ss_new_sd_model_hash": "31e35c80fc",
        "ss_network_dim": "16",
    }
    after = retarget_metadata(before, "sdxl/2")
    assert after["ss_sd_model_name"] == "sdxl/2" and after["ss_network_dim"] == "16"
    assert "ss_sd_model_hash" not in after and "ss_new_sd_model_hash" not in after
    assert after["lorax.transferred_to"] == "sdxl/2"
    assert before["ss_sd_model_name"] == "sd_xl_base_1.0.safetensors"  # the input is untouched
    assert "ss_sd_model_name" not in retarget_metadata({"format": "pt"}, "x/1")


def test_conversions_are_told_with_the_energy_they_kept() -> None:
    adapter = LoraAdapter(
        {},
        AdapterKind.LORA,
        AdapterLayout.KOHYA,
        conversions=(ModuleConversion("lora_unet_mid_block_attn1_to_q", "loha", 8, 0.973),),
    )
    (note,) = conversion_notes(adapter)
    assert "loha" in note and "rank-8" in note and "97.3%" in note
