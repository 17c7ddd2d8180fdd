"""Learned whitening (training/whiten.py): the fit, the fold into the projection, and the
trainer step that applies it."""

import numpy as np
import pytest
import torch

from simserve.inference.config import ModelConfig
from simserve.model import build_model, load_checkpoint
from tests.conftest import STAMPS, tiny_recipe_dict
from training import whiten as whiten_module
from training.recipe import Recipe
from training.trainer import train
from training.whiten import fit_whitening, fold_into


def test_folding_into_the_projection_is_exactly_the_whitening_map():
    torch.manual_seed(0)
    model = build_model(ModelConfig(input_size=32, stem_width=8, stages=((16, 2, 1), (24, 2, 1)), embed_dim=8)).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        fmap, _ = model.tower(x)
        z = model.tower.project(fmap).double().numpy()
    rng = np.random.default_rng(0)
    b = rng.normal(size=(8, 8))
    a, m = b @ b.T + np.eye(8), rng.normal(size=8)
    fold_into(model.tower.proj, a, m)
    with torch.no_grad():
        folded = model.tower.project(fmap).double().numpy()
        _, emb = model.tower(x)
    np.testing.assert_allclose(folded, (z - m) @ a.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0, rtol=1e-5)  # still L2-normalised after the fold


def test_whitening_shrinks_the_directions_copies_move_along_and_finds_them_again():
    """Copies that differ from their originals mostly along two directions: nearest-neighbour
    search by cosine misses many; after whitening those directions count for little."""
    rng = np.random.default_rng(1)
    n, d = 400, 16
    originals = rng.normal(size=(n, d))
    moved = np.zeros(d)
    moved[:2] = 6.0  # the two directions an "augmentation" pushes copies along
    def copies(seed):
        return originals + np.random.default_rng(seed).normal(size=(n, d)) * np.where(moved > 0, moved, 0.3)
    a, m = fit_whitening(originals, np.stack([copies(2), copies(3)]), eps=1e-6)
    diffs = (copies(4) - originals) @ a.T
    cov = diffs.T @ diffs / n
    assert np.abs(np.diag(cov) - 1).max() < 0.25  # held-out copy differences come out isotropic

    def recall(q, g):
        q, g = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
        return float(((q @ g.T).argmax(1) == np.arange(n)).mean())

    q = copies(5)
    before, after = recall(q, originals), recall((q - m) @ a.T, (originals - m) @ a.T)
    assert before < 0.8 and after > before + 0.15, (before, after)


@pytest.fixture(scope="module")
def stamp_instances(tmp_path_factory):
    if not STAMPS.exists():
        pytest.fail("Tux Paint stamps missing: run ./scripts/install-data.sh (Debian tuxpaint-stamps-default)")
    root = tmp_path_factory.mktemp("instances")
    for i, f in enumerate(sorted(STAMPS.rglob("*.png"))[::12][:48]):
        (root / f"{i:02d}.png").write_bytes(f.read_bytes())
    return root


def _copy_recipe(folder, **train) -> Recipe:
    d = tiny_recipe_dict(folder, epochs=1, steps_per_epoch=2, batch_size=16, **train)
    d["data"] = {"mode": "copy", "folder": str(folder), "holdout": 0.25, "augment": "copy", "max_side": 48}
    d["model"].update(in_channels=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    d["eval"] = {"queries": 20}
    return Recipe.from_dict(d)


def test_training_whitens_the_saved_model_and_the_run_cannot_be_whitened_twice(stamp_instances, tmp_path):
    result = train(_copy_recipe(stamp_instances, whiten_rounds=2), tmp_path, progress=False)
    assert result["whitening"]["pairs"] == 2 * result["train_images"]
    trained = torch.load(tmp_path / "last.pt", weights_only=True)["model"]  # the last epoch, before whitening
    whitened, _ = load_checkpoint(tmp_path / "model.pt")
    assert not torch.allclose(trained["tower.proj.weight"], whitened.tower.proj.weight)
    assert torch.equal(trained["tower.blocks.0.dw.0.weight"], whitened.state_dict()["tower.blocks.0.dw.0.weight"])  # tower body untouched
    with pytest.raises(SystemExit, match="already whitened"):
        whiten_module.main([str(tmp_path)])


def test_whitening_a_class_recipe_is_refused_before_training(fmnist_folder, tmp_path):
    with pytest.raises(ValueError, match="copy-mode"):
        train(Recipe.from_dict(tiny_recipe_dict(fmnist_folder, whiten_rounds=1)), tmp_path, progress=False)
    assert not (tmp_path / "last.pt").exists()
