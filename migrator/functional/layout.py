"""Which base folders can run, and how: the runnable layouts of the functional check.

A base can run when its folder says what architecture its weights are for, in a library this
service loads without running the folder's own code:

- ``transformers``: ``config.json`` (a model type transformers knows, no ``auto_map``) beside
  safetensors weights; the tokenizer next to it, if any;
- ``sentence-transformers``: a ``modules.json`` whose Transformer module holds the above; the
  Pooling module's ``config.json`` chooses the pooling (mean, CLS or max);
- ``mlflow-transformers``: an ``MLmodel`` file, the model under ``model/`` (or
  ``components/<name>/``), the tokenizer under ``components/tokenizer/``;
- ``diffusers``: ``unet/`` (``config.json`` + ``diffusion_pytorch_model*.safetensors``) and, where
  present, ``text_encoder*/`` with ``tokenizer*/``.

Everything else raises :class:`NotRunnableError` with the reason, which the policy records
("the functional check cannot run: ...").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.errors import InputError

__all__ = ["Component", "NotRunnableError", "RunnableBase", "find_runnable", "runnable_problem"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
_UNET_WEIGHTS = "diffusion_pytorch_model"


class NotRunnableError(InputError):
    """The base cannot be built and run for the functional check (the message says why)."""


@dataclass(frozen=True)
class Component:
    """One model of a base to run.

    Attributes:
        prefix: what module names of this component start with in
            :class:`core.weights.WeightSource` (``""`` for a single model, ``unet``,
            ``text_encoder``, ``text_encoder_2`` in a diffusers folder).
        kind: ``text`` (a transformers encoder or decoder, fed tokens) or ``unet``.
        model_dir: the folder holding ``config.json`` and the weights.
        tokenizer_dir: the folder of its tokenizer, if any.
        pooling: how token states become one vector per probe: ``mean`` (over the attention
            mask), ``cls`` or ``max`` (text); ``flatten`` (the UNet's output).
    """

    prefix: str
    kind: Literal["text", "unet"]
    model_dir: Path
    tokenizer_dir: Path | None
    pooling: str


@dataclass(frozen=True)
class RunnableBase:
    """A base folder that can run, and its components."""

    path: Path
    layout: str
    components: tuple[Component, ...]


def _has_safetensors(folder: Path, stem: str = "") -> bool:
    return any(f.name.startswith(stem) for f in folder.glob("*.safetensors"))


def _tokenizer(folder: Path) -> Path | None:
    return folder if any((folder / f).is_file() for f in _TOKENIZER_FILES) else None


def _text_config(folder: Path) -> dict[str, object]:
    """The ``config.json`` of a transformers model folder, checked to be loadable."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise NotRunnableError("no config.json: the architecture is unknown", path=folder)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise NotRunnableError(f"unreadable config.json ({exc})", path=config_file) from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise NotRunnableError("config.json names no model_type", path=config_file)
    if "auto_map" in config:
        raise NotRunnableError(
            "config.json needs the folder's own code (auto_map); it is not run", path=config_file
        )
    if not _has_safetensors(folder):
        raise NotRunnableError("no safetensors weights beside config.json", path=folder)
    return config


def _pooling(folder: Path) -> str:
    """The pooling a sentence-transformers Pooling module asks for (mean when unsure)."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_max_tokens"):
        return "max"
    return "mean"


def _sentence_transformers(root: Path) -> RunnableBase | None:
    try:
        modules = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(modules, list):
        return None
    transformer = pooling = None
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind.endswith("models.Transformer"):
            transformer = root / str(module.get("path", ""))
        elif kind.endswith("models.Pooling"):
            pooling = _pooling(root / str(module.get("path", "")))
    if transformer is None:
        return None
    _text_config(transformer)
    component = Component("", "text", transformer, _tokenizer(transformer), pooling or "mean")
    return RunnableBase(root, "sentence-transformers", (component,))


def _diffusers(root: Path) -> RunnableBase:
    unet = root / "unet"
    if not (unet / "config.json").is_file() or not _has_safetensors(unet, _UNET_WEIGHTS):
        raise NotRunnableError("unet/ lacks config.json or safetensors weights", path=root)
    parts = [Component("unet", "unet", unet, None, "flatten")]
    for encoder in sorted(root.glob("text_encoder*")):
        if not encoder.is_dir():
            continue
        _text_config(encoder)
        tokenizer = _tokenizer(root / encoder.name.replace("text_encoder", "tokenizer"))
        parts.append(Component(encoder.name, "text", encoder, tokenizer, "mean"))
    return RunnableBase(root, "diffusers", tuple(parts))


def _mlflow(root: Path) -> RunnableBase:
    candidates = [root / "model", *sorted((root / "components").glob("*"))]
    model = next((c for c in candidates if (c / "config.json").is_file()), None)
    if model is None:
        raise NotRunnableError(
            "MLflow model folder without a transformers config.json (model/ or components/)",
            path=root,
        )
    _text_config(model)
    tokenizer = _tokenizer(root / "components" / "tokenizer") or _tokenizer(model)
    return RunnableBase(
        root, "mlflow-transformers", (Component("", "text", model, tokenizer, "mean"),)
    )


def find_runnable(path: str | Path, *, weights_path: str | None = None) -> RunnableBase:
    """How to run the base at ``path`` (module docstring).

    Args:
        path: the base's folder (or a weights file inside one).
        weights_path: a sub-path to use instead (``lorax.weights_path``).

    Raises:
        NotRunnableError: the folder does not say how to run its weights (the reason).
    """
    root = Path(path) / weights_path if weights_path else Path(path)
    if root.is_file():
        if not (root.parent / "config.json").is_file():
            raise NotRunnableError("a weights file without config.json beside it", path=root)
        root = root.parent
    if not root.is_dir():
        raise NotRunnableError("no such folder", path=root)
    if (root / "MLmodel").is_file():
        return _mlflow(root)
    if (root / "unet").is_dir():
        return _diffusers(root)
    if (root / "modules.json").is_file():
        found = _sentence_transformers(root)
        if found is not None:
            return found
    _text_config(root)
    return RunnableBase(
        root, "transformers", (Component("", "text", root, _tokenizer(root), "mean"),)
    )


def runnable_problem(path: str | Path, *, weights_path: str | None = None) -> str | None:
    """Why the base at ``path`` cannot run (None when it can)."""
    try:
        find_runnable(path, weights_path=weights_path)
    except NotRunnableError as exc:
        return str(exc)
    return None
