"""Data of the transfer-quality experiment: "what does this function do?" from its docstring.

The task (designed so that the base model is weak and an attention adapter can fix it): each
example is the first paragraph of a real function docstring from the Python standard library and
installed packages; its label is the function's *intent* as the function's own name states it,
by naming convention (``is_*``/``has_*`` -> predicate, ``get_*`` -> getter, ``set_*`` -> setter,
``to_*``/``as_*`` -> conversion, ``from_*`` -> alternate constructor, ...). The name itself is not
in the text. These labels cut across the topics that a sentence embedding clusters by ("Return
the dtype of ..." and "Set the dtype of ..." are neighbours for the base model, but have
different labels), so the base's k-NN accuracy is low; the cues that decide the label (the verb,
"True if", "from a ...") are in the text, so an adapter can learn to weigh them.

Everything is derived from the installed files (``ast`` over the sources, nothing imported or
downloaded) with fixed seeds, so a fresh machine with the same packages gets the same data. The
extraction is cached as JSON under ``bench/.cache/``.

The successors' training corpus is different on purpose: ``pydoc_data.topics`` (the Python
language reference shipped with the standard library), cut into fixed-size word windows.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import sysconfig
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import util as importlib_util
from pathlib import Path

__all__ = [
    "FULL_PACKAGES",
    "INTENTS",
    "QUICK_PACKAGES",
    "Example",
    "TaskData",
    "intent_of",
    "load_task",
    "successor_corpus",
]

INTENTS: dict[str, tuple[str, ...]] = {
    "predicate": ("is", "has", "can", "should", "supports"),
    "getter": ("get",),
    "setter": ("set",),
    "conversion": ("to", "as"),
    "constructor": ("from",),
    "factory": ("make", "create", "build", "new"),
    "validation": ("check", "validate", "verify", "ensure", "assert"),
    "add": ("add", "register", "append", "insert"),
    "remove": ("remove", "delete", "pop", "clear", "drop", "unregister", "discard"),
    "read": ("read", "load", "parse", "open"),
    "write": ("write", "save", "dump", "export"),
}
"""Intent label -> the leading name words (after leading underscores) that state it."""

FULL_PACKAGES: tuple[str, ...] = (
    "stdlib",
    "torch",
    "transformers",
    "mlflow",
    "sympy",
    "matplotlib",
    "pandas",
    "diffusers",
    "sqlalchemy",
    "sklearn",
    "scipy",
    "networkx",
    "numpy",
)
QUICK_PACKAGES: tuple[str, ...] = ("stdlib", "mlflow", "sympy")

_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled"}
)
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Example:
    """One docstring summary and its intent label."""

    text: str
    label: int
    package: str
    function: str


@dataclass(frozen=True)
class TaskData:
    """Train and held-out examples; labels index :attr:`classes`."""

    classes: tuple[str, ...]
    train: tuple[Example, ...]
    heldout: tuple[Example, ...]
    packages: tuple[str, ...]
    counts: dict[str, int]

    def by_class(self) -> list[list[str]]:
        """Training texts per class (index = label)."""
        out: list[list[str]] = [[] for _ in self.classes]
        for ex in self.train:
            out[ex.label].append(ex.text)
        return out


def intent_of(function_name: str) -> str | None:
    """The intent a function name states by convention, or None.

    The name's first word decides: ``_get_store`` and ``getStore`` -> getter, ``is_valid`` ->
    predicate, ``from_dict`` -> constructor. Run-together names (``isdigit``, ``settle``) are
    ambiguous and give None.
    """
    match = re.match(r"[a-z]+", function_name.lstrip("_"))
    if match is None:
        return None
    head = match.group(0)
    for intent, heads in INTENTS.items():
        if head in heads:
            return intent
    return None


def _package_root(package: str) -> Path:
    if package == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    spec = importlib_util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _source_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if _SKIP_DIRS.intersection(rel[:-1]) or rel[-1].startswith("test_"):
            continue
        yield path


def _summary(docstring: str) -> str:
    return re.sub(r"\s+", " ", docstring.strip().split("\n\n", 1)[0]).strip()


def _extract(package: str) -> list[tuple[str, str, str]]:
    """(intent, summary, function name) for every labelled function docstring of a package."""
    rows = []
    for path in _source_files(_package_root(package)):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            intent = intent_of(node.name)
            doc = ast.get_docstring(node)
            if intent is None or not doc:
                continue
            text = _summary(doc)
            bare = node.name.strip("_").lower()
            # at least four words; the name must not give the label away
            if len(text.split()) < 4 or bare in text.lower():
                continue
            rows.append((intent, text, node.name))
    return rows


def _extract_all(packages: Sequence[str], cache_dir: Path) -> list[dict[str, str]]:
    key = hashlib.sha256(json.dumps([_CACHE_VERSION, list(packages)]).encode()).hexdigest()[:12]
    cache = cache_dir / f"intent-docstrings-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    rows = [
        {"package": p, "intent": i, "text": t, "function": f}
        for p in packages
        for i, t, f in _extract(p)
    ]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(cache)
    return rows


def load_task(
    *,
    packages: Sequence[str] = FULL_PACKAGES,
    train_per_class: int = 300,
    heldout_per_class: int = 40,
    seed: int = 0,
    cache_dir: Path,
) -> TaskData:
    """The intent task: deduplicated, class-balanced, split train / held-out with ``seed``.

    A text that occurs under two labels is dropped; a class needs ``heldout_per_class`` + 20
    examples or it is left out (the classes kept are reported).
    """
    rows = _extract_all(packages, cache_dir)
    labels_of: dict[str, set[str]] = {}
    first: dict[str, dict[str, str]] = {}
    for row in rows:
        labels_of.setdefault(row["text"], set()).add(row["intent"])
        first.setdefault(row["text"], row)
    unique = [first[t] for t in sorted(first) if len(labels_of[t]) == 1]
    counts = Counter(r["intent"] for r in unique)
    classes = tuple(c for c in INTENTS if counts[c] >= heldout_per_class + 20)
    rng = random.Random(seed)
    train: list[Example] = []
    heldout: list[Example] = []
    for label, intent in enumerate(classes):
        members = [r for r in unique if r["intent"] == intent]
        rng.shuffle(members)
        exs = [Example(r["text"], label, r["package"], r["function"]) for r in members]
        heldout.extend(exs[:heldout_per_class])
        train.extend(exs[heldout_per_class : heldout_per_class + train_per_class])
    return TaskData(classes, tuple(train), tuple(heldout), tuple(packages), dict(counts))


def successor_corpus(words_per_chunk: int = 48) -> list[str]:
    """The Python language reference (``pydoc_data.topics``) cut into word windows, in a fixed
    order: the corpus the successors are trained on (not the task's docstrings)."""
    from pydoc_data.topics import topics

    chunks = []
    for name in sorted(topics):
        words = topics[name].split()
        for i in range(0, len(words) - words_per_chunk // 2, words_per_chunk):
            chunks.append(" ".join(words[i : i + words_per_chunk]))
    return chunks


def describe(data: TaskData) -> dict[str, object]:
    """Sizes and class counts, for the results file."""
    return {
        "classes": list(data.classes),
        "train": len(data.train),
        "heldout": len(data.heldout),
        "packages": list(data.packages),
        "available_per_class": data.counts,
        "example": asdict(data.heldout[0]) if data.heldout else None,
    }
