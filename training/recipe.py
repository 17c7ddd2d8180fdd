"""Training recipes: small JSON files under training/recipes/, loaded by name or path.

Every section is typed: an unknown key is an error at load, and ``Recipe.override`` (the
``--set SECTION.KEY=VALUE`` of ``simserve train``) parses a value by the type of the setting it
replaces, so ``data.dataset=fashion-mnist`` stays a string and ``train.epochs=2`` an int."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class TrainSettings:
    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    metric_loss: str = "infonce"  # or "contrastive"
    metric_weight: float = 1.0
    # InfoNCE temperature (SSCD's 0.05 equalled it: docs/decisions/training-losses.md).
    tau: float = 0.07
    # Cross-batch memory for InfoNCE (training.losses.CrossBatchMemory): this many earlier
    # embeddings, used from this fraction of training on (early embeddings move too fast).
    memory: int = 0
    memory_start: float = 0.3
    # Weight of the KoLeo entropy regulariser on the embeddings (training.losses.koleo); 0 = off.
    koleo: float = 0.0
    # Dynamic-head temperature: exponential anneal from start to end over this
    # fraction of training, then held (DY-Conv: 30 -> 1).
    temperature_start: float = 30.0
    temperature_end: float = 1.0
    temperature_fraction: float = 0.3
    # DataLoader processes for augmentation; 0 (inline) is faster on 2 cores (docs/decisions/training-speed.md).
    workers: int = 1
    threads: int = 0  # torch intra-op threads; 0 = every core (divided among torchrun's processes)
    # Learned whitening after training (training/whiten.py), fitted on this many rounds of
    # augmented copies of the training images (0 = off), eigenvalues floored at eps x the largest.
    # Copy-mode recipes only: the pairs are (copy, original).
    whiten_rounds: int = 0
    whiten_eps: float = 0.01


@dataclass
class DataSettings:
    mode: str = "copy"  # "copy": every image its own identity; "class": labels from the source
    sources: list[str] = field(default_factory=list)  # training.sources.load_sources names
    dataset: str = ""  # "fashion-mnist" instead of sources
    folder: str = ""  # a folder of images instead of sources
    holdout: float = 0.15  # the share of images no training run sees
    max_side: int = 192  # images are stored at most this large
    augment: str = "copy"  # "copy" (training.augment.CopyAugment) or "light"
    # Copy augmentation knobs: the smallest share of an image a crop keeps, and the chance a view
    # is pasted into another training image (the held-out evaluation keeps the defaults).
    crop_min_area: float = 0.3
    paste: float = 0.0
    # Pairs of each image in one batch (training/pairs.py), and the chance a pair's first
    # view is the image itself.
    pairs_per_image: int = 1
    clean_anchor: float = 0.0


@dataclass
class EvalSettings:
    queries: int = 1000
    pairs: int = 5000  # class mode: pairs scored for ROC-AUC
    distinct: float = 0.0  # copy mode: drop held-out images this similar to another (0 = keep all)


SECTIONS = {"data": DataSettings, "train": TrainSettings, "eval": EvalSettings}


@dataclass
class Recipe:
    name: str
    data: DataSettings = field(default_factory=DataSettings)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (simserve.inference.config)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        bad = set(d) - {f.name for f in dataclasses.fields(cls)}
        if bad:
            raise ValueError(f"unknown recipe keys {sorted(bad)}")
        sections = {}
        for name, kind in SECTIONS.items():
            given = d.pop(name, {}) or {}
            known = {f.name for f in dataclasses.fields(kind)}
            if set(given) - known:
                raise ValueError(f"unknown {name} settings {sorted(set(given) - known)}; known: {sorted(known)}")
            sections[name] = kind(**given)
        model = d.pop("model", {}) or {}
        unknown = set(model) - set(_model_defaults())
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(_model_defaults())}")
        return cls(model=dict(model), **sections, **d)

    def override(self, assignment: str) -> None:
        """Apply one ``SECTION.KEY=VALUE``; the value is parsed as the setting's type."""
        key, eq, text = assignment.partition("=")
        section, _, name = key.partition(".")
        if not eq or not name:
            raise ValueError(f"--set {assignment!r}: write SECTION.KEY=VALUE, e.g. train.epochs=2")
        if section == "model":
            defaults = _model_defaults()
            if name not in defaults:
                raise ValueError(f"--set {key}: no such setting; model settings: {', '.join(sorted(defaults))}")
            self.model[name] = _parse(text, defaults[name], key)
        elif section in SECTIONS:
            target = getattr(self, section)
            if not hasattr(target, name):
                raise ValueError(f"--set {key}: no such setting; {section} settings: {', '.join(f.name for f in dataclasses.fields(target))}")
            setattr(target, name, _parse(text, getattr(target, name), key))
        else:
            raise ValueError(f"--set {key}: no section {section!r}; sections: data, model, train, eval")


def _model_defaults() -> dict[str, Any]:
    from simserve.inference.config import ModelConfig

    return ModelConfig().to_dict()


def _parse(text: str, like: Any, key: str) -> Any:
    """``text`` as a value of ``like``'s type: strings as written, numbers and booleans strictly, lists as JSON."""
    try:
        if isinstance(like, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
        if isinstance(like, str):
            return text
        value = json.loads(text)
        if not isinstance(value, list):
            raise ValueError("expected a JSON list")
        return value
    except ValueError as e:
        raise ValueError(f"--set {key}={text}: {e}") from None


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def load_recipe(name_or_path: str) -> Recipe:
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe {name_or_path!r}: give a JSON file or one of {', '.join(available())}")
    return Recipe.from_dict(json.loads(path.read_text()))
