"""The heatmaps a person opens in the MLflow UI: sized to the module count, a summary per
block (and the full map beside it) for hundreds of modules."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from migrator.heatmaps import FULL_MAP_LIMIT, Match, block_of, heatmap_figures, summarize_blocks


def _names(layers: int, per_layer: int) -> list[str]:
    kinds = ["query", "key", "value", "dense", "extra"][:per_layer]
    return [f"encoder.layer.{i}.attention.{k}" for i in range(layers) for k in kinds]


def _pair(n_layers: int, per_layer: int = 4) -> tuple[np.ndarray, list[str]]:
    names = _names(n_layers, per_layer)
    rng = np.random.default_rng(0)
    phi = rng.uniform(0.0, 0.2, (len(names), len(names)))
    np.fill_diagonal(phi, 0.95)
    return phi, names


def _size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(png)).size


def test_one_map_sized_to_the_module_count() -> None:
    sizes = []
    for layers in (2, 12):
        phi, names = _pair(layers)
        figures = heatmap_figures(phi, phi, names, names, title="a -> b", matches=[Match(0, 0)])
        assert list(figures) == ["similarity.png"]
        sizes.append(_size(figures["similarity.png"]))
    assert sizes[0] != sizes[1]
    assert sizes[1][0] > sizes[0][0] and sizes[1][1] > sizes[0][1]


def test_hundreds_of_modules_get_a_block_summary_and_the_full_map() -> None:
    phi, names = _pair(40, 5)  # 200 modules
    assert len(names) > FULL_MAP_LIMIT
    matches = [Match(i, i) for i in range(len(names))] + [Match(5, 0, rematched=True)]
    figures = heatmap_figures(phi, phi, names, names, title="a -> b", matches=matches)
    assert list(figures) == ["similarity.png", "similarity_full.png"]
    summary, full = (_size(figures[k]) for k in ("similarity.png", "similarity_full.png"))
    assert summary[0] < full[0]


def test_block_summary() -> None:
    assert block_of("encoder.layer.3.attention.self.query", 1) == "encoder.layer.3"
    assert (
        block_of("down_blocks.1.attentions.0.transformer_blocks.2.attn1.to_q", 2)
        == "down_blocks.1.attentions.0"
    )
    phi, names = _pair(3)
    matches = [Match(i, i) for i in range(len(names))] + [Match(0, 4, rematched=True)]
    summary, counts, src, tgt = summarize_blocks(phi, names, names, matches)
    assert src == tgt == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert np.allclose(np.diag(summary), 0.95)
    assert summary[0, 1] < 0.2 and summary[1, 0] < 0.2
    assert counts.tolist() == [[4, 1, 0], [0, 4, 0], [0, 0, 4]]
