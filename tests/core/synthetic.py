"""Small synthetic bases and adapters for the core tests (no files unless asked)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter, LoraModule
from core.factorize import factorize
from core.factors import Factors


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    """A Gaussian (m, n) matrix scaled like an initialised linear layer."""
    return torch.randn(m, n, generator=generator(seed)) / n**0.5


def orthonormal(m: int, k: int, seed: int) -> torch.Tensor:
    """(m, k) with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=generator(seed), dtype=torch.float64))
    return q.float()


def matrix_with_spectrum(m: int, n: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(spectrum) V^T with random orthonormal U, V (len(spectrum) <= min(m, n))."""
    k = spectrum.shape[0]
    u, v = orthonormal(m, k, seed), orthonormal(n, k, seed + 1)
    return (u.double() * spectrum.double()) @ v.double().T


def lorax_module(
    name: str, base: Factors, r: int, seed: int, *, full: bool = False, scale: float = 1.0
) -> LoraModule:
    """A LoRA-X module on ``base`` (expanded form): up = U_r, down = dS V_r^T / scale."""
    g = generator(seed)
    ds = torch.randn(r, r, generator=g) * 0.1 if full else torch.randn(r, generator=g) * 0.1
    dsm = ds if full else torch.diag(ds)
    return LoraModule(
        name=name,
        up=base.U[:, :r].clone(),
        down=(dsm @ base.V[:, :r].T) / scale,
        scale=scale,
        ds=ds,
    )


def lora_module(name: str, m: int, n: int, r: int, seed: int, scale: float = 1.0) -> LoraModule:
    """A plain LoRA module with random up (m, r) and down (r, n)."""
    g = generator(seed)
    return LoraModule(
        name=name,
        up=torch.randn(m, r, generator=g) * 0.1,
        down=torch.randn(r, n, generator=g) * 0.1,
        scale=scale,
    )


def adapter_of(modules: list[LoraModule], kind: AdapterKind = AdapterKind.LORAX) -> LoraAdapter:
    return LoraAdapter(
        modules={m.name: m for m in modules},
        kind=kind,
        layout=AdapterLayout.PEFT,
        config={"r": max(m.rank for m in modules)},
        metadata={"note": "synthetic"},
        source="synthetic-adapter",
    )


def full_factors(weights: dict[str, torch.Tensor]) -> dict[str, Factors]:
    """Complete exact factors of every matrix."""
    return {name: factorize(w.float()) for name, w in weights.items()}


def write_base(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    """Save ``{name: W}`` as ``{name}.weight`` tensors in one safetensors file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{k}.weight": v.contiguous() for k, v in weights.items()}, str(path))
    return path


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F (float64)."""
    return float((a.double() - b.double()).norm() / b.double().norm())
