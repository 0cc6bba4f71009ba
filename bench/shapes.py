"""Synthetic bases with the module names and shapes of real models, their successors, adapters.

Shapes come from the real libraries, built on the ``meta`` device (no weights allocated):

- ``sd15``: the Stable Diffusion 1.5 UNet (``UNet2DConditionModel``, block_out_channels
  (320, 640, 1280, 1280), cross_attention_dim 768): 16 transformer blocks, 128 attention
  matrices ``...attn{1,2}.to_{q,k,v,out.0}``.
- ``sdxl``: the SDXL UNet (block_out_channels (320, 640, 1280), transformer_layers_per_block
  (1, 2, 10), cross_attention_dim 2048): 70 transformer blocks, 560 attention matrices.
- ``llama``: a Llama-style decoder (``LlamaForCausalLM``) with TinyLlama-1.1B's geometry: hidden
  2048, 22 layers, 32 heads, 4 key/value heads (GQA: k/v 256 x 2048); the 88 ``self_attn``
  matrices ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.
- ``grid-b<B>-w<W>``: B generic blocks of 8 square W x W attention matrices (the size sweeps).
- ``tiny-unet`` / ``tiny-llama``: the same libraries at toy sizes, for ``--quick``.

Weights: W = U diag(s) V^T with random orthonormal U, V (QR of a Gaussian) and a power-law
spectrum s_i ~ i^-alpha, alpha drawn per module in [0.25, 0.5] (the range fitted on the trained
attention weights of all-MiniLM-L6-v2: 0.26-0.47), scaled so entries have variance 1/n. The
successor is W + N with N Gaussian and ||N||_F = 1% ||W||_F. Both are stored in float16 (as
released SD / SDXL / Llama checkpoints are), sharded (<= 512 MiB a shard) with a
``model.safetensors.index.json``, under ``bench/.cache/models/<name>/{A,B}``. The generating
factors U_64, V_64 of base A are kept (float32) so that LoRA-X adapters on A cost nothing to make:
adapter i has rank ``ranks[i % len(ranks)]``, up = U_r, down = diag(d) V_r^T with d ~ N(0, 0.05^2)
(expanded LoRA-X, scale 1), written in the PEFT layout by :func:`core.formats.write_adapter`.
They are LoRA-X adapters of the generating factors, which equal the stored float16 base's own
singular vectors up to float16 rounding: for a speed benchmark it does not matter.

Everything is generated once and reused while its recipe (``recipe.json``) is unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.adapter import AdapterKind, AdapterLayout, LoraAdapter, LoraModule
from core.formats import write_adapter

__all__ = [
    "CACHE",
    "GeneratedModel",
    "ModelSpec",
    "adapter_paths",
    "generate",
    "grid",
    "llama",
    "model_spec",
    "sd15",
    "sdxl",
    "tiny_llama",
    "tiny_unet",
]

CACHE = Path(__file__).resolve().parent / ".cache"
RECIPE_VERSION = 1
ALPHA_RANGE = (0.25, 0.5)
PERTURBATION = 0.01
TOP_RANK = 64
SHARD_BYTES = 512 << 20
INDEX_NAME = "model.safetensors.index.json"
ATTENTION_SUFFIXES = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
LLAMA_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")


@dataclass(frozen=True)
class ModelSpec:
    """A base model's adapted matrices.

    Attributes:
        name: cache folder name (``sd15``, ``sdxl``, ``llama``, ``grid-b8-w1280``, ...).
        modules: (module name, (m, n)) in model order; the weight key is ``<name>.weight``.
        description: where the shapes come from, for tables and the README.
    """

    name: str
    modules: tuple[tuple[str, tuple[int, int]], ...]
    description: str

    @property
    def params(self) -> int:
        """Number of weights in the adapted matrices."""
        return sum(m * n for _, (m, n) in self.modules)

    @property
    def largest(self) -> tuple[int, int]:
        """The largest matrix (by element count)."""
        return max((shape for _, shape in self.modules), key=lambda s: s[0] * s[1])


@dataclass(frozen=True)
class GeneratedModel:
    """The files of one generated base pair.

    Attributes:
        spec: what was generated.
        base_a: folder of the source base A (sharded safetensors + index).
        base_b: folder of its successor B.
        top: float32 generating factors of A (``<name>.U`` (m, 64), ``<name>.V`` (n, 64)).
        root: the model's cache folder.
    """

    spec: ModelSpec
    base_a: Path
    base_b: Path
    top: Path
    root: Path

    def weight_files(self, which: str) -> list[Path]:
        """The shard files of base ``A`` or ``B``."""
        folder = self.base_a if which == "A" else self.base_b
        index = json.loads((folder / INDEX_NAME).read_text())
        return [folder / f for f in sorted(set(index["weight_map"].values()))]

    @property
    def file_bytes(self) -> int:
        """Bytes of one base on disk (float16)."""
        return sum(f.stat().st_size for f in self.weight_files("A"))


# --- shapes from the real libraries ---------------------------------------------------------


def _unet_modules(config: dict[str, object]) -> tuple[tuple[str, tuple[int, int]], ...]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return tuple(
        (key.removesuffix(".weight"), (int(p.shape[0]), int(p.shape[1])))
        for key, p in unet.named_parameters()
        if key.endswith(ATTENTION_SUFFIXES) and ".attn" in key
    )


def _llama_modules(**config: int) -> tuple[tuple[str, tuple[int, int]], ...]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    return tuple(
        (key.removesuffix(".weight"), (int(p.shape[0]), int(p.shape[1])))
        for key, p in model.named_parameters()
        if ".self_attn." in key and key.endswith(LLAMA_SUFFIXES)
    )


def sd15() -> ModelSpec:
    """The Stable Diffusion 1.5 UNet's attention matrices (128, 16 transformer blocks)."""
    modules = _unet_modules(
        {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "layers_per_block": 2,
            "attention_head_dim": 8,
        }
    )
    return ModelSpec("sd15", modules, "SD 1.5 UNet attention (diffusers config, 16 blocks)")


