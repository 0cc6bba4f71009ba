"""LyCORIS modules in kohya-named files (LoHa, LoKr, LoCon with a Tucker core, full diffs)
turned into LoRA modules: each is expanded to its update dW, and the best rank-r LoRA of dW
(truncated SVD, Eckart-Young) is kept, with the share of ||dW||_F^2 it keeps.

The updates (LyCORIS ``lycoris/modules/loha.py``, ``lokr.py``, ``functional/general.py``; the
scale is alpha / r, alpha = r when the file has no ``.alpha``):

- LoHa: dW = s (w1a @ w1b) * (w2a @ w2b) (elementwise), w1a (out, r), w1b (r, in * k * k),
  r = w1b.shape[0]; with Tucker cores t1, t2 (r, r, kh, kw) and w1a (r, out), w1b (r, in):
  (w1a @ w1b) becomes sum_ij t1[i, j] w1a[i, p] w1b[j, q].
- LoKr: dW = s kron(w1, w2), w1 = ``lokr_w1`` or w1a @ w1b, w2 = ``lokr_w2`` or w2a @ w2b (or
  the Tucker rebuild with ``lokr_t2``); r = the inner dimension of the decomposed factor
  (``lokr_w2_b`` first, else ``lokr_w1_b``); s = 1 when neither factor is decomposed (LyCORIS
  ignores alpha then). A 4-D w2 (c, d, kh, kw) makes a convolution kron(w1[..., None, None], w2).
- LoCon with ``lora_mid`` (r, r, kh, kw), ``lora_down`` (r, in, 1, 1), ``lora_up`` (out, r, 1, 1):
  dW = s up @ (mid x down), exactly a rank-r LoRA of the (out, in * kh * kw) view: no SVD.
- full (``.diff``): dW as stored, s = 1.

The rank of the LoRA (:class:`LycorisOptions`): a fixed ``rank``, else the smallest rank whose
singular values keep ``energy`` of sum sigma_i^2 (PEFT ``convert_to_lora``'s threshold rule),
capped by ``max_rank`` and by the numerical rank of dW. The LoRA is up = U_r diag(S_r),
down = V_r^T, scale 1 (PEFT's convention).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from core.adapter import ModuleConversion
from core.errors import ShapeMismatchError, UnknownLayoutError, UnpairedTensorError

__all__ = [
    "LYCORIS_PARTS",
    "LycorisOptions",
    "expand_lycoris",
    "locon_with_mid",
    "lora_of_update",
    "split_lycoris",
]

LYCORIS_PARTS: tuple[str, ...] = (
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_w1",
    ".lokr_w2",
    ".lokr_t1",
    ".lokr_t2",
    ".lora_mid.weight",
    ".diff",
)
"""Key suffixes of the LyCORIS tensors this module expands (longest first where they nest)."""

_REFUSED: dict[str, str] = {
    ".lokr_t1": "LoKr with a Tucker core on w1 (lokr_t1) is not a LyCORIS layout",
    ".diff_b": "full bias diffs (diff_b) are not supported",
    ".oft_": "OFT/BOFT adapters rotate the base weight: their update needs the base, not supported",
    ".a1.weight": "GLoRA's update depends on the base weight: not supported",
    ".on_input": "IA3 adapters scale activations: not supported",
    ".bias_indices": "LyCORIS bias adapters are not supported",
}


@dataclass(frozen=True)
class LycorisOptions:
    """How LyCORIS modules become LoRA modules.

    Attributes:
        rank: the LoRA rank of every converted module (capped by the update's rank); None to
            choose by ``energy``.
        energy: with ``rank`` None, keep the fewest singular values holding this share of
            ||dW||_F^2, in (0, 1].
        max_rank: a cap on the chosen rank, if any.
    """

    rank: int | None = None
    energy: float = 0.99
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


def _part_of(key: str) -> tuple[str, str] | None:
    for part in LYCORIS_PARTS:
        if key.endswith(part):
            return key[: -len(part)], part
    return None


def split_lycoris(
    keys: Iterable[str], *, path: str | Path
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group LyCORIS tensors by module.

    Returns:
        (stem -> {part suffix -> key}, the other keys in order).

    Raises:
        UnknownLayoutError: a LyCORIS tensor kind that cannot be expanded (names the key).
    """
    modules: dict[str, dict[str, str]] = {}
    rest: list[str] = []
    for key in keys:
        refused = next((why for part, why in _REFUSED.items() if part in key), None)
        if refused is not None:
            raise UnknownLayoutError(refused, path=path, key=key)
        found = _part_of(key)
        if found is None:
            rest.append(key)
        else:
            modules.setdefault(found[0], {})[found[1]] = key
    return modules, rest


def _need(
    parts: Mapping[str, torch.Tensor], names: Iterable[str], stem: str, path: str | Path
) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        have = next(iter(parts))
        raise UnpairedTensorError(
            f"LyCORIS module without its {stem}{missing[0]}", path=path, key=stem + have
        )


def _product(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """a @ b, or with a Tucker core t (r, r, ...): sum_ij t[i, j] a[i, p] b[j, q] -> (p, q, ...)."""
    if t is None:
        return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)
    return torch.einsum("ij...,ip,jq->pq...", t, a, b)


def _loha(
    parts: Mapping[str, torch.Tensor], alpha: float | None, stem: str, path: str | Path
) -> tuple[torch.Tensor, float]:
    _need(parts, (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"), stem, path)
    t1, t2 = parts.get(".hada_t1"), parts.get(".hada_t2")
    if (t1 is None) != (t2 is None):
        raise UnpairedTensorError(
            "LoHa with one Tucker core of two",
            path=path,
            key=stem + (".hada_t1" if t1 is not None else ".hada_t2"),
        )
    r = int(parts[".hada_w1_b"].shape[0])
    first = _product(parts[".hada_w1_a"], parts[".hada_w1_b"], t1)
    second = _product(parts[".hada_w2_a"], parts[".hada_w2_b"], t2)
    if first.shape != second.shape:
        raise ShapeMismatchError(
            f"LoHa factors give {tuple(first.shape)} and {tuple(second.shape)}",
            path=path,
            key=stem + ".hada_w2_a",
        )
    return first * second, (r if alpha is None else alpha) / r


def _lokr(
    parts: Mapping[str, torch.Tensor], alpha: float | None, stem: str, path: str | Path
) -> tuple[torch.Tensor, float]:
    rank: int | None = None
    if ".lokr_w1" in parts:
        w1 = parts[".lokr_w1"]
    else:
        _need(parts, (".lokr_w1_a", ".lokr_w1_b"), stem, path)
        w1 = parts[".lokr_w1_a"] @ parts[".lokr_w1_b"]
        rank = int(parts[".lokr_w1_b"].shape[0])
    if ".lokr_w2" in parts:
        w2 = parts[".lokr_w2"]
    else:
        _need(parts, (".lokr_w2_a", ".lokr_w2_b"), stem, path)
        a, b, t = parts[".lokr_w2_a"], parts[".lokr_w2_b"], parts.get(".lokr_t2")
        w2 = _product(a, b, t) if t is not None else a @ b.reshape(b.shape[0], -1)
        rank = int(b.shape[0])
    if w1.ndim != 2:
        raise ShapeMismatchError(
            f"lokr_w1 must be 2-D, got {tuple(w1.shape)}", path=path, key=stem + ".lokr_w1"
        )
    if w2.ndim > 2:
        w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - 2)))
    scale = 1.0 if rank is None else (rank if alpha is None else alpha) / rank
    return torch.kron(w1, w2), scale


