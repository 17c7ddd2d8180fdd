"""Training recipes: small JSON files under training/recipes/, loaded by name or path."""

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
    # InfoNCE temperature. SSCD's 0.05 made no difference in 6-epoch pilots of the default recipe
    # (seed 0, unwhitened, one thread each side by side): recall@1 0.658 vs 0.656, re-ranked 0.689 both.
    tau: float = 0.07
    # Cross-batch memory for InfoNCE (training.losses.EmbeddingMemory): this many earlier
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
    # DataLoader processes for augmentation. On 2 cores 0 is faster for the default recipe
    # (0.97 vs 1.05 s a step, alternating 20-step runs): augmenting inline (0.19 s a batch) costs less than a
    # worker process contending with the two compute threads.
    workers: int = 1
    threads: int = 0  # torch intra-op threads; 0 = every core (divided among torchrun's processes)
    # Learned whitening after training (training/whiten.py), fitted on this many rounds of
    # augmented copies of the training images (0 = off), eigenvalues floored at eps x the largest.
    # Copy-mode recipes only: the pairs are (copy, original).
    whiten_rounds: int = 0
    whiten_eps: float = 0.01


@dataclass
class Recipe:
    name: str
    data: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(TrainSettings)}
        train = d.pop("train", {})
        bad = set(train) - known
        if bad:
            raise ValueError(f"unknown train settings {sorted(bad)}; known: {sorted(known)}")
        bad = set(d) - {f.name for f in dataclasses.fields(cls)}
        if bad:
            raise ValueError(f"unknown recipe keys {sorted(bad)}")
        return cls(train=TrainSettings(**train), **d)


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def load_recipe(name_or_path: str) -> Recipe:
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe {name_or_path!r}: give a JSON file or one of {', '.join(available())}")
    return Recipe.from_dict(json.loads(path.read_text()))
