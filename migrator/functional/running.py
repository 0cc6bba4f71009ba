"""Probe sets for a component pair, and running them through one built component.

Text components get the probe kinds asked for: ``token_ids`` (only where both bases share one
vocabulary: the same ids must mean the same tokens), ``words`` (whole words of the source's
vocabulary, read by each side's own tokenizer) and ``text`` (windows of the shipped licence
texts). A UNet gets ``latents``: seeded latents at ``latent_size`` (at most the config's
``sample_size``), timesteps and encoder states; an SDXL-style UNet also seeded ``text_embeds``
and the usual ``time_ids`` (size, crop 0, size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.functional import Probe, Representations
from core.probes import (
    LatentProbes,
    TextProbes,
    TokenProbes,
    generic_text,
    latent_probes,
    random_token_ids,
    random_words,
    whole_words,
)
from migrator.functional.models import LoadedComponent, captured, pool

__all__ = ["ProbeSettings", "encode", "probe_sets"]


@dataclass(frozen=True)
class ProbeSettings:
    """What sizes the probes (the lead's ``functional_*`` settings).

    Attributes:
        count: probes per kind (n of CKA; the effect correlation runs over n (n-1)/2 pairs).
        length: tokens per token-id probe, words per word or text probe (tokens are cut at
            ``length`` plus the tokenizer's special tokens).
        kinds: text probe kinds to run, of ``token_ids``, ``words``, ``text``.
        seed: the probes' seed.
        batch_size: probes per forward pass (bounds activation memory).
        latent_size: UNet latent height and width (at most the config's ``sample_size``).
        encoder_length: UNet encoder-state tokens.
    """

    count: int = 64
    length: int = 32
    kinds: tuple[str, ...] = ("token_ids", "words", "text")
    seed: int = 0
    batch_size: int = 32
    latent_size: int = 16
    encoder_length: int = 16


def _vocab(tokenizer: Any) -> dict[str, int] | None:
    return None if tokenizer is None else dict(tokenizer.get_vocab())


def _text_probes(
    source: LoadedComponent, target: LoadedComponent, settings: ProbeSettings, notes: list[str]
) -> list[Probe]:
    out: list[Probe] = []
    s_tok, t_tok = source.tokenizer, target.tokenizer
    for kind in settings.kinds:
        if kind == "token_ids":
            s_vocab, t_vocab = _vocab(s_tok), _vocab(t_tok)
            size = int(getattr(source.model.config, "vocab_size", 0) or 0)
            if s_vocab != t_vocab or size != int(
                getattr(target.model.config, "vocab_size", 0) or 0
            ):
                notes.append("token_ids: the bases' vocabularies differ; kind skipped")
                continue
            specials = list(getattr(s_tok, "all_special_ids", []) or []) if s_tok else []
            if s_tok is not None:
                size = min(size, len(s_tok))
            out.append(random_token_ids(size, count=settings.count, length=settings.length,
                                        seed=settings.seed, exclude=specials))  # fmt: skip
        elif kind in ("words", "text"):
            if s_tok is None or t_tok is None:
                notes.append(f"{kind}: a base has no tokenizer; kind skipped")
                continue
            if kind == "words":
                special = list(getattr(s_tok, "all_special_tokens", []) or [])
                words = whole_words(s_tok.get_vocab().keys(), special=special)
                out.append(random_words(words, count=settings.count, length=settings.length,
                                        seed=settings.seed))  # fmt: skip
            else:
                out.append(
                    generic_text(count=settings.count, length=settings.length, seed=settings.seed)
                )
        else:
            raise ValueError(f"unknown probe kind {kind!r} (token_ids, words, text)")
    return out


def _unet_probes(
    source: LoadedComponent, target: LoadedComponent, settings: ProbeSettings, notes: list[str]
) -> list[Probe]:
    keys = ("in_channels", "cross_attention_dim", "addition_embed_type")
    s_cfg: Any = source.model.config
    t_cfg: Any = target.model.config
    differ = [k for k in keys if getattr(s_cfg, k, None) != getattr(t_cfg, k, None)]
    dim = getattr(s_cfg, "cross_attention_dim", None)
    if differ or not isinstance(dim, int):
        why = (
            f"the UNets differ in {', '.join(differ)}"
            if differ
            else "cross_attention_dim is not one int"
        )
        notes.append(f"latents: {why}; kind skipped")
        return []
    size = min(settings.latent_size, int(s_cfg.sample_size), int(t_cfg.sample_size))
    return [
        latent_probes(count=settings.count, channels=int(s_cfg.in_channels), height=size, width=size,
                      encoder_dim=dim, encoder_length=settings.encoder_length, seed=settings.seed)
    ]  # fmt: skip


def probe_sets(
    source: LoadedComponent, target: LoadedComponent, settings: ProbeSettings
) -> tuple[list[Probe], list[str]]:
    """The probe sets both sides of a component pair can run, and notes on kinds left out."""
    notes: list[str] = []
    if source.spec.kind == "unet":
        return _unet_probes(source, target, settings, notes), notes
    return _text_probes(source, target, settings, notes), notes


def _special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text (e.g. [CLS] ... [SEP])."""
    full = list(tokenizer("hello")["input_ids"])
    bare = list(tokenizer("hello", add_special_tokens=False)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def _token_batches(component: LoadedComponent, probe: Probe, settings: ProbeSettings):
    tok = component.tokenizer
    if isinstance(probe, TokenProbes):
        before, after = _special_ids(tok) if tok is not None else ([], [])
        n = probe.count
        ids = torch.cat([torch.tensor([before] * n, dtype=torch.int64).reshape(n, -1), probe.ids,
                         torch.tensor([after] * n, dtype=torch.int64).reshape(n, -1)], dim=1)  # fmt: skip
        for start in range(0, n, settings.batch_size):
            chunk = ids[start : start + settings.batch_size]
            yield {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        return
    assert isinstance(probe, TextProbes) and tok is not None
    if tok.pad_token is None:  # decoder tokenizers often have none; padding is masked anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    before, after = _special_ids(tok)
    limit = settings.length + len(before) + len(after)
    for start in range(0, probe.count, settings.batch_size):
        texts = list(probe.texts[start : start + settings.batch_size])
        enc = tok(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _unet_kwargs(component: LoadedComponent, probe: LatentProbes, sl: slice) -> dict[str, Any]:
    dev = component.device
    kwargs: dict[str, Any] = {
        "sample": probe.latents[sl].to(dev),
        "timestep": probe.timesteps[sl].to(dev),
        "encoder_hidden_states": probe.encoder_states[sl].to(dev),
        "return_dict": False,
    }
    cfg: Any = component.model.config
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        n = probe.latents[sl].shape[0]
        width = int(cfg.projection_class_embeddings_input_dim) - 6 * int(
            cfg.addition_time_embed_dim
        )
        g = torch.Generator().manual_seed(probe.seed + 1)
        embeds = torch.randn(probe.count, width, generator=g)[sl]
        side = 8 * probe.latents.shape[-1]
        time_ids = torch.tensor([[side, side, 0, 0, side, side]] * n, dtype=torch.float32)
        kwargs["added_cond_kwargs"] = {"text_embeds": embeds.to(dev), "time_ids": time_ids.to(dev)}
    return kwargs


@torch.inference_mode()
def encode(
    component: LoadedComponent, probe: Probe, settings: ProbeSettings, layers: Sequence[str] = ()
) -> Representations:
    """Run ``probe`` through ``component``: final representations (pooled as the component's
    ``pooling`` says) and the pooled output of each of ``layers`` (names without the component
    prefix), float64 on the CPU."""
    finals: list[torch.Tensor] = []
    per_layer: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    with captured(component, layers) as outputs:
        if isinstance(probe, LatentProbes):
            for start in range(0, probe.count, settings.batch_size):
                sl = slice(start, start + settings.batch_size)
                sample = component.model(**_unet_kwargs(component, probe, sl))[0]
                finals.append(pool(sample, None, "flatten"))
                for layer in layers:
                    per_layer[layer].append(pool(outputs[layer], None, "mean"))
        else:
            for batch in _token_batches(component, probe, settings):
                batch = {k: v.to(component.device) for k, v in batch.items()}
                hidden = component.model(**batch).last_hidden_state
                mask = batch["attention_mask"]
                finals.append(pool(hidden, mask, component.spec.pooling))
                for layer in layers:
                    per_layer[layer].append(pool(outputs[layer], mask, "mean"))
    return Representations(
        final=torch.cat(finals), layers={k: torch.cat(v) for k, v in per_layer.items()}
    )
