"""Geometric verification: real photos and stamps, a real SQLite store, a real server."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from simserve.client import Client, Key
from simserve.index.collection import Collections
from simserve.inference.decode import decode_image
from simserve.inference.engine import load_engine
from simserve.jobs.index_folder import index_folder
from simserve.ranking import verify
from simserve.ranking.calibration import evidence_key
from simserve.serve.app import ServerConfig, start
from simserve.serve.service import ImageRef, Service
from tests.conftest import old_store

ROOT = Path(__file__).resolve().parents[1]


def copy_of(img: Image.Image, mirror: bool = False) -> Image.Image:
    """What a re-poster does: crop to about 45% of the area, rotate, maybe mirror, shrink, JPEG."""
    w, h = img.size
    out = img.crop((int(0.2 * w), int(0.15 * h), int(0.85 * w), int(0.85 * h))).rotate(12, Image.Resampling.BILINEAR, expand=True, fillcolor=(255, 255, 255))
    out = ImageOps.mirror(out) if mirror else out
    out = out.resize((200, round(200 * out.height / out.width)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=60)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def stored(img: Image.Image) -> verify.LocalFeatures:
    return verify.unpack(verify.keypoints(img))


def test_a_copy_shares_many_inliers_with_its_original_and_few_with_another_photo(photos):
    originals = {n: stored(im) for n, im in photos.items()}
    for name in ("astronaut", "chelsea", "coffee"):
        q = verify.query_features(copy_of(photos[name]))
        counts = {n: verify.inliers(q, kp) for n, kp in originals.items()}
        assert counts[name] >= 25, counts
        assert counts[name] >= 5 * max(c for n, c in counts.items() if n != name), counts  # chance gives a few


def test_a_mirrored_copy_is_verified_through_the_mirrored_query_features(photos):
    q = verify.query_features(copy_of(photos["astronaut"], mirror=True))
    original = stored(photos["astronaut"])
    as_given, mirrored = (verify.inliers([f], original) for f in q[:2])
    assert mirrored >= 25 and mirrored >= 5 * as_given
    assert verify.inliers(q, original) == mirrored


def test_a_hazy_photo_cut_to_a_quarter_is_verified_through_its_points_found_zoomed_out(photos):
    """A washed-out photo's quarter, as a re-poster saves it: at the keypoints' size its content is
    twice the original's scale, and its strongest corners are detail the original never had. The
    query's points found again at ZOOM_OUT of its size confirm it; another photo stays at chance."""
    from PIL import ImageEnhance, ImageFilter

    hazy = {n: ImageEnhance.Contrast(im.resize((512, round(512 * im.height / im.width))).filter(ImageFilter.GaussianBlur(1))).enhance(0.25) for n, im in photos.items()}
    w, h = hazy["chelsea"].size
    buf = io.BytesIO()
    hazy["chelsea"].crop((int(0.45 * w), int(0.4 * h), int(0.95 * w), int(0.9 * h))).save(buf, "JPEG", quality=75)
    q = verify.query_features(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert len(q) == 3 and q[2].extent == q[0].extent  # given, mirrored, zoomed out: in the given frame
    textured = verify.query_features(photos["astronaut"])  # its points span both sides alike: one frame, where a box cuts them
    assert np.allclose(textured[2].orb_xy.max(axis=0), textured[0].orb_xy.max(axis=0), atol=0.05)
    original = stored(hazy["chelsea"])
    given, mirrored, zoomed = (verify.inliers([f], original) for f in q)
    assert max(given, mirrored) <= 8 and zoomed >= 12, (given, mirrored, zoomed)
    assert verify.inliers(q, original) == zoomed
    assert len(q.share((0.0, 0.0, 1.0, 1.0))) == 2  # a region's share is cut from the given and mirrored sides only
    assert max(verify.inliers([q[2]], stored(hazy[n])) for n in ("astronaut", "coffee", "rocket")) <= 6


def test_matching_stops_at_enough_inliers_without_waiting_for_the_mirrored_points(photos):
    original = stored(photos["coffee"])
    q = verify.query_features(copy_of(photos["coffee"]))
    assert verify.inliers(q, original, enough=20) >= 20
    assert q._mirrored is None and q._zoomed is None  # the given side sufficed: the others were never built
    flipped = verify.query_features(copy_of(photos["coffee"], mirror=True))
    assert verify.inliers(flipped, original, enough=20) >= 20 and flipped._mirrored is not None  # the given fell short


def test_a_copy_certain_on_its_strongest_points_skips_the_full_match(photos):
    original = stored(photos["coffee"])
    q = verify.query_features(copy_of(photos["coffee"]))
    full = verify.inliers(q, original)
    coarse = verify.inliers(q, original, enough=10)
    assert 10 <= coarse < full  # the coarse pass's count, past the stop; the full match finds more


def test_text_over_a_soft_photo_does_not_hide_it_from_the_coarse_pass(photos):
    """Five lines of text over a blurred photo hold its strongest corners: the coarse pass, matching
    only the strongest query points, found 3 inliers. The query's points are spread over the image
    (strongest first in each of 4 x 4 cells), so it sees the photo and the full match runs."""
    from PIL import ImageDraw, ImageFilter, ImageFont

    img = photos["rocket"].resize((512, 512)).filter(ImageFilter.GaussianBlur(4))
    q = img.copy()
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", 40)
    for i in range(5):
        ImageDraw.Draw(q).text((5, 5 + 45 * i), "SALE new photo wow", font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    features = verify.query_features(q)
    assert verify.inliers(features, stored(img)) >= 15
    xy = features[0].orb_xy
    cells = [tuple(c) for c in np.minimum((xy / xy.max(axis=0) * verify.SPREAD_CELLS).astype(int), verify.SPREAD_CELLS - 1)]
    n = len(set(cells))
    assert n >= 12 and len(set(cells[:n])) == n  # the first points: one from each cell that has any


def test_keypoints_pack_both_detectors_and_a_bad_blob_is_refused(photos):
    blob = verify.keypoints(photos["coffee"])
    kp = verify.unpack(blob)
    assert 50 <= len(kp.sift) <= verify.MAX_SIFT and 50 <= len(kp.orb) <= verify.MAX_ORB
    assert len(blob) == 4 + len(kp.sift) * verify.SIFT_POINT.itemsize + len(kp.orb) * verify.ORB_POINT.itemsize
    for xy in (kp.sift_xy, kp.orb_xy):
        assert xy.shape[1] == 2 and xy.min() >= 0 and xy.max() <= 1  # in units of the longer side
    assert np.allclose(np.linalg.norm(kp.sift, axis=1), 1, atol=1e-5)  # RootSIFT: unit length
    assert kp.orb.dtype == np.uint8 and kp.orb.shape[1] == 32
    for bad in (blob[:-1], blob[:3], b"\xff\xff\xff\x7f" + blob[4:]):
        with pytest.raises(ValueError, match="keypoints blob"):
            verify.unpack(bad)
    blank = verify.unpack(verify.keypoints(Image.new("RGB", (64, 64), "white")))  # nothing to find: no points, no inliers
    assert len(blank.sift) == len(blank.orb) == 0
    assert verify.inliers(verify.query_features(Image.new("RGB", (64, 64))), blank) == 0


def test_missing_opencv_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    monkeypatch.setattr(verify, "_local", __import__("threading").local())  # no detectors made yet
    with pytest.raises(verify.VerifyUnavailable, match=r"pip install opencv-python-headless"):
        verify.require()
    with pytest.raises(verify.VerifyUnavailable):
        start(ServerConfig(port=0, verify=True))


def _crop_query(path: Path) -> bytes:
    img = decode_image(path.read_bytes())
    buf = io.BytesIO()
    copy_of(img, mirror=True).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def test_a_verifying_collection_finds_the_copy_first_with_its_inliers_in_the_score(stamp_folder, tmp_path):
    """The default model, real stamps added through the service: a mirrored, rotated crop of one
    is found first with many inliers. Verification goes down the shortlist best-first and stops at
    a certain copy; the score is P(copy) from the bundle's calibration, so the copy scores above
    the bundle's threshold and the rest are ordered by it."""
    engine = load_engine()
    rt = Service(engine, Collections(tmp_path / "rt"), ServerConfig(collection="v", verify=True))
    files = sorted(p for p in stamp_folder.rglob("*.png") if p.name != "broken.png")
    asyncio.run(rt.add("v", [(f.name, f.read_bytes(), None) for f in files], timeout=60))
    col = rt.collection("v")
    assert col.stats()["verify"] is True
    blobs = col.store.keypoints([it.id for it in col.get([f.name for f in files]).values()])
    assert len(blobs) == len(files)
    assert verify.unpack(blobs[col.get([files[0].name])[files[0].name].id]).sift_xy.shape[1] == 2

    target = files[7]
    hits = asyncio.run(rt.search(ImageRef(data=_crop_query(target)), "v", k=5, rerank=0, where={}, timeout=30))
    assert hits[0].key == target.name and hits[0].inliers >= 8, [(h.key, h.score, h.inliers) for h in hits]
    cal = rt.calibrations[evidence_key(col.config.crop_views, True)]
    assert hits[0].score == pytest.approx(float(cal.probability(hits[0].cosine, hits[0].inliers)))
    assert hits[0].score >= cal.threshold and all(0.0 <= h.score <= 1.0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.score < cal.threshold for h in hits[1:]), [(h.key, h.score, h.inliers) for h in hits]
    # with the head as well, the head fuses with the verified score, not the bare cosine
    fused = asyncio.run(rt.search(ImageRef(data=_crop_query(target)), "v", k=5, rerank=20, where={}, timeout=30))
    assert fused[0].key == target.name and fused[0].head_score is not None and fused[0].inliers == hits[0].inliers
    # a stored query verifies with its own stored keypoints (and never finds itself)
    by_key = asyncio.run(rt.search(ImageRef(key=target.name), "v", k=3, rerank=0, where={}, timeout=30))
    assert target.name not in [h.key for h in by_key] and by_key[0].inliers is not None
    rt.close()

    plain = Service(engine, Collections(tmp_path / "plain"), ServerConfig(collection="p", crop_views=False, verify=False))
    asyncio.run(plain.add("p", [(f.name, f.read_bytes(), None) for f in files[:10]], timeout=60))
    assert plain.collection("p").store.keypoints([1, 2]) == {}  # plain collections keep no keypoints
    assert all(h.inliers is None for h in asyncio.run(plain.search(ImageRef(data=_crop_query(target)), "p", k=3, rerank=0, where={}, timeout=30)))
    plain.close()


def test_folder_builds_store_the_same_keypoints_as_server_adds(stamp_folder, tmp_path):
    engine = load_engine()
    col = Collections(tmp_path / "ix").create("b", engine.bundle.embedding_dim, verify=True)
    report = index_folder(engine, col, stamp_folder, progress=False)
    assert report.added == len(list(stamp_folder.rglob("*.png"))) - 1  # all but the broken file
    path = sorted(stamp_folder.rglob("*.png"))[4]
    key = path.relative_to(stamp_folder).as_posix()
    blob = col.store.keypoints([col.get([key])[key].id])
    rt = Service(engine, Collections(tmp_path / "rt"), ServerConfig(collection="r", verify=True))
    asyncio.run(rt.add("r", [(key, path.read_bytes(), None)], timeout=30))
    item = rt.collection("r").get([key])[key]
    assert list(blob.values())[0] == rt.collection("r").store.keypoints([item.id])[item.id]
    rt.close()
    reopened = Collections(tmp_path / "ix").get("b")  # the choice is part of the collection
    assert reopened.config.verify is True
    reopened.close()


def test_a_store_from_before_keypoints_gains_the_column_and_its_old_items_stay_unverified(tmp_path):
    from simserve.index.store import ItemStore, NewItem

    path = tmp_path / "items.sqlite"
    old_store(path, ", views BLOB")
    store = ItemStore(path, 4)
    [new_id], _ = store.add([NewItem("new", np.zeros(4), keypoints=b"\x01" * 40)])
    old_id = store.get(["old"])["old"].id
    assert store.keypoints([old_id, new_id]) == {new_id: b"\x01" * 40}
    store.close()


def test_a_verifying_server_reports_inliers_and_says_so(stamp_folder, tmp_path):
    files = sorted(p for p in stamp_folder.rglob("*.png") if p.name != "broken.png")[:12]
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path), verify=True))
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            assert c.add([(f.name, f, None) for f in files]) == 12
            assert c.stats().verify is True
            # the stamp with the most keypoints (silhouettes have a handful: verification needs detail)
            target = max(files, key=lambda f: len(verify.unpack(verify.keypoints(decode_image(f.read_bytes()))).sift))
            hits = c.search(_crop_query(target), k=3)
            assert hits[0]["key"] == target.name and hits[0]["inliers"] >= 8
            r = subprocess.run(
                [sys.executable, "-m", "simserve.cli", "client", "--target", f"127.0.0.1:{srv.port}", "search", str(target), "-k", "2"],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )
            assert r.returncode == 0 and "inliers" in r.stdout.splitlines()[0] and target.name in r.stdout.splitlines()[0]
            r = subprocess.run(
                [sys.executable, "-m", "simserve.cli", "client", "--target", f"127.0.0.1:{srv.port}", "--json", "stats"],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )
            assert json.loads(r.stdout)["verify"] is True
    finally:
        srv.stop(2)


