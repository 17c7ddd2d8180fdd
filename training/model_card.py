"""Write a model card from a training run's metrics.json.

    python -m training.model_card runs/default simserve/bundles/default/MODEL_CARD.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from simserve.ranking.scores import HEAD_WEIGHT, INLIER_WEIGHT
from training.recipe import DataSettings

DATA_NOTES = {
    "openclipart": "Open Clip Art Library drawings, Debian package `openclipart-png` (/usr/share/openclipart/png), "
    "public domain dedication (see /usr/share/doc/openclipart-png/copyright).",
    "tuxpaint": "Tux Paint stamps, Debian package `tuxpaint-stamps-default` (/usr/share/tuxpaint/stamps), **GPL-2**: "
    "this model was trained on GPL-2 images; the weights may be a derivative work of them.",
    "skimage": "scikit-image's bundled sample photos (skimage/data of the version pinned in pyproject.toml, 0.26.0: 26 photos; public domain / CC0 / BSD, see that folder's README.txt).",
    "fashion-mnist": "Fashion-MNIST, Debian package `dataset-fashion-mnist`, MIT licence.",
    "wallpapers": "Random crops of the *training* scenes of Debian's wallpaper packages (simserve/photos.py; the benchmark's "
    "scenes are never trained on): `plasma-workspace-wallpapers` (**GPL-2+**, KDE Visual Design Group), `ukui-wallpapers` "
    "(CC-BY-SA-3.0), `lomiri-wallpapers` (CC-BY-4.0 / CC-BY-SA-3.0 / CC-BY-SA-4.0 / CC0-1.0 per file, authors named in the "
    "file names and /usr/share/doc/lomiri-wallpapers*/copyright), `gnome-backgrounds` (CC-BY-SA-3.0): the weights may be a "
    "derivative work of GPL-2+ and share-alike images.",
}


def card(run: Path) -> str:
    r = json.loads((run / "metrics.json").read_text())
    command = (run / "command.txt").read_text().strip() if (run / "command.txt").exists() else "(not recorded)"
    recipe, cfg, m = r["recipe"], r["config"], r["metrics"]
    sources = recipe["data"].get("sources") or [recipe["data"].get("dataset") or recipe["data"].get("folder")]
    minutes = r["train_seconds"] / 60
    epochs = [e["seconds"] for e in r.get("history", []) if "seconds" in e]  # a resumed run's history spans every part
    held = r.get("held_out_split_images", r["held_out_images"])
    lines = [
        f"# Model card: `{recipe['name']}`",
        "",
        "A Siamese copy-detection model: a depthwise-separable tower gives each image a "
        f"{cfg['embed_dim']}-d L2-normalised embedding (searched by FAISS) and a "
        f"{cfg['stages'][-1][0]}-channel feature map; the `{cfg['head']}` fusion head scores a pair in [0, 1].",
        "",
        "## Intended use",
        "Near-duplicate and copy detection: is image B a crop / resize / recompression / recolouring / "
        "captioned version of image A? Not a semantic-similarity model (two different photos of cats are *different*).",
        "",
        "## Training data",
        *[f"- {DATA_NOTES.get(s, s)}" for s in sources],
        f"- {r['train_images']} training images; {held} held out by a hash of each file's path inside its source "
        f"(fraction {recipe['data'].get('holdout')}), never trained on.",
        "- Self-supervised: two augmented views of one image are a positive; other images in the batch are negatives "
        "(hardest in-batch negative + a random one for the head; InfoNCE over the batch for the embedding).",
        f"- Augmentations: random resized crop ({round(100 * recipe['data'].get('crop_min_area', DataSettings.crop_min_area))}-100% area), aspect change, "
        "padding, flip, rotation (+-20 deg), colour jitter, greyscale, blur, text / shape overlays, JPEG quality 30-90"
        + (f"; {round(100 * recipe['data']['paste'])}% of pairs pasted into a crop of another training image." if recipe["data"].get("paste") else "."),
        *(
            [
                f"- After training, learned whitening (training/whiten.py) fitted on {r['whitening']['pairs']} (copy, original) "
                f"pairs of training images (eigenvalue floor {r['whitening']['eps']}) and folded into the embedding projection: "
                "the directions augmentations move embeddings along count less in the cosine."
            ]
            if r.get("whitening")
            else []
        ),
        "",
        "## Reproduce",
        "```",
        command,
        "```",
        f"Seed {r['seed']}, {r['world_size']} process(es), torch {r['torch_version']}, {r['machine']}. "
        f"Training took {minutes:.1f} minutes of wall time"
        + (f" in its last resumed part ({len(epochs)} epochs in all, a median {statistics.median(epochs) / 60:.1f} minutes each)" if sum(epochs) > 1.5 * r["train_seconds"] else "")
        + (f", whitening {r['whitening']['seconds'] / 60:.1f} more." if "seconds" in r.get("whitening", {}) else "."),
        "",
        "## Evaluation (held-out images, each query transformed with the training augmentations)",
        f"- Gallery: {m.get('gallery')} held-out originals; queries: {m.get('queries')} augmented copies.",
        *(
            [
                f"- The gallery holds distinct images only: of the {held} held-out images, near-identical "
                f"ones (grey 16x16 thumbnails correlating above {recipe['eval']['distinct']}, model-free: "
                "`training.sources.distinct_subset`) are kept once. Open Clip Art ships many drawings in several "
                "colourways; colour jitter and greyscale make those copies of each other, so as distractors they make the "
                "right answer ambiguous (with them in the gallery recall@1 reads about 0.1 lower)."
            ]
            if recipe.get("eval", {}).get("distinct")
            else []
        ),
        "",
        "| metric | value |",
        "|---|---:|",
        *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in m.items()],
        "",
        f"Suggested threshold (the bundle's default): **{m.get('threshold_p99', m.get('threshold', 0.5)):.4f}**, the lowest with "
        f"precision >= 0.99 on the held-out pairs (recall {m.get('recall_p99', 0):.3f}). The best-accuracy threshold is "
        f"{m.get('threshold', 0.5):.4f} (accuracy {m.get('pair_accuracy', 0):.3f}, precision {m.get('precision', 0):.3f}, recall {m.get('recall', 0):.3f}).",
        "",
        *_robustness(run),
        "## Limitations",
        f"- Trained on drawings, stamps and a few photos at {cfg['input_size']}x{cfg['input_size']} pixels: fine detail is lost; very small crops (<30% area) "
        "and heavy rotations are outside what it saw.",
        "- Negative pairs in the AUC are random held-out images; visually near-identical *different* images "
        "(e.g. two frames of one video) are harder than these figures suggest.",
    ]
    return "\n".join(lines) + "\n"


def _robustness(run: Path) -> list[str]:
    path = run / "robustness.json"
    if not path.exists():
        return []
    rows = json.loads(path.read_text())
    out = [
        "## Where it fails (`python -m training.robustness RUN`)",
        "Same held-out gallery and queries, each query transformed by only part of the augmentations:",
        "",
        "| query transformations | recall@1 | recall@10 | re-ranked: cosine + head | head alone | view re-scored | view re-scored + head"
        " | verified | plain, verified | pair ROC-AUC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def cell(v: dict, key: str, digits: int) -> str:
        return f"{v[key]:.{digits}f}" if key in v else "-"

    out += [
        f"| {k} | "
        + " | ".join(
            cell(v, key, 3)
            for key in (
                "recall@1", "recall@10", "rerank_recall@1", "head_rerank_recall@1", "view_rescored_recall@1",
                "view_rescored_rerank_recall@1", "verified_recall@1", "plain_verified_recall@1",
            )
        )
        + f" | {cell(v, 'pair_auc', 4)} |"
        for k, v in rows.items()
    ]
    out += [
        "",
        "Rows ending \"originals indexed with crop views\" search a gallery stored as a `--crop-views` collection does"
        " (simserve/inference/crops.py: the whole image and five 75%-side crops, pooled): crops are found more often, uncropped"
        " copies slightly less. Their search re-scores its top candidates by the stored view embeddings (the"
        " view re-scored column): what a crop-views collection's Search returns. The re-ranked columns order each"
        f" query's top 10 (crop views: top 20) by cosine + {HEAD_WEIGHT} x the head's logit (simserve/ranking/pipeline.py), what a"
        " Search with `rerank` returns; \"head alone\" orders them by the head only. \"verified\" is what a collection"
        " created with `--crop-views --verify` returns: the view re-scored top 20 re-ordered by score +"
        f" {INLIER_WEIGHT} x the keypoints one affine map carries from the query onto each candidate (simserve/ranking/verify.py);"
        " \"plain, verified\" the same over a plain collection's top 20 by cosine (`--verify` alone). All columns are"
        " recall@1 but recall@10 and the AUC.",
    ]
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    Path(argv[1]).write_text(card(Path(argv[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
