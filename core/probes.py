"""Deterministic, data-free probe inputs for the functional check (``core.functional``).

A probe set is a fixed, seeded batch of inputs that needs no task data. Four kinds:

- ``token_ids``: token ids drawn uniformly from a vocabulary, special tokens excluded;
- ``words``: random whole-word tokens of a tokenizer's vocabulary, joined by spaces (texts that
  each model's own tokenizer reads, so that two bases with different vocabularies see the same
  words);
- ``text``: windows of generic text unrelated to any task: the licence texts shipped in
  ``core/probe_texts/`` (``Apache-2.0.txt`` and ``GPL-3.txt``, verbatim copies of Debian's
  ``/usr/share/common-licenses/Apache-2.0`` and ``GPL-3``; both texts allow verbatim copies);
- ``latents``: for a diffusion UNet, seeded Gaussian latents, uniform integer timesteps and
  Gaussian encoder hidden states.

Every function is a pure function of its arguments: the same arguments give the same probes on
every machine (``torch.Generator`` and ``random.Random`` seeded explicitly; vocabularies sorted
before sampling).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path

import torch

__all__ = [
    "PROBE_TEXT_FILES",
    "LatentProbes",
    "ProbeKind",
    "TextProbes",
    "TokenProbes",
    "generic_corpus",
    "generic_text",
    "latent_probes",
    "random_token_ids",
    "random_words",
    "whole_words",
]

PROBE_TEXT_FILES: tuple[Path, ...] = tuple(
    Path(__file__).with_name("probe_texts") / name for name in ("Apache-2.0.txt", "GPL-3.txt")
)
"""The generic text the ``text`` probes are cut from (licence texts, shipped with ``core``)."""

_WORD = re.compile(r"^[A-Za-z]{2,}$")
_BPE_MARKERS = ("Ġ", "▁")  # byte-level BPE (GPT-2, Llama 3) and SentencePiece word starts


class ProbeKind(StrEnum):
    """What a probe set holds."""

    TOKEN_IDS = "token_ids"  # random token ids (count, length)
    WORDS = "words"  # random whole-word tokens joined as text
    TEXT = "text"  # windows of the shipped generic text
    LATENTS = "latents"  # UNet latents, timesteps, encoder states


@dataclass(frozen=True, eq=False)
class TokenProbes:
    """Random token ids.

    Attributes:
        ids: (count, length) int64.
        seed: the generator seed.
    """

    ids: torch.Tensor
    seed: int
    kind: ProbeKind = ProbeKind.TOKEN_IDS

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class TextProbes:
    """Probe texts (``words`` or ``text`` kind), one per probe."""

    texts: tuple[str, ...]
    seed: int
    kind: ProbeKind

    @property
    def count(self) -> int:
        return len(self.texts)


@dataclass(frozen=True, eq=False)
class LatentProbes:
    """Inputs of a diffusion UNet's forward pass.

    Attributes:
        latents: (count, channels, height, width) float32, N(0, 1).
        timesteps: (count,) int64, uniform in [0, num_timesteps).
        encoder_states: (count, encoder_length, encoder_dim) float32, N(0, 1).
        seed: the generator seed.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    encoder_states: torch.Tensor
    seed: int
    kind: ProbeKind = ProbeKind.LATENTS

    @property
    def count(self) -> int:
        return int(self.latents.shape[0])


def _check_sizes(count: int, length: int) -> None:
    if count < 4:
        raise ValueError(f"probe count must be at least 4 (debiased CKA needs n >= 4), got {count}")
    if length < 1:
        raise ValueError(f"probe length must be positive, got {length}")


def random_token_ids(
    vocab_size: int, *, count: int, length: int, seed: int, exclude: Iterable[int] = ()
) -> TokenProbes:
    """``count`` sequences of ``length`` token ids drawn uniformly, with replacement, from
    ``range(vocab_size)`` minus ``exclude`` (the special tokens).

    Raises:
        ValueError: count < 4, length < 1, or no id left to draw.
    """
    _check_sizes(count, length)
    banned = set(exclude)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in banned], dtype=torch.int64)
    if allowed.numel() == 0:
        raise ValueError(f"no token id left in a vocabulary of {vocab_size} after exclusions")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(allowed.numel(), (count, length), generator=g)
    return TokenProbes(ids=allowed[picks], seed=seed)


