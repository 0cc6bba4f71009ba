"""PEFT folders: scale semantics against PEFT itself, round trips, writing, and bad inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter
from core.errors import (
    CorruptFileError,
    NonFiniteError,
    PickleRefusedError,
    ShapeMismatchError,
    UnknownLayoutError,
    UnpairedTensorError,
)
from core.formats import read_adapter, write_adapter
from core.formats.peft import implied_rank_and_scale, pattern_value
from tests.core.lora_models import (
    bert_inputs,
    bert_output,
    merged_deltas,
    peft_adapter,
    tiny_bert,
    with_deltas,
)

pytestmark = pytest.mark.interop

QUERY_VALUE = ["query", "value"]


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny_bert(0)


@pytest.fixture(scope="module")
def patterned(bert: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A PEFT adapter with rank_pattern and alpha_pattern, and PEFT's own merged dW."""
    folder = tmp_path_factory.mktemp("peft") / "patterned"
    wrapped = peft_adapter(
        bert,
        folder,
        targets=QUERY_VALUE,
        r=4,
        alpha=8,
        rank_pattern={"encoder.layer.1.attention.self.query": 8},
        alpha_pattern={"value": 3},
    )
    return folder, merged_deltas(wrapped, bert)


def _assert_deltas(adapter: LoraAdapter, reference: dict[str, torch.Tensor]) -> None:
    assert set(adapter.modules) == set(reference)
    for name, delta in reference.items():
        assert float(delta.abs().max()) > 1e-3, "reference update must not be trivially zero"
        torch.testing.assert_close(adapter.modules[name].delta(), delta, rtol=0, atol=1e-6)


def test_alpha_and_patterns_give_peft_update(patterned: tuple[Path, dict]) -> None:
    folder, reference = patterned
    adapter = read_adapter(folder)
    assert adapter.layout is AdapterLayout.PEFT and adapter.kind is AdapterKind.LORA
    scales = {n: (m.rank, m.scale) for n, m in adapter.modules.items()}
    assert scales["encoder.layer.0.attention.self.query"] == (4, 2.0)
    assert scales["encoder.layer.1.attention.self.query"] == (8, 1.0)
    assert scales["encoder.layer.0.attention.self.value"] == (4, 0.75)
    _assert_deltas(adapter, reference)


def test_rslora_gives_peft_update(bert: nn.Module, tmp_path: Path) -> None:
    wrapped = peft_adapter(
        bert, tmp_path / "rs", targets=QUERY_VALUE, r=4, alpha=8, use_rslora=True
    )
    adapter = read_adapter(tmp_path / "rs")
    assert {m.scale for m in adapter.modules.values()} == {8 / 2.0}  # alpha / sqrt(r)
    _assert_deltas(adapter, merged_deltas(wrapped, bert))


def test_round_trip_keeps_tensors_scales_and_config(
    patterned: tuple[Path, dict], tmp_path: Path
) -> None:
    folder, _ = patterned
    first = read_adapter(folder)
    written = write_adapter(first, tmp_path / "out")
    assert {p.name for p in written} == {"adapter_model.safetensors", "adapter_config.json"}
    second = read_adapter(tmp_path / "out")
    assert list(second.modules) == list(first.modules)
    for name, module in first.modules.items():
        assert torch.equal(second.modules[name].up, module.up)
        assert torch.equal(second.modules[name].down, module.down)
        assert second.modules[name].scale == module.scale
    original = json.loads((folder / "adapter_config.json").read_text())
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules"):
        assert config[key] == original[key], key
    assert set(load_file(tmp_path / "out" / "adapter_model.safetensors")) == set(
        load_file(folder / "adapter_model.safetensors")
    )