def sdxl() -> ModelSpec:
    """The SDXL UNet's attention matrices (560, 70 transformer blocks, cross-attention 2048)."""
    modules = _unet_modules(
        {
            "sample_size": 128,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "cross_attention_dim": 2048,
            "attention_head_dim": (5, 10, 20),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "layers_per_block": 2,
        }
    )
    return ModelSpec("sdxl", modules, "SDXL UNet attention (diffusers config, 70 blocks)")


def llama() -> ModelSpec:
    """A Llama-style decoder with TinyLlama-1.1B's geometry: 22 layers x q/k/v/o (88 matrices)."""
    modules = _llama_modules(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    return ModelSpec("llama", modules, "Llama decoder, hidden 2048, 22 layers, GQA k/v 256")


def tiny_unet() -> ModelSpec:
    """A toy UNet (block_out_channels (32, 64), cross-attention 48): the quick mode's model."""
    modules = _unet_modules(
        {
            "sample_size": 16,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 48,
            "layers_per_block": 1,
            "attention_head_dim": 8,
            "norm_num_groups": 8,
        }
    )
    return ModelSpec("tiny-unet", modules, "toy UNet attention (diffusers config)")


def tiny_llama() -> ModelSpec:
    """A toy Llama decoder (hidden 64, 2 layers, GQA k/v 16)."""
    modules = _llama_modules(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return ModelSpec("tiny-llama", modules, "toy Llama decoder (transformers config)")


def grid(blocks: int, width: int) -> ModelSpec:
    """``blocks`` generic blocks of 8 square ``width`` x ``width`` attention matrices."""
    modules = tuple(
        (f"blocks.{b}.attn{a}.{proj}", (width, width))
        for b in range(blocks)
        for a in (1, 2)
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    )
    return ModelSpec(f"grid-b{blocks}-w{width}", modules, f"{blocks} blocks x 8 of {width}^2")


def model_spec(name: str) -> ModelSpec:
    """The spec called ``name`` (``sd15``, ``sdxl``, ``llama``, ``tiny-unet``, ``tiny-llama``,
    ``grid-b<B>-w<W>``)."""
    named = {"sd15": sd15, "sdxl": sdxl, "llama": llama, "tiny-unet": tiny_unet}
    named["tiny-llama"] = tiny_llama
    if name in named:
        return named[name]()
    if name.startswith("grid-b") and "-w" in name:
        blocks, width = name.removeprefix("grid-b").split("-w")
        return grid(int(blocks), int(width))
    raise ValueError(f"unknown model {name!r}")


# --- weights ----------------------------------------------------------------------------------


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, cols) with orthonormal columns (cols <= rows), float32."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


def _pair(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, U_64 | V_64 of A) for one module: A = U diag(s) V^T, B = A + 1% noise."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    alpha = ALPHA_RANGE[0] + (ALPHA_RANGE[1] - ALPHA_RANGE[0]) * float(torch.rand(1, generator=gen))
    s = torch.arange(1, p + 1, dtype=torch.float32) ** -alpha
    s *= math.sqrt(m / float(s.square().sum()))  # ||W||_F^2 = m: entries of variance 1/n
    u, v = _orthonormal(m, p, gen), _orthonormal(n, p, gen)
    a = (u * s) @ v.T
    noise = torch.randn(m, n, generator=gen)
    b = a + noise * (PERTURBATION * float(a.norm()) / float(noise.norm()))
    k = min(TOP_RANK, p)
    return a, b, torch.cat([u[:, :k].T, v[:, :k].T], dim=1)  # (k, m + n), split when read


def _recipe(spec: ModelSpec, seed: int) -> dict[str, object]:
    return {
        "version": RECIPE_VERSION,
        "modules": [[name, list(shape)] for name, shape in spec.modules],
        "seed": seed,
        "alpha_range": list(ALPHA_RANGE),
        "perturbation": PERTURBATION,
        "dtype": "float16",
        "top_rank": TOP_RANK,
    }


def _shards(spec: ModelSpec) -> list[list[int]]:
    """Module indices per shard, each shard <= SHARD_BYTES of float16 (one module at least)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, (m, n)) in enumerate(spec.modules):
        if shards[-1] and size + 2 * m * n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += 2 * m * n
    return shards


def generate(spec: ModelSpec, *, seed: int = 0, cache: Path = CACHE) -> GeneratedModel:
    """Generate (once) the base pair A, B of ``spec`` and A's top factors; see the module doc.

    Streams shard by shard: at most one shard of each base is in memory.
    """
    root = cache / "models" / spec.name
    out = GeneratedModel(spec, root / "A", root / "B", root / "top.safetensors", root)
    recipe = _recipe(spec, seed)
    recipe_file = root / "recipe.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe:
        return out
    if root.exists():
        shutil.rmtree(root)
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "A").mkdir(parents=True)
    (tmp / "B").mkdir()
    shards = _shards(spec)
    weight_map: dict[str, str] = {}
    top: dict[str, torch.Tensor] = {}
    for s_i, indices in enumerate(shards):
        file = f"model-{s_i + 1:05d}-of-{len(shards):05d}.safetensors"
        part_a: dict[str, torch.Tensor] = {}
        part_b: dict[str, torch.Tensor] = {}
        for i in indices:
            name, (m, n) = spec.modules[i]
            a, b, uv = _pair(m, n, seed * 1_000_003 + i)
            part_a[f"{name}.weight"] = a.half()
            part_b[f"{name}.weight"] = b.half()
            top[f"{name}.U"] = uv[:, :m].T.contiguous()
            top[f"{name}.V"] = uv[:, m:].T.contiguous()
            weight_map[f"{name}.weight"] = file
        save_file(part_a, str(tmp / "A" / file), metadata={"format": "pt"})
        save_file(part_b, str(tmp / "B" / file), metadata={"format": "pt"})
    for which in ("A", "B"):
        total = sum(f.stat().st_size for f in (tmp / which).glob("*.safetensors"))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / which / INDEX_NAME).write_text(json.dumps(index, indent=1))
    save_file(top, str(tmp / "top.safetensors"))
    (tmp / "recipe.json").write_text(json.dumps(recipe))
    tmp.rename(root)
    return out


# --- adapters ---------------------------------------------------------------------------------


def adapter_paths(
    model: GeneratedModel, count: int, ranks: tuple[int, ...] = (8, 16, 32, 64)
) -> list[Path]:
    """``count`` LoRA-X adapters on base A (PEFT folders), made once; see the module doc.

    Adapter i has rank ``min(ranks[i % len(ranks)], p)`` on every module.
    """
    from safetensors import safe_open

    folder = model.root / "adapters"
    paths = [folder / f"{i:03d}-r{ranks[i % len(ranks)]}" for i in range(count)]
    missing = [(i, p) for i, p in enumerate(paths) if not (p / "adapter_config.json").is_file()]
    if not missing:
        return paths
    with safe_open(str(model.top), framework="pt") as fh:
        for i, path in missing:
            r_wanted = ranks[i % len(ranks)]
            gen = torch.Generator().manual_seed(10_000 + i)
            modules = {}
            for name, (m, n) in model.spec.modules:
                r = min(r_wanted, m, n, TOP_RANK)
                u, v = fh.get_slice(f"{name}.U")[:, :r], fh.get_slice(f"{name}.V")[:, :r]
                d = torch.randn(r, generator=gen) * 0.05
                modules[name] = LoraModule(name, up=u, down=d[:, None] * v.T, scale=1.0, ds=d)
            adapter = LoraAdapter(
                modules=modules,
                kind=AdapterKind.LORAX,
                layout=AdapterLayout.PEFT,
                config={"peft_type": "LORA", "r": r_wanted, "lora_alpha": r_wanted},
                metadata={"lorax.bench": f"adapter {i} of {model.spec.name}"},
                source=str(path),
            )
            write_adapter(adapter, path)
    return paths
