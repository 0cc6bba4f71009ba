"""Training and evaluation of the transfer-quality experiment.

LoRA-X adapters are made with the product's own code (:func:`core.training.inject_lorax`, trained
here, exported with :func:`core.training.export_lorax`); the plain LoRA baseline is made with PEFT
and read back with :func:`core.formats.read_adapter`, as a user's adapter would be. Both train the
same objective: a supervised contrastive loss (SupCon, temperature ``tau``) on the mean-pooled
sentence embeddings of class-balanced batches. The held-out metric is leave-one-out 1-nearest-
neighbour accuracy (cosine) among the held-out examples.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.quality_data import TaskData
from bench.quality_models import embed, encode
from core.adapter import LoraAdapter
from core.formats import read_adapter
from core.selection import DEFAULT_PATTERNS, ModuleSelector
from core.training import constrain_lorax_, export_lorax, inject_lorax

__all__ = [
    "BERT_ATTENTION",
    "TrainConfig",
    "apply_adapter",
    "evaluate",
    "layers_selector",
    "supcon_loss",
    "train_lora",
    "train_lorax",
]

BERT_ATTENTION = ModuleSelector(include=DEFAULT_PATTERNS)
"""The modules adapted: the attention projections (query, key, value, attention output)."""


def layers_selector(layers: Sequence[int]) -> ModuleSelector:
    """The attention projections of the given encoder layers only."""
    which = "|".join(str(i) for i in layers)
    return ModuleSelector(
        include=(
            rf"^encoder\.layer\.({which})\.attention\.(self\.(query|key|value)|output\.dense)$",
        )
    )


_PEFT_TARGETS = r".*\.(attention\.self\.(query|key|value)|attention\.output\.dense)$"


@dataclass(frozen=True)
class TrainConfig:
    """One adapter's training recipe (the same for every base and seed).

    Attributes:
        steps: optimizer steps.
        per_class: examples of each class per batch (batch = per_class x classes).
        max_length: tokens per text (the intent cues are at the start of a summary).
        tau: SupCon temperature.
        lorax_rank: r of the LoRA-X (r < p = 384, so that subspace mode truncates).
        lorax_full: a full r x r dS (the paper's form for features that must be recombined).
        lorax_lr: Adam learning rate of dS.
        lora_rank, lora_alpha, lora_lr: the plain LoRA baseline.
    """

    steps: int = 40
    per_class: int = 2
    max_length: int = 24
    tau: float = 0.05
    lorax_rank: int = 128
    lorax_full: bool = True
    lorax_lr: float = 3e-3
    lora_rank: int = 16
    lora_alpha: int = 16
    lora_lr: float = 1e-3


def supcon_loss(emb: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) of normalised embeddings (n, d):
    mean over anchors of -mean_{positives} log softmax_{j != i}(e_i . e_j / tau)."""
    n = emb.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    logits = (emb @ emb.T / tau).masked_fill(eye, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = logits.log_softmax(dim=1).masked_fill(eye, 0.0)
    per_anchor = (log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)
    return -per_anchor.mean()


def _batches(
    data: TaskData, cfg: TrainConfig, seed: int
) -> Iterator[tuple[list[str], torch.Tensor]]:
    rng = random.Random(seed)
    pools = data.by_class()
    for _ in range(cfg.steps):
        texts: list[str] = []
        labels: list[int] = []
        for label, pool in enumerate(pools):
            picked = rng.sample(pool, min(cfg.per_class, len(pool)))
            texts += picked
            labels += [label] * len(picked)
        yield texts, torch.tensor(labels)


def _train(
    model: nn.Module, params: list[torch.Tensor], lr: float, tokenizer: Any, data: TaskData,
    cfg: TrainConfig, seed: int, after_step: Any = None,
) -> list[float]:  # fmt: skip
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for texts, labels in _batches(data, cfg, seed):
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt"
        )
        loss = supcon_loss(embed(model, batch), labels, cfg.tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    model.eval()
    return losses


def train_lorax(
    model: nn.Module,
    tokenizer: Any,
    data: TaskData,
    cfg: TrainConfig,
    seed: int,
    selector: ModuleSelector = BERT_ATTENTION,
) -> tuple[LoraAdapter, list[float]]:
    """Train a LoRA-X on the ``selector``'s modules of ``model`` (modified in place: layers
    injected) and export it.

    Returns:
        (the expanded LoRA-X adapter: up = U_r, down = dS V_r^T; the training losses).
    """
    torch.manual_seed(seed)
    layers = inject_lorax(model, selector, rank=cfg.lorax_rank, full=cfg.lorax_full)
    params = [layer.ds for layer in layers.values()]
    losses = _train(
        model, params, cfg.lorax_lr, tokenizer, data, cfg, seed, lambda: constrain_lorax_(model)
    )
    return export_lorax(model), losses


def train_lora(
    model: nn.Module,
    tokenizer: Any,
    data: TaskData,
    cfg: TrainConfig,
    seed: int,
    base_modules: Mapping[str, tuple[int, int]],
) -> tuple[LoraAdapter, list[float]]:
    """Train a plain LoRA with PEFT on ``model``, save it as a PEFT folder and read it back with
    the product's reader (names resolved onto ``base_modules``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=_PEFT_TARGETS
    )
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    losses = _train(peft_model, params, cfg.lora_lr, tokenizer, data, cfg, seed)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        adapter = read_adapter(Path(tmp), base_modules=base_modules)
    return adapter, losses


@torch.no_grad()
def apply_adapter(model: nn.Module, adapter: LoraAdapter) -> nn.Module:
    """Merge ``adapter`` into ``model``'s weights in place (W += scale * up @ down)."""
    for name, module in adapter.modules.items():
        weight = model.get_submodule(name).weight
        weight += module.delta().to(weight.dtype)
    return model


def evaluate(model: nn.Module, tokenizer: Any, data: TaskData, cfg: TrainConfig) -> float:
    """Leave-one-out 1-NN accuracy (%) of the held-out examples' embeddings."""
    emb = encode(model, tokenizer, [ex.text for ex in data.heldout], max_length=cfg.max_length)
    labels = torch.tensor([ex.label for ex in data.heldout])
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    return 100.0 * float((labels[sim.argmax(1)] == labels).float().mean())