def locon_with_mid(
    parts: Mapping[str, torch.Tensor], down: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, r), down (r, in, kh, kw)) of a LoCon with a Tucker core: exact, no SVD."""
    mid = parts[".lora_mid.weight"]
    down2 = down.reshape(down.shape[0], -1)
    return up.reshape(up.shape[0], -1), torch.einsum("ab...,bi->ai...", mid, down2)


def expand_lycoris(
    stem: str,
    parts: Mapping[str, torch.Tensor],
    *,
    alpha: float | None,
    path: str | Path,
) -> tuple[str, torch.Tensor, float]:
    """The kind, update dW (stored shape: 2-D, or 4-D for a convolution when the tensors say
    so) and scale s of one LoHa, LoKr or full-diff module (dW_true = s * dW).

    Raises:
        UnpairedTensorError: a factor without its partners (names the key).
        ShapeMismatchError: factors whose shapes do not combine.
        UnknownLayoutError: tensors of two kinds on one module.
    """
    kinds = {p.split("_")[0].lstrip(".") for p in parts}
    if len(kinds) != 1:
        raise UnknownLayoutError(
            f"tensors of several adapter kinds on one module ({', '.join(sorted(kinds))})",
            path=path,
            key=stem,
        )
    f32 = {k: v.float() for k, v in parts.items()}
    kind = kinds.pop()
    try:
        if kind == "hada":
            update, scale = _loha(f32, alpha, stem, path)
            return "loha", update, scale
        if kind == "lokr":
            update, scale = _lokr(f32, alpha, stem, path)
            return "lokr", update, scale
    except RuntimeError as exc:  # torch's shape errors in @, einsum, kron
        raise ShapeMismatchError(f"factors do not combine ({exc})", path=path, key=stem) from exc
    if kind == "diff":
        return "full", f32[".diff"], 1.0
    raise UnknownLayoutError(f"unknown LyCORIS tensors ({kind})", path=path, key=stem)


def lora_of_update(
    update: torch.Tensor, options: LycorisOptions, *, key: str, kind: str
) -> tuple[torch.Tensor, torch.Tensor, ModuleConversion]:
    """The best rank-r LoRA of an update (Eckart-Young), with its conversion record.

    Args:
        update: dW, (m, n) (a convolution's update flattened to (out, in * kh * kw)).
        options: how to choose r.
        key, kind: for the record.

    Returns:
        (up = U_r diag(S_r) (m, r), down = V_r^T (r, n), the record), float32.
    """
    matrix = update.reshape(update.shape[0], -1)
    work = matrix.double() if matrix.numel() <= 1 << 22 else matrix.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    energy = s.square()
    total = float(energy.sum())
    if total == 0.0:
        m, n = matrix.shape
        zero = ModuleConversion(key, kind, 1, 1.0)
        return torch.zeros(m, 1), torch.zeros(1, n), zero
    numerical = int((s > s[0] * max(matrix.shape) * torch.finfo(work.dtype).eps).sum())
    if options.rank is not None:
        r = options.rank
    else:
        cumulative = torch.cumsum(energy, 0) / total
        r = int(torch.searchsorted(cumulative, torch.tensor(options.energy, dtype=work.dtype))) + 1
    r = max(1, min(r, numerical, options.max_rank or r))
    kept = float(energy[:r].sum()) / total
    up = (u[:, :r] * s[:r]).float().contiguous()
    down = vh[:r].float().contiguous()
    return up, down, ModuleConversion(key, kind, r, kept)