def test_a_strip_has_no_keypoints_and_no_error():
    """1000 x 4 is 256 x 1 at the keypoint side: OpenCV asserts on it; it simply has no keypoints."""
    blob = verify.keypoints(Image.new("RGB", (1000, 4), (90, 60, 30)))
    stored = verify.unpack(blob)
    assert len(stored.sift) == len(stored.orb) == 0
    assert verify.inliers(verify.query_features(Image.new("RGB", (4, 1000))), stored) == 0


def test_score_pairs_with_the_shipped_model_decides_by_the_calibrated_probability(tmp_path):
    """ScorePairs through a real server and the shipped (calibrated) model: a re-posted copy is a
    match with its inliers in the score, two different drawings are not whatever the head says,
    the score is the same either way round, and a stored key scores with its stored keypoints."""
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path)))
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            seagull, copy, bee = (ROOT / "examples" / n for n in ("seagull.png", "seagull-copy.jpg", "bee.png"))
            s = c.score([(seagull, copy), (copy, seagull), (seagull, bee)])
            assert s[0].match and s[0].score > 0.99 and not s[2].match and s[2].score < 0.05, s
            assert abs(s[0].score - s[1].score) < 1e-6 and 0.0 <= s[2].head_score <= 1.0
            # Issue 23's look-alikes: two different Tux Paint stamps the head alone calls a match (0.998)
            stamps = Path("/usr/share/tuxpaint/stamps/animals/mammals")
            look = c.score([(stamps / "bovines" / "cow.png", stamps / "equines" / "horse.png")])[0]
            assert not look.match and look.score < 0.9 and look.head_score > 0.99, look
            c.add({"gull": seagull})
            by_key = c.score([(Key("gull"), copy)])[0]
            assert by_key.match and by_key.score > 0.99
    finally:
        srv.stop(2)


