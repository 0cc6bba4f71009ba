"""Weights-only drift over every same-named tensor, streamed from safetensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.drift import weight_drift
from core.errors import NonFiniteError
from core.weights import WeightSource


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _base(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    src = {
        "layer.0.weight": torch.randn(8, 6, generator=_g(0)),
        "layer.0.bias": torch.randn(8, generator=_g(1)),
        "norm.weight": torch.ones(6),
        "dropped.weight": torch.randn(4, 4, generator=_g(2)),
        "widened.weight": torch.randn(3, 3, generator=_g(3)),
        "position_ids": torch.arange(5),  # an integer buffer: not a weight
        "scale": torch.tensor(2.0),
    }
    tgt = {
        "layer.0.weight": src["layer.0.weight"] + 0.1 * torch.randn(8, 6, generator=_g(4)),
        "layer.0.bias": src["layer.0.bias"],
        "norm.weight": torch.full((6,), 1.5),
        "widened.weight": torch.randn(3, 5, generator=_g(5)),
        "position_ids": torch.arange(5) + 1,
        "scale": torch.tensor(2.0),
        "new.weight": torch.randn(2, 2, generator=_g(6)),
    }
    return _base(tmp_path / "a.safetensors", src), _base(tmp_path / "b.safetensors", tgt), src, tgt


def test_drift_is_the_relative_change_of_the_shared_tensors(pair) -> None:
    a, b, src, tgt = pair
    drift = weight_drift(WeightSource.open(a), WeightSource.open(b))
    shared = ["layer.0.weight", "layer.0.bias", "norm.weight", "scale"]
    diff = sum(float((tgt[k].double() - src[k].double()).square().sum()) for k in shared)
    norm = sum(float(src[k].double().square().sum()) for k in shared)
    assert diff > 0
    assert drift.drift == pytest.approx(math.sqrt(diff / norm), rel=1e-12)
    assert drift.compared == 4 and drift.compared_parameters == 48 + 8 + 6 + 1
    assert drift.source_tensors == 6  # the integer buffer is not counted
    assert (drift.missing, drift.reshaped, drift.target_only) == (1, 1, 1)
    assert drift.missing_share == pytest.approx(2 / 6)
    assert drift.missing_parameter_share == pytest.approx(25 / (48 + 8 + 6 + 16 + 9 + 1))
    assert set(drift.missing_examples) == {"dropped.weight", "widened.weight"}
    assert drift.largest[0].name == "norm.weight" and drift.largest[0].relative == pytest.approx(
        0.5
    )
    assert drift.max_relative == pytest.approx(0.5)
    same = weight_drift(WeightSource.open(a), WeightSource.open(a))
    assert same.drift == 0.0 and same.missing == 0 and same.max_relative == 0.0


def test_row_blocks_give_the_same_answer(pair) -> None:
    a, b, _, _ = pair
    whole = weight_drift(WeightSource.open(a), WeightSource.open(b))
    blocks = weight_drift(WeightSource.open(a), WeightSource.open(b), chunk_bytes=8)
    assert blocks.drift == pytest.approx(whole.drift, rel=1e-12)


def test_diffusers_parts_compare_by_prefixed_name_and_half_precision_reads(tmp_path: Path) -> None:
    w = torch.randn(4, 4, generator=_g(0))
    for name, scale in (("a", 1.0), ("b", 1.01)):
        _base(
            tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors",
            {"x.weight": (w * scale).half()},
        )
        _base(tmp_path / name / "text_encoder" / "model.safetensors", {"x.weight": w.bfloat16()})
    drift = weight_drift(WeightSource.open(tmp_path / "a"), WeightSource.open(tmp_path / "b"))
    assert drift.compared == 2 and {c.name for c in drift.largest} == {
        "unet.x.weight",
        "text_encoder.x.weight",
    }
    unet = next(c for c in drift.largest if c.name == "unet.x.weight")
    assert unet.relative == pytest.approx(0.01, rel=0.05) and 0 < drift.drift < 0.01


def test_non_finite_tensors_are_named(tmp_path: Path) -> None:
    bad = torch.ones(3, 3)
    bad[1, 1] = float("inf")
    a = _base(tmp_path / "a.safetensors", {"w.weight": torch.ones(3, 3)})
    b = _base(tmp_path / "b.safetensors", {"w.weight": bad})
    with pytest.raises(NonFiniteError, match=r"w\.weight"):
        weight_drift(WeightSource.open(a), WeightSource.open(b))


@pytest.mark.realmodels
def test_real_successor_drifts_little_and_random_feed_forward_a_lot(
    minilm_weights: Path, pristine_weights: Path, random_ffn_minilm: Path
) -> None:
    source = WeightSource.open(minilm_weights)
    real = weight_drift(source, WeightSource.open(pristine_weights))
    assert 0 < real.drift < 0.01 and real.missing == 0 and real.compared == real.source_tensors
    noise = weight_drift(source, WeightSource.open(random_ffn_minilm))
    assert noise.drift > 0.3 and noise.missing == 0
    assert (
        "intermediate.dense.weight" in noise.largest[0].name
        or "output.dense.weight" in noise.largest[0].name
    )
