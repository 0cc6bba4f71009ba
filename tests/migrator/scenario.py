"""Small registries for the service tests: bases, successors, unrelated bases and adapters in
every layout, registered the way users register them (role tags, artifacts)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter, LoraModule
from core.factorize import factorize
from core.formats import write_adapter
from migrator.registry import Registry, Tag, VersionRef
from migrator.registry.memory import MemoryRegistry
from migrator.registry.mlflow_registry import MlflowRegistry

WIDTH = 64
LAYERS = 2
ATTENTION = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def base_weights(seed: int, *, width: int = WIDTH, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    """A BERT-shaped encoder whose attention matrices have a decaying spectrum, like trained
    weights (so that their leading subspaces are well defined)."""
    g = _gen(seed)
    out: dict[str, torch.Tensor] = {}
    spectrum = torch.exp(-torch.arange(width, dtype=torch.float64) / 6.0) + 0.01
    for layer in range(layers):
        for name in ATTENTION:
            u, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
            v, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
            out[f"encoder.layer.{layer}.{name}.weight"] = ((u * spectrum) @ v.T).float()
        out[f"encoder.layer.{layer}.intermediate.dense.weight"] = torch.randn(
            4 * width, width, generator=g
        )
    out["embeddings.word_embeddings.weight"] = torch.randn(100, width, generator=g)
    return out


def successor(
    weights: dict[str, torch.Tensor], *, eps: float = 0.005, seed: int = 99
) -> dict[str, torch.Tensor]:
    """A related successor: every matrix moved by ``eps`` relative (a light fine-tune, within
    the weight-drift threshold: rohan-pristine moved all-MiniLM-L6-v2 by 0.3%)."""
    g = _gen(seed)
    return {
        k: w + eps * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=g)
        for k, w in weights.items()
    }


def write_weights(folder: Path, weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    return folder


def _modules(
    weights: dict[str, torch.Tensor], *, rank: int, seed: int, plain: bool
) -> dict[str, LoraModule]:
    g = _gen(seed)
    modules = {}
    for key, w in weights.items():
        name = key.removesuffix(".weight")
        if not any(name.endswith(a) for a in ATTENTION):
            continue
        if plain:
            modules[name] = LoraModule(
                name,
                torch.randn(w.shape[0], rank, generator=g) * 0.1,
                torch.randn(rank, w.shape[1], generator=g) * 0.1,
                scale=2.0,
            )
        else:
            f = factorize(w)
            ds = torch.randn(rank, generator=g) * 0.2
            modules[name] = LoraModule(
                name, f.U[:, :rank].clone(), torch.diag(ds) @ f.V[:, :rank].T, scale=1.0, ds=ds
            )
    return modules


def lorax_adapter(
    weights: dict[str, torch.Tensor],
    *,
    rank: int = 16,
    seed: int = 1,
    layout: AdapterLayout = AdapterLayout.PEFT,
) -> LoraAdapter:
    """A LoRA-X (expanded) trained-looking adapter on ``weights``."""
    return LoraAdapter(
        _modules(weights, rank=rank, seed=seed, plain=False),
        AdapterKind.LORAX,
        layout,
        config={"r": rank, "lora_alpha": rank} if layout is AdapterLayout.PEFT else {},
        metadata={"ss_network_module": "networks.lora"} if layout is AdapterLayout.KOHYA else {},
    )


def plain_lora_adapter(
    weights: dict[str, torch.Tensor], *, rank: int = 8, seed: int = 2
) -> LoraAdapter:
    return LoraAdapter(
        _modules(weights, rank=rank, seed=seed, plain=True),
        AdapterKind.LORA,
        AdapterLayout.PEFT,
        config={"r": rank, "lora_alpha": 2 * rank},
    )


def write(adapter: LoraAdapter, path: Path) -> Path:
    """Write an adapter (a PEFT folder, or a single file for kohya/diffusers) under ``path``."""
    if adapter.layout is AdapterLayout.PEFT:
        write_adapter(adapter, path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_adapter(adapter, path / "adapter.safetensors")
    return path


def register(registry: Registry, name: str, files: Path | None, tags: dict[str, str]) -> VersionRef:
    """Register a version the way a user does: artifacts through a run, then a model version."""
    if isinstance(registry, MemoryRegistry):
        return registry.add_version(name, files, tags).ref
    assert isinstance(registry, MlflowRegistry)
    client = registry.client
    exp = client.get_experiment_by_name("uploads")
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment("uploads", artifact_location=registry.artifact_root)
    )
    run = client.create_run(exp_id)
    if files is not None:
        client.log_artifacts(run.info.run_id, str(files), "files")
    client.set_terminated(run.info.run_id)
    with contextlib.suppress(Exception):
        client.create_registered_model(name)
    mv = client.create_model_version(
        name, f"runs:/{run.info.run_id}/files", run_id=run.info.run_id, tags=tags
    )
    return VersionRef(name, str(mv.version))


@dataclass
class Story:
    """The standard story: base v1 with three adapters, then a related v2 and an unrelated
    base that claims to supersede v1."""

    root: Path
    registry: Registry
    base_name: str = "enc"
    v1: dict[str, torch.Tensor] = field(default_factory=dict)
    v2: dict[str, torch.Tensor] = field(default_factory=dict)
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    refs: dict[str, VersionRef] = field(default_factory=dict)

    def register_v1_with_adapters(self) -> None:
        self.v1 = base_weights(0)
        base = register(
            self.registry,
            self.base_name,
            write_weights(self.root / "v1", self.v1),
            {Tag.ROLE: "base"},
        )
        self.refs["v1"] = base
        adapters = {
            "styleA": (lorax_adapter(self.v1, seed=1), "lorax"),
            "plainB": (plain_lora_adapter(self.v1, seed=2), "lora"),
            "kohyaC": (lorax_adapter(self.v1, seed=3, layout=AdapterLayout.KOHYA), "lorax"),
        }
        for name, (adapter, fmt) in adapters.items():
            files = write(adapter, self.root / "adapters" / name)
            self.refs[name] = register(
                self.registry,
                f"{self.base_name}-{name}",
                files,
                {Tag.ROLE: "adapter", Tag.BASE: str(base), Tag.FORMAT: fmt},
            )

    def register_successors(self) -> None:
        self.v2 = successor(self.v1)
        self.refs["v2"] = register(
            self.registry,
            self.base_name,
            write_weights(self.root / "v2", self.v2),
            {Tag.ROLE: "base"},
        )
        self.other = base_weights(1234)
        self.refs["other"] = register(
            self.registry,
            f"{self.base_name}-other",
            write_weights(self.root / "other", self.other),
            {Tag.ROLE: "base", Tag.SUPERSEDES: str(self.refs["v1"])},
        )
