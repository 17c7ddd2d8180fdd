import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from simserve.inference.config import ModelConfig
from simserve.model import load_checkpoint
from tests.conftest import tiny_recipe_dict
from training import sources
from training.recipe import Recipe, load_recipe
from training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def test_short_training_on_real_images_lowers_loss(fmnist_folder, tmp_path):
    recipe = Recipe.from_dict(tiny_recipe_dict(fmnist_folder, epochs=5, steps_per_epoch=8, lr=5e-3))
    result = train(recipe, tmp_path, progress=False)
    losses = [row["loss"] for row in result["history"]]
    assert min(losses[-2:]) < losses[0] * 0.9, losses  # epochs of 8 steps are noisy: either of the last two
    m = result["metrics"]
    assert 0.0 <= m["pair_auc"] <= 1.0 and 0.0 <= m["recall@1"] <= 1.0
    assert (tmp_path / "model.pt").exists() and (tmp_path / "metrics.json").exists()


def test_killed_run_resumes_to_the_same_weights(fmnist_folder, tmp_path):
    """kill -9 a CLI training run after its first checkpoint; --resume must end
    with exactly the weights of an uninterrupted run."""
    recipe_dict = tiny_recipe_dict(fmnist_folder, epochs=6, steps_per_epoch=4)
    recipe_file = tmp_path / "tiny.json"
    recipe_file.write_text(json.dumps(recipe_dict))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "simserve.cli", "train", "--recipe", str(recipe_file), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "model.pt").exists(), "run finished before it was killed; nothing was tested"
    done = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 6
    recipe = Recipe.from_dict(recipe_dict)
    train(recipe, out, resume=True, progress=False, final_eval=False)
    train(recipe, tmp_path / "straight", progress=False, final_eval=False)
    a, _ = load_checkpoint(tmp_path / "straight" / "model.pt")
    b, _ = load_checkpoint(out / "model.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_recipes_shipped_with_the_package_load():
    for name in ("default", "fashion_mnist", "photos", "copydetect"):
        r = load_recipe(name)
        ModelConfig.from_dict(r.model)  # valid architecture


def test_cli_train_under_torchrun_ddp_keeps_ranks_identical(fmnist_folder, tmp_path):
    recipe = tiny_recipe_dict(fmnist_folder, epochs=1, steps_per_epoch=3)
    recipe["data"]["pairs_per_image"] = 2  # each rank takes whole images: 8 images x 2 pairs
    recipe_file = tmp_path / "tiny.json"
    recipe_file.write_text(json.dumps(recipe))
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "simserve.cli", "train", "--recipe", str(recipe_file), "--out", str(out), "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["ddp_max_weight_diff"] == 0.0
    assert (out / "command.txt").read_text().startswith("simserve train --recipe")


def test_distinct_subset_drops_recoloured_variants_and_keeps_distinct_photos(photos):
    from PIL import ImageOps

    from training.sources import distinct_subset

    imgs = list(photos.values())
    recoloured = ImageOps.colorize(imgs[0].convert("L"), black="darkblue", white="yellow")  # same drawing, new colourway
    shrunk = imgs[2].resize((imgs[2].width // 3, imgs[2].height // 3))
    kept = distinct_subset(imgs + [recoloured, shrunk])
    assert list(kept) == list(range(len(imgs)))  # every distinct photo once; both variants dropped


def test_cross_batch_memory_holds_the_last_embeddings_and_counts_their_labels():
    """XBM: the memory keeps the newest ``size`` rows; remembered rows join the loss, as
    positives when their label is the anchor's and as negatives otherwise; gradients reach
    only the current batch."""
    import torch.nn.functional as F

    from training.losses import Contrastive, CrossBatchMemory, InfoNCE

    torch.manual_seed(0)
    za = F.normalize(torch.randn(8, 16), dim=1).requires_grad_()
    zb = F.normalize(torch.randn(8, 16), dim=1)
    labels = torch.arange(8)
    info_nce = InfoNCE()
    mem = CrossBatchMemory(info_nce, 12, 16)
    for k in range(3):
        mem(za.detach(), zb + k, labels + 100 * k)  # fills while inactive
    assert len(mem) == 12 and mem.labels.tolist() == list(range(104, 108)) + list(range(200, 208))
    plain = info_nce(za, zb, labels).item()

    def remembering(bank_labels):
        m = CrossBatchMemory(info_nce, 8, 16)
        m(za.detach(), za.detach(), bank_labels)  # vectors close to the anchors
        m.active = True
        return m

    same = remembering(labels)  # as earlier views of the same items
    other = remembering(labels + 1000)  # the same vectors as other items: hard negatives
    with_same, with_other = same(za, zb, labels).item(), remembering(labels + 1000)(za, zb, labels).item()
    assert with_same < with_other and plain < with_other
    other(za, zb, labels).backward()
    with pytest.raises(ValueError, match="bank of candidates"):
        CrossBatchMemory(Contrastive(), 8, 16)
    assert za.grad is not None and not other.z.requires_grad


def test_koleo_spreads_other_items_apart_and_ignores_an_items_own_views():
    """KoLeo: a step down its gradient raises the nearest-other distance; two views of one item
    are not each other's neighbour (pulling those together is InfoNCE's job)."""
    import torch.nn.functional as F

    from training.losses import koleo

    torch.manual_seed(0)
    base = F.normalize(torch.randn(4, 8), dim=1)
    z = F.normalize(torch.cat([base, base + 0.01 * torch.randn(4, 8)]), dim=1)
    labels = torch.arange(4).repeat(2)
    za_, zb_ = z.chunk(2)
    assert koleo(za_, zb_, labels[:4]) < 2.0  # views of one item 0.01 apart do not count as neighbours
    assert koleo(z, z, torch.arange(8)) > 3.0  # each point twice under one label: its twin is excluded  # as different items they do: -log(~0.01)

    def nearest_other(v):
        d = torch.cdist(v, v) + torch.eye(len(v)) * 9
        return d.min(1).values.mean()

    crowd = F.normalize(torch.randn(16, 8) * 0.1 + torch.ones(8), dim=1).requires_grad_()
    koleo(crowd, crowd, torch.arange(16)).backward()
    moved = F.normalize(crowd.detach() - 0.05 * crowd.grad, dim=1)
    assert nearest_other(moved) > nearest_other(crowd.detach())

    from simserve.model import build_model
    from training.trainer import TrainStep

    recipe = Recipe.from_dict(tiny_recipe_dict(Path("."), koleo=30.0))
    step = TrainStep(build_model(ModelConfig.from_dict(recipe.model)), recipe.train)
    x = torch.randn(8, 1, 32, 32)
    loss, stats = step(x, x + 0.1 * torch.randn_like(x), torch.arange(8), torch.Generator().manual_seed(0))
    assert stats["koleo"] > 0 and abs(loss.item() - stats["loss"]) < 1e-5
    assert abs(stats["loss"] - (stats["bce"] + stats["metric"] + 30.0 * stats["koleo"])) < 1e-3


def test_a_folders_holdout_split_does_not_depend_on_where_the_folder_lives(fmnist_folder, tmp_path):
    """Reproducible from the recipe and seed on any machine: the split hashes the path inside
    the folder, not the folder's own location."""
    import shutil

    from training.trainer import load_data

    copies = [shutil.copytree(fmnist_folder, tmp_path / where / "data") for where in ("here", "elsewhere/deeper")]
    splits = []
    for folder in copies:
        recipe = Recipe.from_dict(tiny_recipe_dict(folder))
        data = load_data(recipe, ModelConfig.from_dict(recipe.model))
        splits.append((sorted(data.train.names), sorted(data.held_out.names)))
    assert splits[0] == splits[1] and splits[0][1] and len(splits[0][0]) > len(splits[0][1])
    # The same for sources (the default recipe's): a folder source, and scikit-image's photos,
    # whose absolute path is wherever the venv happens to be.
    assert sources.load_sources([str(copies[0])], 32).names == sources.load_sources([str(copies[1])], 32).names
    photos = sources.load_sources(["skimage"], 32).names
    assert photos and all(n.startswith("skimage/") and "/" not in n[len("skimage/") :] for n in photos)


def test_clean_anchor_pairs_the_untouched_original_with_a_copy(photos):
    import numpy as np

    from simserve.inference.pixels import to_array
    from training.augment import CopyAugment
    from training.pairs import PairDataset

    cfg = ModelConfig(input_size=64)
    images = sources.ImageSet(list(photos.values()), np.arange(len(photos)), list(photos), [])
    augment = CopyAugment(64)
    always = PairDataset(images, "copy", augment, cfg, seed=5, clean_anchor=1.0)
    never = PairDataset(images, "copy", augment, cfg, seed=5)
    for i, img in enumerate(images.images):
        a, b, label = always[i]
        assert label == i
        assert torch.equal(a, torch.from_numpy(to_array(img, 64, cfg.mean, cfg.std)))  # the original, only resized
        assert not torch.equal(b, a)  # the other view is still a copy
        a2, _, _ = never[i]
        assert not torch.equal(a2, a)  # without the option both views are augmented
    with pytest.raises(ValueError, match="probability"):
        PairDataset(images, "copy", augment, cfg, seed=5, clean_anchor=1.5)


def test_a_pasted_view_is_the_image_small_inside_another_training_image(photos):
    """data.paste: the view holds the image at a fraction of the width of a crop of another
    image, so the pair teaches what issue 23's pasted copies need; off, the stream is unchanged."""
    import random

    import numpy as np
    from PIL import Image

    from training.augment import CopyAugment

    red, blue = Image.new("RGB", (96, 64), (255, 0, 0)), Image.new("RGB", (120, 90), (0, 0, 255))
    bare = dict(crop_p=0, aspect_p=0, pad_p=0, flip_p=0, rotate_p=0, jitter_p=0, grey_p=0, blur_p=0, overlay_p=0, jpeg_p=0)
    pasted = CopyAugment(64, paste_p=1.0, backgrounds=(blue,), **bare)
    for seed in range(5):
        a = np.asarray(pasted(red, random.Random(seed))).reshape(-1, 3).astype(int)
        share = np.mean(a[:, 0] > 200)  # the red image's pixels
        assert 0.03 < share < 0.7 and np.mean(a[:, 2] > 200) > 0.3, share
    img = photos["astronaut"]
    assert np.array_equal(np.asarray(CopyAugment(64)(img, random.Random(3))), np.asarray(CopyAugment(64, paste_p=0.5)(img, random.Random(3))))


def test_pairs_per_image_puts_k_pairs_of_each_image_in_a_batch_as_positives(photos):
    """data.pairs_per_image: a batch holds batch_size / k images, each as k distinct pairs with
    one label, so InfoNCE counts an image's other pairs as positives; draw 0 is k = 1's stream."""
    import numpy as np
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from training.augment import CopyAugment
    from training.losses import InfoNCE
    from training.pairs import EpochBatchSampler, PairDataset

    cfg = ModelConfig(input_size=48)
    images = sources.ImageSet(list(photos.values()), np.arange(len(photos)), list(photos), [])
    n, k = len(images), 3
    dataset = PairDataset(images, "copy", CopyAugment(48), cfg, seed=2, pairs_per_image=k)
    single = PairDataset(images, "copy", CopyAugment(48), cfg, seed=2)
    sampler = EpochBatchSampler(n, batch_size=6, steps=3, seed=2, pairs_per_image=k)
    assert len(dataset) == n * k
    seen = set()
    for a, b, labels in DataLoader(dataset, batch_sampler=sampler):
        assert sorted(torch.bincount(labels).tolist())[-2:] == [k, k] and len(labels) == 6  # 2 images x 3 pairs
        for lab in labels.unique():
            views = a[labels == lab]
            assert all(not torch.equal(views[x], views[y]) for x in range(k) for y in range(x))  # k different pairs
        seen.update(labels.tolist())
    assert seen == set(range(n))  # 3 steps x 2 images cover the permutation
    for i in range(n):  # draw 0 keeps the k = 1 stream, so existing recipes train exactly as before
        assert torch.equal(dataset[i][0], single[i][0]) and torch.equal(dataset[i][1], single[i][1])
        assert not torch.equal(dataset[n + i][0], single[i][0]) and dataset[n + i][2] == i

    # The loss sees the other draws as positives: if each a-view matches the b-view of its
    # image's *other* pair and nothing else, the batch's labels count that match (SupCon averages
    # over an anchor's positives: about half the loss of labels that see only the own pair).
    _, _, labels = next(iter(DataLoader(dataset, batch_sampler=EpochBatchSampler(n, 6, 1, seed=2, pairs_per_image=2))))
    zb = F.normalize(torch.randn(len(labels), 64, generator=torch.Generator().manual_seed(0)), dim=1)
    partner = torch.tensor([x ^ 1 for x in range(len(labels))])  # an image's two items sit side by side
    assert torch.equal(labels[partner], labels)
    za = zb[partner]
    assert InfoNCE()(za, zb, labels) < 0.6 * InfoNCE()(za, zb, torch.arange(len(labels)))

    with pytest.raises(ValueError, match="whole images"):
        EpochBatchSampler(n, batch_size=8, steps=1, seed=0, world=2, pairs_per_image=3)
    for bad in (0, 2.5, "2"):
        with pytest.raises(ValueError, match="whole number at least 1"):
            PairDataset(images, "copy", CopyAugment(48), cfg, seed=2, pairs_per_image=bad)


def test_under_ddp_each_rank_trains_whole_images_and_together_one_process_batch():
    from training.pairs import EpochBatchSampler

    n, k = 50, 4
    whole = list(EpochBatchSampler(n, 16, 5, seed=7, pairs_per_image=k))
    ranks = [list(EpochBatchSampler(n, 16, 5, seed=7, rank=r, world=2, pairs_per_image=k)) for r in range(2)]
    for step, batch in enumerate(whole):
        assert ranks[0][step] + ranks[1][step] == batch
        for part in (ranks[0][step], ranks[1][step]):
            images = [i % n for i in part]
            assert all(images.count(i) == k for i in images)  # all k pairs of an image on one rank


def test_recipe_overrides_are_parsed_by_the_settings_type():
    r = load_recipe("default")
    for assignment in ("data.dataset=fashion-mnist", "train.epochs=2", "train.lr=0.01", "model.head=dynamic",
                       "model.stages=[[32, 2, 1]]", "data.sources=[\"tuxpaint\"]", "eval.queries=50", "data.folder=true"):
        r.override(assignment)
    assert r.data.dataset == "fashion-mnist" and r.data.folder == "true"  # strings stay strings, even 't...' and 'f...'
    assert r.train.epochs == 2 and r.train.lr == 0.01 and r.eval.queries == 50
    assert r.model["head"] == "dynamic" and r.model["stages"] == [[32, 2, 1]] and r.data.sources == ["tuxpaint"]
    for bad, message in (("train.epochs=two", "invalid literal"), ("train.nope=1", "no such setting"), ("bogus.x=1", "no section"),
                         ("epochs", "SECTION.KEY=VALUE"), ("model.depth=3", "no such setting"), ("data.sources=tuxpaint", "Expecting value")):
        with pytest.raises(ValueError, match=message):
            r.override(bad)
    with pytest.raises(ValueError, match="unknown data settings"):
        Recipe.from_dict({"name": "x", "data": {"sorces": []}})


def test_train_cli_refuses_a_bad_override_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "simserve.cli", "train", "--recipe", "default", "--out", str(tmp_path), "--set", "train.epochs=two"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip() == "simserve train: --set train.epochs=two: invalid literal for int() with base 10: 'two'"


def test_wallpaper_crops_come_from_training_scenes_only_and_the_same_everywhere(monkeypatch, tmp_path, photos):
    """The photo source cuts seeded crops of the scenes simserve.photos gives for 'train' (the
    benchmark's are never asked for), at most max_side, named by scene."""
    from types import SimpleNamespace

    import simserve.photos

    asked = []
    paths = {}
    for name in ("astronaut", "coffee"):
        paths[name] = tmp_path / f"{name}.png"
        photos[name].save(paths[name])

    def fake_scenes(split=None):
        asked.append(split)
        return [SimpleNamespace(name=n, path=p) for n, p in paths.items()]

    monkeypatch.setattr(simserve.photos, "scenes", fake_scenes)
    a = sources.wallpaper_crops(max_side=64, crops_per_scene=5)
    b = sources.wallpaper_crops(max_side=64, crops_per_scene=5)
    assert asked == ["train", "train"] and len(a) == 10 and a.names[:2] == ["astronaut/0000", "astronaut/0001"]
    assert all(max(im.size) <= 64 for im in a.images) and list(a.labels) == list(range(10))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    assert len({np.asarray(im).tobytes() for im in a.images}) == 10  # every crop a different place
    assert "wallpapers" in sources.SOURCES
