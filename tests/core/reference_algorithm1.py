"""The paper's Algorithm 1 (appendix F), transcribed literally: the reference for project mode.

Kept as close to the pseudocode as Python allows (``ref_lora`` maps kohya-style
``<module>.lora.up.weight`` / ``<module>.lora.down.weight`` keys to tensors; ``tar_model_tensors``
maps the target's weight keys to tensors, in the same module order). It forms U U^T and V^T V on
purpose: it is the reference, not the implementation.
"""

from __future__ import annotations

import torch


def algorithm1(
    ref_lora: dict[str, torch.Tensor],
    tar_model_tensors: dict[str, torch.Tensor],
    filter_blocks: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    tar_lora = {}
    # The pseudocode zips every adapter key (ups and downs) with the model keys; pairing each
    # module's up key with its weight is the evident intent, so only up keys are zipped here.
    up_keys = [key for key in ref_lora if not key.endswith("down.weight")]
    for key, model_key in zip(up_keys, tar_model_tensors.keys(), strict=True):
        # Consider tensors not in the filter_blocks
        if not key.startswith(tuple(filter_blocks)):
            if key.endswith("down.weight"):
                continue
            tar_model_w = tar_model_tensors[model_key]
            lora_up_w = ref_lora[key]
            lora_down_key = key.replace("lora.up", "lora.down")
            lora_down_w = ref_lora[lora_down_key]
            u_model_w, s_model_w, vh_model_w = torch.linalg.svd(  # noqa: RUF059 (as in the paper)
                tar_model_w, full_matrices=False
            )
            # to project LoRA weights on base model weight
            proj_lora_up_w = u_model_w @ u_model_w.T @ lora_up_w
            proj_lora_down_w = lora_down_w @ vh_model_w.T @ vh_model_w
            tar_lora[key] = proj_lora_up_w
            tar_lora[lora_down_key] = proj_lora_down_w
    return tar_lora