def whole_words(vocab: Iterable[str], *, special: Iterable[str] = ()) -> tuple[str, ...]:
    """The whole-word tokens of a tokenizer vocabulary, sorted.

    A token is a whole word when it is alphabetic (2 letters or more) once its word-start marker
    is removed. Byte-level BPE (``Ġword``) and SentencePiece (``▁word``) vocabularies mark word
    starts, so only marked tokens count there; a WordPiece vocabulary marks continuations
    (``##ing``) instead, so every unmarked alphabetic token counts.
    """
    banned = set(special)
    tokens = [t for t in vocab if t not in banned]
    marked = {m: sum(t.startswith(m) for t in tokens) for m in _BPE_MARKERS}
    marker = max(marked, key=lambda m: marked[m])
    words: set[str] = set()
    if marked[marker] >= max(1, len(tokens) // 10):
        for token in tokens:
            if token.startswith(marker) and _WORD.match(token[len(marker) :]):
                words.add(token[len(marker) :])
    else:
        words = {t for t in tokens if _WORD.match(t)}
    return tuple(sorted(words))


def random_words(words: Sequence[str], *, count: int, length: int, seed: int) -> TextProbes:
    """``count`` texts of ``length`` words drawn uniformly, with replacement, from ``words``.

    Raises:
        ValueError: count < 4, length < 1, or no words.
    """
    _check_sizes(count, length)
    if not words:
        raise ValueError("no whole-word tokens to draw probe words from")
    rng = random.Random(seed)
    texts = tuple(" ".join(rng.choices(words, k=length)) for _ in range(count))
    return TextProbes(texts=texts, seed=seed, kind=ProbeKind.WORDS)


@cache
def generic_corpus() -> tuple[str, ...]:
    """The words of the shipped generic text (:data:`PROBE_TEXT_FILES`), in file order."""
    words: list[str] = []
    for file in PROBE_TEXT_FILES:
        words += file.read_text(encoding="utf-8").split()
    return tuple(words)


def generic_text(
    *, count: int, length: int, seed: int, corpus: Sequence[str] | None = None
) -> TextProbes:
    """``count`` windows of ``length`` consecutive words of the generic text, at seeded random
    offsets (``corpus``: the words to cut from; default :func:`generic_corpus`).

    Raises:
        ValueError: count < 4, length < 1, or a corpus shorter than ``length`` words.
    """
    _check_sizes(count, length)
    words = generic_corpus() if corpus is None else tuple(corpus)
    if len(words) < length:
        raise ValueError(f"the generic text has {len(words)} words, fewer than length {length}")
    rng = random.Random(seed)
    starts = [rng.randrange(len(words) - length + 1) for _ in range(count)]
    texts = tuple(" ".join(words[s : s + length]) for s in starts)
    return TextProbes(texts=texts, seed=seed, kind=ProbeKind.TEXT)


def latent_probes(
    *,
    count: int,
    channels: int,
    height: int,
    width: int,
    encoder_dim: int,
    encoder_length: int,
    seed: int,
    num_timesteps: int = 1000,
) -> LatentProbes:
    """Seeded UNet inputs: latents and encoder states N(0, 1), timesteps uniform in
    [0, ``num_timesteps``).

    Raises:
        ValueError: count < 4 or a non-positive size.
    """
    _check_sizes(count, encoder_length)
    if min(channels, height, width, encoder_dim, num_timesteps) < 1:
        raise ValueError("latent probe sizes must be positive")
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(count, channels, height, width, generator=g)
    timesteps = torch.randint(num_timesteps, (count,), generator=g)
    states = torch.randn(count, encoder_length, encoder_dim, generator=g)
    return LatentProbes(latents=latents, timesteps=timesteps, encoder_states=states, seed=seed)