def test_changed_scales_are_folded_and_load_in_peft(
    bert: nn.Module, patterned: tuple[Path, dict], tmp_path: Path
) -> None:
    from peft import PeftModel

    folder, _ = patterned
    adapter = read_adapter(folder)
    # new scales no config of this adapter implies: the writer must fold them into B
    modules = {
        n: dataclasses.replace(m, scale=m.scale * (1.5 + i))
        for i, (n, m) in enumerate(adapter.modules.items())
    }
    changed = dataclasses.replace(adapter, modules=modules)
    write_adapter(changed, tmp_path / "folded")
    config = json.loads((tmp_path / "folded" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["use_rslora"] is False
    assert config["rank_pattern"] == config["alpha_pattern"]
    reread = read_adapter(tmp_path / "folded")
    assert {m.scale for m in reread.modules.values()} == {1.0}
    deltas = {n: m.delta() for n, m in changed.modules.items()}
    loaded = PeftModel.from_pretrained(tiny_bert(0), str(tmp_path / "folded")).eval()
    expected = bert_output(with_deltas(bert, deltas), bert_inputs())
    assert not torch.allclose(expected, bert_output(bert, bert_inputs()), atol=1e-4)
    torch.testing.assert_close(bert_output(loaded, bert_inputs()), expected, rtol=0, atol=1e-5)


class _Nested(nn.Module):
    """Module names where one is a dotted suffix of another: ``proj`` and ``block.proj``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.proj = nn.Linear(8, 8)
        self.block = nn.Module()
        self.block.proj = nn.Linear(8, 8)
        self.block.proj_x = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.proj_x(self.block.proj(self.proj(x)))


def test_per_module_ranks_survive_pattern_overlap(tmp_path: Path) -> None:
    """Ranks 6, 2, 2 on proj, block.proj, block.proj_x (default r = 2): PEFT's suffix regex
    applies a ``proj`` pattern to block.proj too; the written patterns must not let it."""
    from peft import PeftModel

    from core.adapter import LoraModule

    g = torch.Generator().manual_seed(0)
    modules = {
        name: LoraModule(
            name, torch.randn(8, r, generator=g), torch.randn(r, 8, generator=g), scale=0.5
        )
        for name, r in (("proj", 6), ("block.proj", 2), ("block.proj_x", 2))
    }
    adapter = LoraAdapter(modules=modules, kind=AdapterKind.LORA, layout=AdapterLayout.PEFT)
    write_adapter(adapter, tmp_path / "nested")
    config = json.loads((tmp_path / "nested" / "adapter_config.json").read_text())
    assert config["r"] == 2 and pattern_value({"proj": 6}, "block.proj") == 6  # the trap
    assert "block.proj" in config["rank_pattern"]
    for name, module in modules.items():
        assert implied_rank_and_scale(config, name) == (module.rank, 1.0)
    model = _Nested().eval()
    loaded = PeftModel.from_pretrained(_Nested().eval(), str(tmp_path / "nested")).eval()
    x = torch.randn(3, 8, generator=g)
    expected = with_deltas(model, {n: m.delta() for n, m in modules.items()})(x)
    assert not torch.allclose(expected, model(x), atol=1e-3)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)


def test_pattern_value_follows_peft_rule() -> None:
    patterns = {"value": 3, "layer.1.attention.self.query": 8}
    assert pattern_value(patterns, "encoder.layer.0.attention.self.value") == 3
    assert pattern_value(patterns, "encoder.layer.1.attention.self.query") == 8
    assert pattern_value(patterns, "encoder.layer.11.attention.self.query") is None
    assert pattern_value(patterns, "encoder.layer.0.attention.self.query") is None


# --- bad inputs -------------------------------------------------------------------------------


@pytest.fixture
def simple(bert: nn.Module, tmp_path: Path) -> Path:
    folder = tmp_path / "simple"
    peft_adapter(bert, folder, targets=QUERY_VALUE)
    return folder


def _rewrite(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path))


KEY = "base_model.model.encoder.layer.0.attention.self.query"


def test_truncated_file_is_corrupt(simple: Path) -> None:
    path = simple / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptFileError) as err:
        read_adapter(simple)
    assert "adapter_model.safetensors" in str(err.value)


def test_nan_tensor_names_file_and_key(simple: Path) -> None:
    _rewrite(simple, lambda t: t[KEY + ".lora_B.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(NonFiniteError) as err:
        read_adapter(simple)
    assert KEY + ".lora_B.weight" in str(err.value) and "adapter_model.safetensors" in str(
        err.value
    )


def test_missing_half_names_key(simple: Path) -> None:
    _rewrite(simple, lambda t: t.pop(KEY + ".lora_B.weight"))
    with pytest.raises(UnpairedTensorError) as err:
        read_adapter(simple)
    assert KEY + ".lora_A.weight" in str(err.value)


def test_rank_mismatch_between_halves(simple: Path) -> None:
    _rewrite(simple, lambda t: t.__setitem__(KEY + ".lora_B.weight", torch.ones(64, 3)))
    with pytest.raises(ShapeMismatchError) as err:
        read_adapter(simple)
    assert KEY in str(err.value) and "rank" in str(err.value)


def test_rank_disagreeing_with_config(simple: Path) -> None:
    def edit(t: dict) -> None:
        t[KEY + ".lora_A.weight"] = torch.ones(5, 64)
        t[KEY + ".lora_B.weight"] = torch.ones(64, 5)

    _rewrite(simple, edit)
    with pytest.raises(ShapeMismatchError, match="rank 5 in the file but 4"):
        read_adapter(simple)


def test_pickle_weights_refused_unless_opted_in(simple: Path) -> None:
    tensors = load_file(simple / "adapter_model.safetensors")
    (simple / "adapter_model.safetensors").unlink()
    torch.save(tensors, simple / "adapter_model.bin")
    with pytest.raises(PickleRefusedError) as err:
        read_adapter(simple)
    assert "adapter_model.bin" in str(err.value)
    adapter = read_adapter(simple, allow_pickle=True)
    assert len(adapter.modules) == 4


def test_dora_config_without_magnitudes_names_the_module(simple: Path) -> None:
    config = json.loads((simple / "adapter_config.json").read_text())
    config["use_dora"] = True
    (simple / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownLayoutError, match="no lora_magnitude_vector") as err:
        read_adapter(simple)
    assert "attention.self.query.lora_A.weight" in str(err.value)


def test_stray_tensor_names_key(simple: Path) -> None:
    _rewrite(
        simple, lambda t: t.__setitem__("base_model.model.pooler.dense.weight", torch.ones(4, 4))
    )
    with pytest.raises(UnknownLayoutError) as err:
        read_adapter(simple)
    assert "base_model.model.pooler.dense.weight" in str(err.value)


def test_weights_without_config_refused(simple: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((simple / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UnknownLayoutError, match=r"adapter_config\.json"):
        read_adapter(lone)


def test_unknown_keys_name_file_and_sample_key(tmp_path: Path) -> None:
    path = tmp_path / "mystery.safetensors"
    save_file({"something.else": torch.ones(2, 2)}, str(path))
    with pytest.raises(UnknownLayoutError) as err:
        read_adapter(path)
    assert "mystery.safetensors" in str(err.value) and "something.else" in str(err.value)


# --- detection and atomic writes --------------------------------------------------------------


def test_detect_layout(simple: Path, tmp_path: Path) -> None:
    from core.formats import detect_layout

    assert detect_layout(simple) is AdapterLayout.PEFT
    assert detect_layout(simple / "adapter_model.safetensors") is AdapterLayout.PEFT
    adapter = read_adapter(simple)
    kohya = write_adapter(adapter, tmp_path / "k.safetensors", layout=AdapterLayout.KOHYA)[0]
    diffusers = write_adapter(adapter, tmp_path / "d.safetensors", layout=AdapterLayout.DIFFUSERS)[
        0
    ]
    assert detect_layout(kohya) is AdapterLayout.KOHYA
    assert detect_layout(diffusers) is AdapterLayout.DIFFUSERS
    shapes = {name: module.shape for name, module in adapter.modules.items()}
    for path in (kohya, diffusers):  # conversions keep dW
        again = read_adapter(path, base_modules=shapes)
        assert set(again.modules) == set(adapter.modules)
        for name, module in again.modules.items():
            torch.testing.assert_close(
                module.delta(), adapter.modules[name].delta(), rtol=0, atol=1e-6
            )


def test_a_failed_write_leaves_the_previous_files(
    simple: Path, tmp_path: Path, monkeypatch
) -> None:
    import core.formats.tensorfile as tensorfile

    adapter = read_adapter(simple)
    target = tmp_path / "k.safetensors"
    write_adapter(adapter, target, layout=AdapterLayout.KOHYA)
    before = target.read_bytes()

    def crash(tensors: dict, path: str, metadata: dict | None = None) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tensorfile, "save_file", crash)
    changed = dataclasses.replace(
        adapter, modules={n: dataclasses.replace(m, scale=3.0) for n, m in adapter.modules.items()}
    )
    with pytest.raises(OSError, match="disk full"):
        write_adapter(changed, target, layout=AdapterLayout.KOHYA)
    assert target.read_bytes() == before
    with pytest.raises(OSError, match="disk full"):
        write_adapter(changed, tmp_path / "new-peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors", "simple"]


def test_renamed_module_is_written_under_its_new_name(simple: Path, tmp_path: Path) -> None:
    """A transfer may feed target module X from source module Y: X's keys must be X's."""
    adapter = read_adapter(simple)
    old, new = "encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.key"
    modules = {
        (new if n == old else n): (dataclasses.replace(m, name=new) if n == old else m)
        for n, m in adapter.modules.items()
    }
    assert modules[new].source_key == f"base_model.model.{old}"  # the stale key it carries
    write_adapter(dataclasses.replace(adapter, modules=modules), tmp_path / "out")
    keys = set(load_file(tmp_path / "out" / "adapter_model.safetensors"))
    assert f"base_model.model.{new}.lora_A.weight" in keys
    assert f"base_model.model.{old}.lora_A.weight" not in keys
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert new in config["target_modules"] and "query" in config["target_modules"]


def test_fan_in_fan_out_refused(simple: Path) -> None:
    config = json.loads((simple / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = True
    (simple / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownLayoutError, match="fan_in_fan_out"):
        read_adapter(simple)
