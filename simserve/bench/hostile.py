"""``simserve bench fuzz``: hostile input against a real server, counted by outcome.

A fixed corpus (every case named, built here from real photos: no files to
download) plus ``cases`` seeded random mutations of valid images go through
gRPC to a ``simserve serve`` process. Each case lists the status codes that
are a correct answer for it; anything else (UNKNOWN, INTERNAL, a dead server,
a wrong result) is a failure. The server's RSS is read before and after.

    simserve bench fuzz --cases 2000 --out docs/bench/fuzz.json
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import numpy as np
from PIL import Image

from simserve.bench.common import photo_sources, rss_mb, start_server
from simserve.v1 import simserve_pb2 as pb
from simserve.v1 import simserve_pb2_grpc as pb_grpc

OK, INVALID, EXHAUSTED, NOT_FOUND = "OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND"


# -- image builders -------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims width x height (CRC fixed): a decompression bomb's header."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def exif_rotated(img: Image.Image) -> bytes:
    """The photo stored rotated, with EXIF orientation 6 telling viewers to turn it back upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    return encode(img.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif.tobytes())


def animated_gif(img: Image.Image) -> bytes:
    frames = [img.convert("P"), img.rotate(90).convert("P"), Image.new("P", img.size)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def modes(img: Image.Image) -> dict[str, bytes]:
    """The photo in every Pillow mode a user's file can arrive in."""
    grey = img.convert("L")
    i16 = Image.fromarray(np.asarray(grey, np.uint16) * 257)  # uint16 -> mode I;16
    return {
        "1": encode(img.convert("1"), "PNG"),
        "L": encode(grey, "PNG"),
        "P": encode(img.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "LA": encode(img.convert("LA"), "PNG"),
        "P-transparency": encode(img.convert("P"), "PNG", transparency=0),
        "RGB": encode(img, "PNG"),
        "RGBA": encode(img.convert("RGBA"), "PNG"),
        "RGBa-transparent-corner": _transparent_corner(img),
        "CMYK-jpeg": encode(img.convert("CMYK"), "JPEG", quality=92),
        "CMYK-tiff": encode(img.convert("CMYK"), "TIFF"),
        "YCbCr-jpeg": encode(img.convert("YCbCr"), "JPEG", quality=92),
        "I;16-png": encode(i16, "PNG"),
        "I-tiff": encode(grey.convert("I"), "TIFF"),
        "F-tiff": encode(grey.convert("F"), "TIFF"),
        "LAB-tiff": encode(img.convert("LAB"), "TIFF"),
        "webp": encode(img, "WEBP", quality=90),
        "webp-lossless": encode(img, "WEBP", lossless=True),
        "bmp": encode(img, "BMP"),
        "gif": encode(img.convert("P"), "GIF"),
        "tiff-deflate": encode(img, "TIFF", compression="tiff_adobe_deflate"),
        "jpeg-progressive": encode(img, "JPEG", quality=85, progressive=True),
    }


def _transparent_corner(img: Image.Image) -> bytes:
    a = img.convert("RGBA")
    px = np.asarray(a).copy()
    px[: px.shape[0] // 4, : px.shape[1] // 4, 3] = 0
    return encode(Image.fromarray(px, "RGBA"), "PNG")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to eight random edits: bit flips, byte runs overwritten, cut, duplicated or dropped."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not b:
            break
        op, i = rng.randrange(5), rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i : i + 8] = bytes(rng.randrange(256) for _ in range(8))
        elif op == 2:
            del b[i:]
        elif op == 3:
            b[i:i] = b[i : i + rng.randint(1, 64)]
        else:
            del b[i : i + rng.randint(1, 64)]
    return bytes(b)


# -- cases ----------------------------------------------------------------------------
@dataclass
class Case:
    category: str
    name: str
    call: Callable[["Stubs"], object]  # returns a response; raises grpc.RpcError
    allowed: set[str]
    check: Callable[[object], bool] | None = None  # on OK: is the answer right?


@dataclass
class Stubs:
    sim: pb_grpc.SimilarityStub
    index: pb_grpc.IndexStub
    channel: grpc.Channel
    timeout: float = 30.0


def _score(a: bytes, b: bytes) -> Callable[[Stubs], object]:
    return lambda s: s.sim.ScorePairs(pb.ScorePairsRequest(pairs=[pb.Pair(a=pb.Image(data=a), b=pb.Image(data=b))]), timeout=s.timeout)


def _embed(data: bytes) -> Callable[[Stubs], object]:
    return lambda s: s.sim.Embed(pb.EmbedRequest(images=[pb.Image(data=data)]), timeout=s.timeout)


def _add(key: str, data: bytes, meta: str = "", collection: str = "") -> Callable[[Stubs], object]:
    req = pb.AddRequest(collection=collection, items=[pb.AddItem(key=key, image=data, metadata_json=meta)])
    return lambda s: s.index.Add(req, timeout=s.timeout)


def _raw(method: str, payload: bytes) -> Callable[[Stubs], object]:
    """Bytes on the wire that are not the message the method expects (wrong field types)."""
    return lambda s: s.channel.unary_unary(method, request_serializer=None, response_deserializer=None)(payload, timeout=s.timeout)


def _matches(resp: object) -> bool:
    return bool(resp.scores[0].match)  # type: ignore[attr-defined]


def corpus() -> list[Case]:
    """The named hostile cases. Built from real photos (scikit-image's, or the installed drawings)."""
    photo = photo_sources()[0].convert("RGB")
    photo.thumbnail((192, 192))
    ref = encode(photo, "PNG")
    cases: list[Case] = []
    add = cases.append

    # random bytes and empty payloads
    rng = random.Random(0)
    for n in (0, 1, 2, 16, 1000, 100_000):
        add(Case("random bytes", f"{n} random bytes", _embed(bytes(rng.randrange(256) for _ in range(n))), {INVALID}))
    for magic in (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"BM"):
        add(Case("random bytes", f"magic {magic[:4]!r} + noise", _embed(magic + bytes(rng.randrange(256) for _ in range(200))), {INVALID}))

    # truncated files of each format
    for fmt, kw in (("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 90}), ("GIF", {}), ("TIFF", {}), ("BMP", {})):
        full = encode(photo if fmt != "GIF" else photo.convert("P"), fmt, **kw)
        for frac in (0.02, 0.3, 0.7, 0.98):
            cut = full[: max(1, int(len(full) * frac))]
            add(Case("truncated", f"{fmt} cut at {frac:.0%}", _embed(cut), {INVALID}))

    # decompression bombs and size extremes
    add(Case("bombs", "PNG header claiming 100k x 100k", _embed(png_claiming(100_000, 100_000)), {EXHAUSTED}))
    add(Case("bombs", "GIF header claiming 65535 x 65535", _embed(gif_claiming(65535, 65535)), {EXHAUSTED}))
    big = Image.new("L", (9000, 9000), 255)  # 81 Mpx of one colour: ~80 KB as PNG
    add(Case("bombs", "real 9000x9000 PNG (81 Mpx, tiny file)", _embed(encode(big, "PNG", optimize=True)), {EXHAUSTED}))
    add(Case("bombs", "PNG header claiming 0 x 0", _embed(png_claiming(0, 0)), {INVALID}))
    add(Case("bombs", "real 1 x 39,999,999 PNG (75 KB: 320 MB of row pointers)", _embed(encode(Image.new("L", (1, 39_999_999), 128), "PNG")), {INVALID}))
    for w, h in ((1, 1), (1, 20_000), (20_000, 1), (20_000, 5), (3, 3)):
        add(Case("size extremes", f"{w}x{h} image", _embed(encode(photo.resize((w, h)), "PNG")), {OK}))

    # every mode and format: must decode AND still match the reference photo
    for name, data in modes(photo).items():
        lossy_grey = name in ("1",)  # 1-bit dithering keeps the shapes, not the tones
        add(Case("modes and formats", name, _score(ref, data), {OK}, None if lossy_grey else _matches))
    add(Case("modes and formats", "EXIF orientation 6 (stored rotated)", _score(ref, exif_rotated(photo)), {OK}, _matches))
    add(Case("modes and formats", "animated GIF (first frame)", _score(ref, animated_gif(photo)), {OK}, _matches))
    # formats outside the allowlist are refused before any decoder reads them (EPS would run Ghostscript)
    for name, data in (("ICO", encode(photo, "ICO", sizes=[(64, 64)])), ("PPM", encode(photo, "PPM")), ("TGA", encode(photo, "TGA")),
                       ("EPS header", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")):
        add(Case("formats refused", name, _embed(data), {INVALID}))

    # requests: empty, oversized, wrong types
    add(Case("requests", "empty ScorePairs", lambda s: s.sim.ScorePairs(pb.ScorePairsRequest(), timeout=s.timeout), {INVALID}))
    add(Case("requests", "empty Embed", lambda s: s.sim.Embed(pb.EmbedRequest(), timeout=s.timeout), {INVALID}))
    add(Case("requests", "empty Search", lambda s: s.sim.Search(pb.SearchRequest(), timeout=s.timeout), {INVALID}))
    add(Case("requests", "empty Add", lambda s: s.index.Add(pb.AddRequest(), timeout=s.timeout), {OK, INVALID}))
    add(Case("requests", "empty Remove", lambda s: s.index.Remove(pb.RemoveRequest(), timeout=s.timeout), {OK}))
    add(Case("requests", "empty Get", lambda s: s.index.Get(pb.GetRequest(), timeout=s.timeout), {OK}))
    add(Case("requests", "image with neither data nor key", lambda s: s.sim.Embed(pb.EmbedRequest(images=[pb.Image()]), timeout=s.timeout), {INVALID}))
    tiny = encode(Image.new("RGB", (1, 1)), "PNG")
    many = pb.ScorePairsRequest(pairs=[pb.Pair(a=pb.Image(data=tiny), b=pb.Image(data=tiny))] * 10_000)
    add(Case("requests", "10,000 pairs of 1x1 PNGs", lambda s: s.sim.ScorePairs(many, timeout=s.timeout), {EXHAUSTED}))
    heavy = pb.ScorePairsRequest(pairs=[pb.Pair(a=pb.Image(data=ref), b=pb.Image(data=ref))] * 10_000)
    add(Case("requests", f"10,000 pairs of {len(ref) // 1024} KB photos (> 64 MB)", lambda s: s.sim.ScorePairs(heavy, timeout=s.timeout), {EXHAUSTED}))
    for method in ("/simserve.v1.Similarity/ScorePairs", "/simserve.v1.Similarity/Search", "/simserve.v1.Index/Add"):
        # protobuf skips a field of the wrong wire type, so this parses as the empty request
        add(Case("requests", f"{method}: field 1 sent as a varint", _raw(method, b"\x08\x96\x01"), {INVALID, OK}))
        add(Case("requests", f"{method}: truncated length-delimited field", _raw(method, b"\x0a\xff\xff\x03abc"), {INVALID}))
        add(Case("requests", f"{method}: invalid UTF-8 in a string field", _raw(method, b"\x12\x02\xc3\x28"), {INVALID, OK, NOT_FOUND}))
    add(Case("requests", "unknown method", _raw("/simserve.v1.Similarity/Nope", b""), {"UNIMPLEMENTED"}))
    add(Case("requests", "k = 10^9", lambda s: s.sim.Search(pb.SearchRequest(query=pb.Image(data=ref), k=10**9), timeout=s.timeout), {INVALID}))
    add(Case("requests", "rerank = 10^9", lambda s: s.sim.Search(pb.SearchRequest(query=pb.Image(data=ref), rerank=10**9), timeout=s.timeout), {INVALID}))
    add(Case("requests", "negative threshold", lambda s: s.sim.ScorePairs(pb.ScorePairsRequest(pairs=[pb.Pair(a=pb.Image(data=ref), b=pb.Image(data=ref))], threshold=-5), timeout=s.timeout), {OK, INVALID}))

    # keys, collections, metadata, filters
    odd_keys = ["ключ", "🙂🙃", "a\0b", "line\nbreak", "../../etc/passwd", "/etc/shadow", "'; DROP TABLE items; --", "%s%n%x", "\u202eevil", " ", "k" * 1024]
    for key in odd_keys:
        add(Case("keys", f"add key {key[:24]!r}", _add(key, ref), {OK}))
        add(Case("keys", f"get key {key[:24]!r} back", (lambda k: lambda s: s.index.Get(pb.GetRequest(keys=[k]), timeout=s.timeout))(key), {OK},
                 (lambda k: lambda r: [i.key for i in r.items] == [k])(key)))  # fmt: skip
        add(Case("keys", f"search by key {key[:24]!r}", (lambda k: lambda s: s.sim.Search(pb.SearchRequest(query=pb.Image(key=k), k=3), timeout=s.timeout))(key), {OK}))
    add(Case("keys", "key of 1025 bytes", _add("k" * 1025, ref), {INVALID}))
    add(Case("keys", "empty key", _add("", ref), {INVALID}))
    add(Case("keys", "a path as an image key (never opened)", lambda s: s.sim.Embed(pb.EmbedRequest(images=[pb.Image(key="/etc/passwd")]), timeout=s.timeout), {NOT_FOUND}))
    for coll in ("../etc", "a/b", "x" * 65, "ünï", ".", "..", "con\0"):
        add(Case("collections", f"add to collection {coll[:20]!r}", _add("k", ref, collection=coll), {INVALID}))
        add(Case("collections", f"stats of collection {coll[:20]!r}", (lambda c: lambda s: s.index.Stats(pb.StatsRequest(collection=c), timeout=s.timeout))(coll), {INVALID, NOT_FOUND}))
    huge_meta = json.dumps({"blob": "x" * (70 * 1024)})
    add(Case("metadata", "70 KB metadata", _add("m1", ref, huge_meta), {EXHAUSTED}))
    add(Case("metadata", "metadata 30,000 levels deep (60 KB)", _add("m2", ref, "[" * 30_000 + "]" * 30_000), {INVALID}))
    add(Case("metadata", "metadata object 10,000 levels deep", _add("m3", ref, '{"a":' * 10_000 + "1" + "}" * 10_000), {INVALID}))
    add(Case("metadata", "metadata not an object", _add("m4", ref, "[1, 2]"), {INVALID}))
    add(Case("metadata", "metadata not JSON", _add("m5", ref, "{nope"), {INVALID}))
    add(Case("metadata", "metadata with NaN", _add("m6", ref, '{"x": NaN}'), {INVALID}))
    add(Case("metadata", "metadata with unicode and odd fields", _add("m7", ref, '{"ü": "🙂", "a b": null, "": 1}'), {OK}))
    add(Case("filters", "filter on a real field", lambda s: s.sim.Search(pb.SearchRequest(query=pb.Image(data=ref), filter={"kind": "x"}), timeout=s.timeout), {OK}))
    for fld in ("a'; DROP TABLE items; --", "$.x", 'a"b', "", "ü", "x" * 10_000):
        add(Case("filters", f"filter field {fld[:20]!r}", (lambda f: lambda s: s.sim.Search(pb.SearchRequest(query=pb.Image(data=ref), filter={f: "1"}), timeout=s.timeout))(fld), {OK, INVALID}))
    return cases


def mutation_cases(n: int, seed: int = 0) -> list[Case]:
    """``n`` random mutations of valid JPEG / PNG / WebP / GIF / TIFF files of real photos."""
    rng = random.Random(seed)
    photos = photo_sources()[:4]
    bases = []
    for p in photos:
        p = p.convert("RGB")
        p.thumbnail((128, 128))
        bases += [encode(p, "JPEG", quality=80), encode(p, "PNG"), encode(p, "WEBP"), encode(p.convert("P"), "GIF"), encode(p, "TIFF")]
    out = []
    for i in range(n):
        data = mutate(rng.choice(bases), rng)
        out.append(Case("mutations", f"mutation {i}", _embed(data), {OK, INVALID, EXHAUSTED}))
    return out


# -- runner ---------------------------------------------------------------------------
@dataclass
class Outcome:
    cases: int = 0
    by_category: dict[str, Counter] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)


def run_cases(target: str, cases: list[Case], alive: Callable[[], bool] = lambda: True) -> Outcome:
    channel = grpc.insecure_channel(target, [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)])
    s = Stubs(pb_grpc.SimilarityStub(channel), pb_grpc.IndexStub(channel), channel)
    out = Outcome()
    for c in cases:
        try:
            resp = c.call(s)
            code = OK
        except grpc.RpcError as e:
            code, resp = e.code().name, e.details()
        out.cases += 1
        out.by_category.setdefault(c.category, Counter())[code] += 1
        wrong = code == OK and c.check is not None and not c.check(resp)
        if code not in c.allowed or wrong:
            out.failures.append({"case": c.name, "category": c.category, "code": code, "allowed": sorted(c.allowed), "wrong_answer": wrong, "detail": str(resp)[:200]})
        if not alive():
            out.failures.append({"case": c.name, "category": c.category, "code": "SERVER DIED"})
            break
    channel.close()
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _decode_seconds(data: bytes) -> float:
    from simserve.inference.decode import decode

    t = time.perf_counter()
    decode(data, min_side=128)
    return round(time.perf_counter() - t, 2)


def pressure(target: str, pid: int) -> dict:
    """Small requests that cost a lot: peak memory under a burst of deep PNGs, health latency while
    the largest images allowed decode, and how long the server keeps working after a client's deadline."""
    import threading

    deep = np.zeros((6000, 6000), np.uint16)
    deep[::7] = 40000
    deep_png = encode(Image.fromarray(deep), "PNG")
    photo = photo_sources()[0].convert("RGB").resize((1500, 1500))
    heavy = [encode(photo.rotate(i), "PNG") for i in range(16)]  # seconds of decoding in all, under the 64 MB message limit
    # The longest single decodes allowed: 40 Mpx of a photo (11 MB), and of one colour (164 KB).
    big = encode(photo.resize((6600, 6000), Image.Resampling.BILINEAR), "PNG")
    flat = encode(Image.new("RGBA", (6600, 6000), (1, 2, 3, 255)), "PNG")
    out: dict = {"deep_png_kb": len(deep_png) // 1024, "big_png_kb": len(big) // 1024, "flat_png_kb": len(flat) // 1024}
    channel = grpc.insecure_channel(target, [("grpc.max_send_message_length", 256 << 20)])
    sim = pb_grpc.SimilarityStub(channel)
    probe = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))

    def embed(images: list[bytes], timeout: float) -> str:
        try:
            sim.Embed(pb.EmbedRequest(images=[pb.Image(data=d) for d in images]), timeout=timeout)
            return OK
        except grpc.RpcError as e:
            return e.code().name

    t = time.perf_counter()
    codes: list[str] = []
    burst = [threading.Thread(target=lambda: codes.append(embed([deep_png] * 4, 120))) for _ in range(6)]
    for th in burst:
        th.start()
    for th in burst:
        th.join()
    out["deep_burst"] = {"requests": 6, "images_each": 4, "codes": dict(Counter(codes)), "seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": rss_mb(pid, "VmHWM")}

    done = threading.Event()
    worker = threading.Thread(target=lambda: (embed([big, flat, big, flat], 120), done.set()))
    worker.start()
    waits = []
    while not done.is_set():
        t = time.perf_counter()
        probe.Check(health_pb2.HealthCheckRequest(), timeout=30)
        waits.append(time.perf_counter() - t)
        time.sleep(0.05)
    worker.join()
    out["health_during_40mpx_decodes_ms"] = {"probes": len(waits), "max": round(max(waits) * 1000, 1), "median": round(float(np.median(waits)) * 1000, 1)}

    def busy_after(images: list[bytes], deadline: float) -> dict:
        """The call's code, and for how long after its deadline the server still worked (until it
        used under 20% of a core for 0.1 s: /proc counts CPU time in 10 ms ticks)."""
        code = embed(images, deadline)
        after = time.perf_counter()
        busy, last = _cpu_seconds(pid), time.perf_counter()
        while time.perf_counter() - after < 30:
            time.sleep(0.1)
            now = _cpu_seconds(pid)
            if now - busy < 0.02:
                break
            busy, last = now, time.perf_counter()
        return {"images": len(images), "deadline_s": deadline, "code": code, "server_busy_for_s": round(last - after, 2)}

    out["after_deadline"] = busy_after(heavy, 1.0)
    # One image that is seconds of a single decode: stopped mid-image, not at the next one.
    out["after_deadline_one_40mpx_png"] = {**busy_after([big], 0.5), "decode_alone_s": _decode_seconds(big), "mb": round(len(big) / 1e6, 1)}
    # libwebp and libtiff decode a frame in one call that cannot be stopped midway: the bound on
    # the work after a deadline is that one call (the goal: stopped within 1 s).
    large = photo.resize((6600, 6000), Image.Resampling.BILINEAR)
    for name, data in (("webp", encode(large, "WEBP", quality=80, method=0)), ("tiff", encode(large, "TIFF", compression="tiff_deflate"))):
        out[f"after_deadline_one_40mpx_{name}"] = {**busy_after([data], 0.5), "decode_alone_s": _decode_seconds(data), "mb": round(len(data) / 1e6, 1)}
    channel.close()
    return out


def run(bundle: str | None = None, cases: int = 1000, seed: int = 0) -> dict:
    """Start a server, throw the corpus and ``cases`` mutations at it, report."""
    with tempfile.TemporaryDirectory() as d:
        proc, addr, log = start_server(d, bundle, ["--max-pixels", "40000000"])
        try:
            alive = lambda: proc.poll() is None  # noqa: E731
            named, muts = corpus(), mutation_cases(cases, seed)
            run_cases(addr, named[:5] + muts[:20], alive)  # warm-up: first batches, allocator, caches
            rss0 = rss_mb(proc.pid)
            t = time.perf_counter()
            result = run_cases(addr, named + muts, alive)
            seconds = time.perf_counter() - t
            rss1 = rss_mb(proc.pid)
            # memory stays bounded: a second full pass must not keep growing
            run_cases(addr, muts, alive)
            rss2 = rss_mb(proc.pid)
            costly = pressure(addr, proc.pid)
        finally:
            code = None
            if proc.poll() is None:
                proc.terminate()
                code = proc.wait(60)
            log_tail = Path(log).read_text(errors="replace").splitlines()[-3:]
    return {
        "cases": result.cases,
        "named_cases": len(named),
        "mutation_cases": len(muts),
        "seconds": round(seconds, 1),
        "outcomes": {k: dict(v) for k, v in sorted(result.by_category.items())},
        "failures": result.failures,
        "server_alive_at_end": code is not None,
        "server_exit_code_on_sigterm": code,
        "rss_mb": {"after_warmup": rss0, "after_run": rss1, "after_second_pass": rss2},
        "pressure": costly,
        "server_log_tail": log_tail,
        "ok": not result.failures and code == 0,
    }
