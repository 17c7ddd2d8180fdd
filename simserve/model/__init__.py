"""The torch definition of the Siamese model (training, export, reference backend).

Serving code must not import this package: it pulls in torch.
"""

from simserve.model.heads import HEAD_REGISTRY, build_head
from simserve.model.siamese import SiameseNet, build_model, load_checkpoint, save_checkpoint
from simserve.model.tower import Tower

__all__ = [
    "HEAD_REGISTRY",
    "SiameseNet",
    "Tower",
    "build_head",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]
