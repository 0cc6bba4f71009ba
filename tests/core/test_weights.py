"""WeightSource: layouts, header-only listing, one-tensor loads, digests, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import core.weights as weights_module
from core.digest import tensor_digest
from core.errors import (
    CorruptFileError,
    InputError,
    MissingModuleError,
    NonFiniteError,
    PickleRefusedError,
    UnknownLayoutError,
)
from core.weights import WeightSource


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.to_q.weight": torch.randn(8, 6, generator=g),
        "blocks.0.attn.to_q.bias": torch.randn(8, generator=g),
        "blocks.0.proj_in.weight": torch.randn(8, 6, 1, 1, generator=g),  # 1x1 conv
        "blocks.0.conv.weight": torch.randn(4, 3, 3, 3, generator=g),  # 3x3 conv
        "blocks.0.norm.weight": torch.ones(8),
        "embeddings.position_ids.weight": torch.arange(6).reshape(1, 6),  # int: not a weight
        "blocks.0.half.weight": torch.randn(5, 4, generator=g).half(),
        "blocks.0.brain.weight": torch.randn(5, 4, generator=g).bfloat16(),
    }


@pytest.fixture
def single(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    return path


def test_single_file_lists_matrices_and_skips_the_rest_with_reasons(single: Path) -> None:
    source = WeightSource.open(single)
    assert set(source.names) == {
        "blocks.0.attn.to_q",
        "blocks.0.proj_in",
        "blocks.0.conv",
        "blocks.0.half",
        "blocks.0.brain",
    }
    info = source.info("blocks.0.proj_in")
    assert (info.shape, info.stored_shape, info.dtype) == ((8, 6), (8, 6, 1, 1), "F32")
    assert info.key == "blocks.0.proj_in.weight" and info.file == single
    conv = source.info("blocks.0.conv")  # a 3x3 convolution is the matrix (out, in * 3 * 3)
    assert (conv.shape, conv.stored_shape) == ((4, 27), (4, 3, 3, 3))
    skipped = source.skipped()
    assert "1-D" in skipped["blocks.0.norm"]
    assert "I64" in skipped["embeddings.position_ids"]
    with pytest.raises(MissingModuleError, match="1-D"):
        source.matrix("blocks.0.norm")
    assert source.info("blocks.0.half").dtype == "F16"


def test_matrix_is_float32_2d_and_reshapes_convs(single: Path) -> None:
    source = WeightSource.open(single)
    expected = _tensors()
    conv = source.matrix("blocks.0.proj_in")
    assert conv.shape == (8, 6) and conv.dtype == torch.float32
    assert torch.equal(conv, expected["blocks.0.proj_in.weight"].reshape(8, 6))
    kernel = source.matrix("blocks.0.conv")
    assert torch.equal(kernel, expected["blocks.0.conv.weight"].reshape(4, 27))
    half = source.matrix("blocks.0.half")
    assert half.dtype == torch.float32
    assert torch.equal(half, expected["blocks.0.half.weight"].float())


def test_matrix_loads_only_the_requested_tensor(single: Path, monkeypatch) -> None:
    requested: list[str] = []
    real_open = weights_module.safe_open

    class Spy:
        def __init__(self, *args, **kwargs) -> None:
            self._inner = real_open(*args, **kwargs)

        def __enter__(self):
            self._handle = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def get_tensor(self, key: str) -> torch.Tensor:
            requested.append(key)
            return self._handle.get_tensor(key)

    monkeypatch.setattr(weights_module, "safe_open", Spy)
    source = WeightSource.open(single)
    assert requested == []  # opening reads headers only
    source.matrix("blocks.0.attn.to_q")
    assert requested == ["blocks.0.attn.to_q.weight"]


def test_digest_from_file_bytes_equals_digest_of_the_tensor(single: Path) -> None:
    source = WeightSource.open(single)
    digests = {}
    for name in source.names:
        from_bytes = source.digest(name)
        assert from_bytes == tensor_digest(source.stored_tensor(name))
        digests[name] = from_bytes
    assert len(set(digests.values())) == len(digests)  # different tensors, different digests
    # stored dtype and shape count: the 1x1 conv's digest is of its 4-D tensor
    flat = tensor_digest(_tensors()["blocks.0.proj_in.weight"].reshape(8, 6))
    assert digests["blocks.0.proj_in"] != flat


def test_folder_of_files(tmp_path: Path) -> None:
    t = _tensors()
    save_file({"a.weight": t["blocks.0.attn.to_q.weight"]}, str(tmp_path / "part1.safetensors"))
    save_file({"b.weight": t["blocks.0.half.weight"]}, str(tmp_path / "part2.safetensors"))
    source = WeightSource.open(tmp_path)
    assert source.names == ("a", "b")
    assert source.info("b").file.name == "part2.safetensors"


def test_duplicate_key_in_two_files_is_an_unknown_layout(tmp_path: Path) -> None:
    w = torch.zeros(2, 2)
    save_file({"a.weight": w}, str(tmp_path / "x.safetensors"))
    save_file({"a.weight": w}, str(tmp_path / "y.safetensors"))
    with pytest.raises(UnknownLayoutError, match=r"y\.safetensors"):
        WeightSource.open(tmp_path)


def _sharded(folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    shard1 = {"layers.0.q_proj.weight": torch.randn(4, 4, generator=g)}
    shard2 = {"layers.1.q_proj.weight": torch.randn(4, 4, generator=g)}
    save_file(shard1, str(folder / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in shard2}
    index = {"metadata": {"total_size": 128}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard1 | shard2


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    tensors = _sharded(tmp_path)
    source = WeightSource.open(tmp_path)
    assert source.names == ("layers.0.q_proj", "layers.1.q_proj")
    assert torch.equal(source.matrix("layers.1.q_proj"), tensors["layers.1.q_proj.weight"])
    # the index itself can be opened too
    assert WeightSource.open(tmp_path / "model.safetensors.index.json").names == source.names


def test_index_naming_a_missing_shard_is_corrupt(tmp_path: Path) -> None:
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CorruptFileError, match=r"model\.safetensors\.index\.json.*00002"):
        WeightSource.open(tmp_path)


def _diffusers(root: Path) -> None:
    g = torch.Generator().manual_seed(5)
    (root / "unet").mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "scheduler").mkdir()
    (root / "model_index.json").write_text("{}")
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    unet = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.randn(
            6, 6, generator=g
        )
    }
    save_file(unet, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    # a variant next to the standard file must be ignored (same keys, other dtype)
    save_file(
        {k: v.half() for k, v in unet.items()},
        str(root / "unet" / "diffusion_pytorch_model.fp16.safetensors"),
    )
    te = {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g)}
    save_file(te, str(root / "text_encoder" / "model.safetensors"))


def test_diffusers_pipeline_prefixes_subfolders(tmp_path: Path) -> None:
    _diffusers(tmp_path)
    source = WeightSource.open(tmp_path)
    assert source.names == (
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    )
    info = source.info("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert info.file.name == "diffusion_pytorch_model.safetensors" and info.dtype == "F32"
    only_unet = WeightSource.open(tmp_path, subfolders=["unet"])
    assert only_unet.names == (info.name,)
    with pytest.raises(InputError, match="vae"):
        WeightSource.open(tmp_path, subfolders=["vae"])


def test_mlflow_transformers_folder(tmp_path: Path) -> None:
    (tmp_path / "MLmodel").write_text("flavors:\n  transformers: {}\n")
    (tmp_path / "components" / "tokenizer").mkdir(parents=True)
    (tmp_path / "components" / "tokenizer" / "vocab.txt").write_text("a\n")
    _sharded(tmp_path / "model")
    source = WeightSource.open(tmp_path)
    assert source.names == ("layers.0.q_proj", "layers.1.q_proj")  # no "model." prefix


def test_mlflow_folder_with_weights_under_components(tmp_path: Path) -> None:
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "components" / "model").mkdir(parents=True)
    save_file(
        {"q.weight": torch.ones(2, 3)}, str(tmp_path / "components" / "model" / "model.safetensors")
    )
    assert WeightSource.open(tmp_path).names == ("q",)


def test_weights_path_narrows_to_a_subfolder(tmp_path: Path) -> None:
    _sharded(tmp_path / "artifacts" / "deep" / "model")
    with pytest.raises(InputError, match="weights_path"):
        WeightSource.open(tmp_path)  # the error points to where the weights are
    source = WeightSource.open(tmp_path, weights_path="artifacts/deep/model")
    assert len(source) == 2


def test_truncated_file_is_corrupt_and_named(single: Path) -> None:
    data = single.read_bytes()
    single.write_bytes(data[: len(data) - 7])
    with pytest.raises(CorruptFileError, match="truncated") as err:
        WeightSource.open(single)
    assert str(single) in str(err.value)


def test_garbage_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptFileError, match="JSON") as err:
        WeightSource.open(path)
    assert "bad.safetensors" in str(err.value)


def test_nan_tensor_names_file_and_key(tmp_path: Path) -> None:
    w = torch.ones(3, 3)
    w[1, 2] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({"layer.q.weight": w}, str(path))
    source = WeightSource.open(path)  # headers only: fine
    with pytest.raises(NonFiniteError) as err:
        source.matrix("layer.q")
    message = str(err.value)
    assert "nan.safetensors" in message and "layer.q.weight" in message


def test_pickle_checkpoint_is_refused_unless_allowed(tmp_path: Path) -> None:
    tensors = {"layer.q.weight": torch.randn(3, 4), "layer.q.bias": torch.randn(3)}
    path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, path)
    for target in (path, tmp_path):
        with pytest.raises(PickleRefusedError) as err:
            WeightSource.open(target)
        assert "pytorch_model.bin" in str(err.value)
    source = WeightSource.open(tmp_path, allow_pickle=True)
    assert source.names == ("layer.q",)
    assert torch.equal(source.matrix("layer.q"), tensors["layer.q.weight"])
    assert source.digest("layer.q") == tensor_digest(tensors["layer.q.weight"])


def test_pickle_with_objects_is_refused_even_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"layer.q.weight": torch.ones(2, 2), "obj": Path("x")}, path)
    with pytest.raises(CorruptFileError, match="weights_only") as err:
        WeightSource.open(path, allow_pickle=True)
    assert "model.pt" in str(err.value)


def test_safetensors_preferred_over_pickle_in_one_folder(tmp_path: Path) -> None:
    torch.save({"old.weight": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin")
    save_file({"new.weight": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    assert WeightSource.open(tmp_path).names == ("new",)


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no safetensors weights") as err:
        WeightSource.open(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(InputError, match="no such file"):
        WeightSource.open(tmp_path / "absent.safetensors")
    with pytest.raises(UnknownLayoutError):
        (tmp_path / "notes.txt").write_text("hi")
        WeightSource.open(tmp_path / "notes.txt")


def test_pickle_only_subfolder_of_a_pipeline_is_left_out_and_listed(tmp_path: Path) -> None:
    _diffusers(tmp_path)
    (tmp_path / "safety_checker").mkdir()
    torch.save({"proj.weight": torch.ones(2, 2)}, tmp_path / "safety_checker" / "pytorch_model.bin")
    source = WeightSource.open(tmp_path)
    assert not any(name.startswith("safety_checker.") for name in source.names)
    assert "pickle" in source.ignored[tmp_path / "safety_checker"]
    with pytest.raises(PickleRefusedError, match="safety_checker"):
        WeightSource.open(tmp_path, subfolders=["unet", "safety_checker"])
    allowed = WeightSource.open(tmp_path, allow_pickle=True)
    assert "safety_checker.proj" in allowed.names and not allowed.ignored
