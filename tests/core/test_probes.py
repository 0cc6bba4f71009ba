"""Probe construction: deterministic, seeded, data-free."""

from __future__ import annotations

import pytest
import torch

from core.probes import (
    PROBE_TEXT_FILES,
    ProbeKind,
    generic_corpus,
    generic_text,
    latent_probes,
    random_token_ids,
    random_words,
    whole_words,
)


def test_token_ids_are_seeded_and_avoid_special_ids() -> None:
    a = random_token_ids(30, count=16, length=12, seed=0, exclude=[0, 1, 2])
    b = random_token_ids(30, count=16, length=12, seed=0, exclude=[0, 1, 2])
    c = random_token_ids(30, count=16, length=12, seed=1, exclude=[0, 1, 2])
    assert a.ids.shape == (16, 12) and a.ids.dtype == torch.int64 and a.count == 16
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert int(a.ids.min()) >= 3 and int(a.ids.max()) <= 29
    assert a.kind is ProbeKind.TOKEN_IDS


def test_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        random_token_ids(30, count=3, length=4, seed=0)
    with pytest.raises(ValueError, match="no token id left"):
        random_token_ids(3, count=4, length=4, seed=0, exclude=[0, 1, 2])
    with pytest.raises(ValueError, match="no whole-word"):
        random_words([], count=4, length=4, seed=0)


def test_whole_words_of_each_vocabulary_style() -> None:
    wordpiece = ["[CLS]", "[SEP]", "the", "##ing", "cat", "a", "x1", "run"]
    assert whole_words(wordpiece, special=["[CLS]", "[SEP]"]) == ("cat", "run", "the")
    bpe = ["Ġthe", "the", "Ġcat", "ing", "Ġ12", "<s>", "Ġrun"]
    assert whole_words(bpe, special=["<s>"]) == ("cat", "run", "the")
    sentencepiece = ["▁the", "▁cat", "ing", "<unk>", "▁a"]
    assert whole_words(sentencepiece) == ("cat", "the")


def test_word_and_text_probes_are_seeded() -> None:
    words = ("alpha", "beta", "gamma", "delta")
    a = random_words(words, count=8, length=5, seed=0)
    assert a == random_words(words, count=8, length=5, seed=0)
    assert a != random_words(words, count=8, length=5, seed=1)
    assert all(len(t.split()) == 5 and set(t.split()) <= set(words) for t in a.texts)
    corpus = generic_corpus()
    text = " ".join(corpus)
    g = generic_text(count=10, length=20, seed=3)
    assert g.kind is ProbeKind.TEXT and g.count == 10
    assert g == generic_text(count=10, length=20, seed=3)
    assert all(len(t.split()) == 20 and t in text for t in g.texts)
    assert len(set(g.texts)) == 10


def test_the_shipped_generic_text_is_the_licence_texts() -> None:
    assert [f.name for f in PROBE_TEXT_FILES] == ["Apache-2.0.txt", "GPL-3.txt"]
    corpus = generic_corpus()
    assert len(corpus) > 7000
    assert corpus[:2] == ("Apache", "License")
    with pytest.raises(ValueError, match="fewer than length"):
        generic_text(count=4, length=10, seed=0, corpus=["a", "b"])


def test_latent_probes() -> None:
    a = latent_probes(
        count=5, channels=4, height=8, width=6, encoder_dim=32, encoder_length=7, seed=0,
        num_timesteps=50,
    )  # fmt: skip
    assert a.latents.shape == (5, 4, 8, 6) and a.encoder_states.shape == (5, 7, 32)
    assert a.timesteps.shape == (5,) and int(a.timesteps.min()) >= 0 and int(a.timesteps.max()) < 50
    b = latent_probes(
        count=5, channels=4, height=8, width=6, encoder_dim=32, encoder_length=7, seed=0,
        num_timesteps=50,
    )  # fmt: skip
    assert torch.equal(a.latents, b.latents) and torch.equal(a.timesteps, b.timesteps)
