"""The functional check on real models: tiny ones built from configs, and all-MiniLM-L6-v2.

Bases are saved the way users store them (transformers ``save_pretrained`` with safetensors, a
sentence-transformers folder, an MLflow transformers-flavour folder, a diffusers ``unet/``) and
built back by ``migrator.functional``; adapters are applied as weight deltas.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter, LoraModule
from core.atc import compute_atc
from core.factorize import FactorStore
from core.matching import match_modules
from core.probes import generic_corpus
from core.selection import ModuleSelector
from core.transfer import transfer_adapter
from core.weights import WeightSource
from migrator.functional import (
    FunctionalConfig,
    NotRunnableError,
    ProbeSettings,
    check_adapter,
    check_bases,
    find_runnable,
    open_pair,
    runnable_problem,
)
from tests.core.lora_models import BERT_KW, perturbed, tiny_bert, tiny_unet

pytestmark = pytest.mark.interop

SMALL = FunctionalConfig(ProbeSettings(count=24, length=8, batch_size=16, latent_size=8))
QUERIES = [f"encoder.layer.{i}.attention.self.query" for i in range(2)]


def _tokenizer(folder: Path, *, reverse: bool = False) -> None:
    """A BERT WordPiece tokenizer whose 100-entry vocabulary is words of the licence texts
    (``reverse``: the same words with other ids)."""
    from transformers import BertTokenizer

    words = sorted({w.lower() for w in generic_corpus() if w.isalpha() and len(w) > 2})[:95]
    words = words[::-1] if reverse else words
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(str(folder))


def _save_bert(model: torch.nn.Module, folder: Path, *, tokenizer: bool = True) -> Path:
    model.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer:
        _tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def berts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("berts")
    base = tiny_bert(0)
    return {
        "source": _save_bert(base, root / "source"),
        "same": _save_bert(copy.deepcopy(base), root / "same"),
        "near": _save_bert(perturbed(base, eps=0.02, seed=1), root / "near"),
        "far": _save_bert(tiny_bert(7), root / "far"),
    }


def _adapter(modules: dict[str, tuple[int, int]], seed: int, scale: float = 0.3) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {
            name: LoraModule(
                name, torch.randn(m, 4, generator=g) * scale, torch.randn(4, n, generator=g) * scale
            )
            for name, (m, n) in modules.items()
        },
        AdapterKind.LORA,
        AdapterLayout.PEFT,
    )


def test_runnable_layouts_and_the_reasons_others_are_not(
    berts: dict[str, Path], tmp_path: Path
) -> None:
    plain = find_runnable(berts["source"])
    assert plain.layout == "transformers" and plain.components[0].tokenizer_dir == berts["source"]
    assert find_runnable(berts["source"] / "model.safetensors").path == berts["source"]
    mlflow = tmp_path / "mlflow"
    shutil.copytree(berts["source"], mlflow / "model")
    shutil.move(mlflow / "model" / "vocab.txt", tmp_path / "vocab.txt")
    (mlflow / "components" / "tokenizer").mkdir(parents=True)
    shutil.copy(tmp_path / "vocab.txt", mlflow / "components" / "tokenizer" / "vocab.txt")
    (mlflow / "MLmodel").write_text("flavors:\n  transformers: {}\n")
    found = find_runnable(mlflow)
    assert found.layout == "mlflow-transformers"
    assert found.components[0].tokenizer_dir == mlflow / "components" / "tokenizer"

    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({"w.weight": torch.ones(2, 2)}, str(bare / "model.safetensors"))
    assert "no config.json" in (runnable_problem(bare) or "")
    custom = tmp_path / "custom"
    shutil.copytree(berts["source"], custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    assert "own code" in (runnable_problem(custom) or "")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(berts["source"] / "config.json", pickled / "config.json")
    torch.save({"w": torch.ones(1)}, pickled / "pytorch_model.bin")
    assert "no safetensors" in (runnable_problem(pickled) or "")
    assert runnable_problem(berts["source"]) is None


def test_representation_agreement_orders_the_targets(berts: dict[str, Path]) -> None:
    values = {}
    for name in ("same", "near", "far"):
        with open_pair(berts["source"], berts[name], SMALL) as pair:
            check = check_bases(pair, layer_pairs=[("encoder.layer.0", "encoder.layer.0")])
        kinds = {p.kind for _, a in check.components for p in a.probes}
        assert kinds == {"token_ids", "words", "text"} and check.notes == ()
        layers = check.components[0][1].probes[0].layers
        assert [(x.source, x.target) for x in layers] == [("encoder.layer.0", "encoder.layer.0")]
        values[name] = check.cka
        assert check.as_dict()["components"]["model"]["text"]["probes"] == 24
    assert values["same"] == pytest.approx(1.0, abs=1e-9)
    assert values["same"] > values["near"] > values["far"]
    assert values["far"] < 0.5


def test_adapter_agreement_and_restored_weights(berts: dict[str, Path]) -> None:
    modules = dict.fromkeys(QUERIES, (BERT_KW["hidden_size"], BERT_KW["hidden_size"]))
    adapter = _adapter(modules, seed=3)
    with open_pair(berts["source"], berts["same"], SMALL) as pair:
        before = pair.source[""].model.encoder.layer[0].attention.self.query.weight.clone()
        same = check_adapter(pair, adapter, adapter)
        after = pair.source[""].model.encoder.layer[0].attention.self.query.weight
        assert torch.equal(before, after)  # the update was taken out again
        other = check_adapter(pair, adapter, _adapter(modules, seed=4))
        nothing = check_adapter(
            pair, adapter, LoraAdapter({}, AdapterKind.LORA, AdapterLayout.PEFT)
        )
    assert same.agreement == pytest.approx(1.0, abs=1e-9)
    assert other.agreement is not None and other.agreement < 0.7
    assert nothing.agreement is None
    reasons = [p.reason for _, a in nothing.components for p in a.probes]
    assert all("changes nothing on the target" in (r or "") for r in reasons)
    assert nothing.as_dict()["agreement"] is None


def test_vocabularies_that_differ_skip_token_id_probes(
    berts: dict[str, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other-vocab"
    shutil.copytree(berts["near"], other, ignore=shutil.ignore_patterns("vocab.txt", "tokenizer*"))
    _tokenizer(other, reverse=True)
    with open_pair(berts["source"], other, SMALL) as pair:
        check = check_bases(pair)
    assert {p.kind for p in check.components[0][1].probes} == {"words", "text"}
    assert any("vocabularies differ" in n for n in check.notes)


def test_an_unbuildable_target_says_why(berts: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(berts["source"], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(NotRunnableError, match="broken"):
        open_pair(berts["source"], broken, SMALL)
    with pytest.raises(NotRunnableError, match="functional_max_parameters"):
        open_pair(
            berts["source"], berts["same"], FunctionalConfig(SMALL.probes, max_parameters=1000)
        )


@pytest.fixture(scope="module")
def unets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unets")
    base = tiny_unet(0)
    out = {}
    for name, model in (("source", base), ("near", perturbed(base, eps=0.02, seed=2))):
        model.save_pretrained(str(root / name / "unet"), safe_serialization=True)
        out[name] = root / name
    return out


def test_a_diffusion_unet_runs_on_seeded_latents(unets: dict[str, Path]) -> None:
    assert find_runnable(unets["source"]).layout == "diffusers"
    source = WeightSource.open(unets["source"])
    names = [n for n in source.names if n.endswith(("attn1.to_q", "attn2.to_k"))]
    assert names and all(n.startswith("unet.") for n in names)
    adapter = _adapter({n: source.info(n).shape for n in names}, seed=5, scale=0.2)
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    with open_pair(unets["source"], unets["near"], SMALL) as pair:
        check = check_bases(pair, layer_pairs=[(layer, layer)])
        moved = check_adapter(pair, adapter, adapter)
    ((component, agreement),) = check.components
    assert component == "unet" and agreement.probes[0].kind == "latents"
    assert 0.5 < check.cka < 1.0 and agreement.probes[0].layers[0].cka > 0.5
    assert moved.agreement is not None and 0.5 < moved.agreement < 1.0


@pytest.mark.realmodels
@pytest.mark.slow
def test_random_feed_forward_successor_has_atc_zero_but_disagrees(
    minilm_weights: Path, pristine_weights: Path, random_ffn_minilm: Path
) -> None:
    """The issue's control: attention untouched (ATC 0), every feed-forward weight noise."""
    config = FunctionalConfig(ProbeSettings(count=48, length=24))
    source = WeightSource.open(minilm_weights)
    selector = ModuleSelector()
    s_store = FactorStore(source, selector.select(source.names))
    adapter = _adapter({n: source.info(n).shape for n in s_store.names}, seed=0, scale=0.05)
    results = {}
    for name, target_path in (("pristine", pristine_weights), ("random-ffn", random_ffn_minilm)):
        target = WeightSource.open(target_path)
        t_store = FactorStore(target, selector.select(target.names))
        atc = compute_atc(s_store.view(rank=32), t_store.view(rank=32), k=32)
        moved = transfer_adapter(adapter, s_store, t_store, match_modules(atc, min_similarity=0.5))
        with open_pair(minilm_weights, target_path, config) as pair:
            results[name] = (
                atc.atc,
                check_bases(pair).cka,
                check_adapter(pair, adapter, moved.adapter),
            )
    atc, cka, effect = results["random-ffn"]
    assert atc == pytest.approx(0.0, abs=1e-6)  # ATC sees nothing
    assert cka < 0.5 and effect.agreement is not None and effect.agreement < 0.3
    atc, cka, effect = results["pristine"]
    assert atc < 0.01 and cka > 0.9
    assert effect.agreement is not None and effect.agreement > 0.8
    assert find_runnable(minilm_weights).layout == "sentence-transformers"
    assert find_runnable(minilm_weights).components[0].pooling == "mean"
