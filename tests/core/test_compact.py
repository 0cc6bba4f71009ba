"""Compact LoRA-X: encode / write / read / decode round trips, the file format, base fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.adapter import AdapterKind, AdapterLayout
from core.digest import tensor_digest
from core.errors import BaseMismatchError, SubspaceError, UnknownLayoutError
from core.factorize import FactorStore
from core.formats import COMPACT_FORMAT, decode_compact, encode_compact, read_adapter, write_adapter
from core.weights import WeightSource
from tests.core.synthetic import (
    adapter_of,
    full_factors,
    lora_module,
    lorax_module,
    random_matrix,
    relative_error,
    write_base,
)

WEIGHTS = {
    "blocks.0.attn.q": random_matrix(24, 16, seed=1),
    "blocks.0.attn.v": random_matrix(16, 16, seed=2),
    "blocks.1.mlp.up": random_matrix(32, 16, seed=3),
}
DIGESTS = {name: tensor_digest(w) for name, w in WEIGHTS.items()}
FACTORS = full_factors(WEIGHTS)


def _lorax_adapter(full: bool = False):
    modules = [
        lorax_module("blocks.0.attn.q", FACTORS["blocks.0.attn.q"], 6, seed=10, full=full),
        lorax_module(
            "blocks.0.attn.v", FACTORS["blocks.0.attn.v"], 8, seed=11, full=full, scale=2.0
        ),
        lorax_module("blocks.1.mlp.up", FACTORS["blocks.1.mlp.up"], 4, seed=12, full=full),
    ]
    return adapter_of(modules)


@pytest.mark.parametrize("full", [False, True])
def test_encode_write_read_decode_round_trip(tmp_path: Path, full: bool) -> None:
    adapter = _lorax_adapter(full)
    compact = encode_compact(adapter, FACTORS, DIGESTS)
    assert compact.kind is AdapterKind.LORAX_COMPACT and compact.layout is AdapterLayout.COMPACT
    for name, module in compact.modules.items():
        original = adapter.modules[name]
        assert module.is_compact and module.base_digest == DIGESTS[name]
        assert module.ds is not None and module.ds.ndim == (2 if full else 1)
        torch.testing.assert_close(module.ds, original.ds, rtol=0, atol=1e-5)
    path = write_adapter(compact, tmp_path / "style.safetensors")[0]
    read = read_adapter(path)
    assert read.kind is AdapterKind.LORAX_COMPACT and set(read.modules) == set(adapter.modules)
    decoded = decode_compact(path, FACTORS, DIGESTS)
    assert decoded.kind is AdapterKind.LORAX and decoded.layout is AdapterLayout.PEFT
    assert decoded.config == adapter.config and decoded.metadata["note"] == "synthetic"
    for name, module in decoded.modules.items():
        original = adapter.modules[name]
        assert float(original.delta().abs().max()) > 1e-3
        assert module.scale == 1.0 and torch.equal(module.up, FACTORS[name].U[:, : module.rank])
        assert relative_error(module.delta(), original.delta()) < 1e-5


def test_file_format(tmp_path: Path) -> None:
    path = write_adapter(
        encode_compact(_lorax_adapter(), FACTORS, DIGESTS), tmp_path / "c.safetensors"
    )[0]
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
        keys = set(fh.keys())
    assert metadata["lorax.format"] == COMPACT_FORMAT == "lorax-compact"
    assert metadata["lorax.version"] == "1" and metadata["lorax.layout"] == "peft"
    table = json.loads(metadata["lorax.modules"])
    assert keys == {f"{name}.ds" for name in WEIGHTS}
    assert table["blocks.0.attn.q"] == {
        "shape": [24, 16],
        "rank": 6,
        "ds": "diagonal",
        "base_digest": DIGESTS["blocks.0.attn.q"],
        "weight_shape": None,
        "source_key": None,
    }
    assert load_file(path)["blocks.0.attn.v.ds"].shape == (8,)


def test_compact_module_without_base_holds_only_ds(tmp_path: Path) -> None:
    compact = encode_compact(_lorax_adapter(), FACTORS, DIGESTS)
    module = compact.modules["blocks.0.attn.v"]
    assert module.rank == 8 and module.shape == (16, 16) and module.up.is_meta
    with pytest.raises(ValueError, match="decode"):
        module.delta()
    expected = _lorax_adapter().modules["blocks.0.attn.v"].energy()
    assert module.energy() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="compact"):
        write_adapter(compact, tmp_path / "peft", layout=AdapterLayout.PEFT)


def test_decoding_against_another_base_is_refused() -> None:
    compact = encode_compact(_lorax_adapter(), FACTORS, DIGESTS)
    other = {name: w + 0.01 * random_matrix(*w.shape, seed=99) for name, w in WEIGHTS.items()}
    other_digests = {name: tensor_digest(w) for name, w in other.items()}
    assert other_digests["blocks.0.attn.q"] != DIGESTS["blocks.0.attn.q"]
    with pytest.raises(BaseMismatchError) as err:
        decode_compact(compact, full_factors(other), other_digests)
    message = str(err.value)
    assert "blocks.0.attn.q" in message
    assert DIGESTS["blocks.0.attn.q"] in message and other_digests["blocks.0.attn.q"] in message


def test_plain_lora_is_not_in_the_subspace() -> None:
    adapter = adapter_of([lora_module("blocks.0.attn.q", 24, 16, 4, seed=5)], kind=AdapterKind.LORA)
    with pytest.raises(SubspaceError) as err:
        encode_compact(adapter, FACTORS, DIGESTS)
    assert "blocks.0.attn.q" in str(err.value) and "residual" in str(err.value)


def test_full_rank_projection_gets_a_full_k_by_k_ds() -> None:
    """On a square full-rank base any update is in the span of all p singular vectors: a
    rank-3 plain LoRA encodes as a (16, 16) dS and decodes back."""
    adapter = adapter_of([lora_module("blocks.0.attn.v", 16, 16, 3, seed=6)], kind=AdapterKind.LORA)
    compact = encode_compact(adapter, FACTORS, DIGESTS)
    ds = compact.modules["blocks.0.attn.v"].ds
    assert ds is not None and ds.shape == (16, 16)
    decoded = decode_compact(compact, FACTORS, DIGESTS)
    original = adapter.modules["blocks.0.attn.v"].delta()
    assert relative_error(decoded.modules["blocks.0.attn.v"].delta(), original) < 1e-5


def test_digests_from_a_weight_file_through_the_factor_store(tmp_path: Path) -> None:
    source = WeightSource.open(write_base(tmp_path / "base.safetensors", WEIGHTS))
    store = FactorStore(source)
    assert all(source.digest(n) == DIGESTS[n] for n in WEIGHTS)  # file digest == memory digest
    compact = encode_compact(_lorax_adapter(), store.view())
    decoded = decode_compact(compact, store.view())
    for name, module in decoded.modules.items():
        assert relative_error(module.delta(), _lorax_adapter().modules[name].delta()) < 1e-5


def test_unsupported_version_and_stray_tensor(tmp_path: Path) -> None:
    path = write_adapter(
        encode_compact(_lorax_adapter(), FACTORS, DIGESTS), tmp_path / "c.safetensors"
    )[0]
    tensors = load_file(path)
    with safe_open(str(path), "pt") as fh:
        metadata = dict(fh.metadata())
    save_file(
        tensors, str(tmp_path / "v2.safetensors"), metadata={**metadata, "lorax.version": "2"}
    )
    with pytest.raises(UnknownLayoutError, match="version"):
        read_adapter(tmp_path / "v2.safetensors")
    save_file(
        {**tensors, "extra.ds": torch.ones(2)}, str(tmp_path / "x.safetensors"), metadata=metadata
    )
    with pytest.raises(UnknownLayoutError, match=r"extra\.ds"):
        read_adapter(tmp_path / "x.safetensors")