def test_a_pair_is_scored_with_the_head_in_its_evidence(tmp_path):
    """The shipped bundle has a pair model with the head's score as a third piece of evidence;
    ScorePairs gives exactly its probability (dropping the head's term would change it)."""
    from simserve.ranking.calibration import PAIR, pair_model

    svc = Service(load_engine(None), Collections(tmp_path))
    try:
        seagull, bee = (ROOT / "examples" / n for n in ("seagull.png", "bee.png"))
        refs = [ImageRef(data=seagull.read_bytes()), ImageRef(data=bee.read_bytes())]
        scores, head, cosine, threshold = asyncio.run(svc.score_pairs([tuple(refs)], None, 0.0, None))
        cal = pair_model(svc.calibrations)
        assert cal is svc.calibrations[PAIR] and cal.head > 0 and threshold == cal.threshold
        inliers = svc._pair_inliers(refs, ["a", "b"], [None, None], None)
        assert scores[0] == pytest.approx(float(cal.probability(cosine[0], inliers[0], head[0])))
        assert abs(float(cal.probability(cosine[0], inliers[0])) - scores[0]) > 1e-4  # the head moved it
        assert scores[0] < threshold  # two different drawings
    finally:
        svc.close()


def test_a_query_finds_the_same_points_with_sift_on_another_thread(photos):
    """A search's query finds its SIFT points on a worker thread beside ORB: each thread keeps its
    own detectors, which must be set up alike, so the points are the ones one thread finds."""
    for name in ("astronaut", "coffee"):
        grey = verify._grey(photos[name])
        (s1, o1), (s2, o2) = verify._detect(grey), verify._detect_apart(grey)
        assert len(s1) > 50 and len(o1) > 50
        assert s1.tobytes() == s2.tobytes() and o1.tobytes() == o2.tobytes()
