"""A real server on a loopback port: every RPC, every error code, auth, TLS, health, reflection."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from simserve.bench.hostile import png_claiming as _png_header_claiming
from simserve.client import Client, Key
from simserve.ranking.scores import fused_scores
from simserve.serve.app import ServerConfig, start
from simserve.v1 import simserve_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    # A plain collection: Embed by key returns the stored vector, which crop views would pool.
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path_factory.mktemp("data")), bundle=str(tiny_bundle), metrics_port=0, max_items=64, max_pixels=4_000_000, crop_views=False))
    yield srv
    srv.stop(2)


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=20) as c:
        yield c


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_score_embed_search_add_get_remove_stats_list(client, stamp_folder):
    assert client.health_status() == "SERVING"
    files = sorted(p for p in stamp_folder.rglob("*.png") if p.name != "broken.png")[:12]
    n = client.add([(f.name, f, {"n": i, "kind": "odd" if i % 2 else "even"}) for i, f in enumerate(files)])
    assert n == 12
    scores = client.score([(files[0], files[0]), (files[0], files[1]), (files[1], files[0])])
    assert abs(scores[1].score - scores[2].score) < 1e-6  # symmetric through the service
    assert scores[0].cosine > 0.999
    by_key = client.score([(Key(files[0].name), files[1])])
    assert abs(by_key[0].score - scores[1].score) < 2e-3  # stored float16 features
    embs = client.embed([files[2], Key(files[2].name)])
    assert len(embs[0]) == 24 and np.allclose(embs[0], embs[1], atol=1e-5)
    hits = client.search(files[3], k=3)
    assert hits[0]["key"] == files[3].name and hits[0]["metadata"]["n"] == 3
    hits = client.search(Key(files[3].name), k=3, rerank=8)
    assert files[3].name not in [h["key"] for h in hits] and all(h["head_score"] is not None for h in hits)
    fused = fused_scores(np.array([h["cosine"] + 0.02 * (h["inliers"] or 0) for h in hits]), np.array([h["head_score"] for h in hits])).tolist()
    assert fused == sorted(fused, reverse=True)  # re-ranked by cosine and head together
    odd = client.search(files[3], k=10, where={"kind": "odd"})
    assert odd and all(h["metadata"]["kind"] == "odd" for h in odd)
    got = client.get([files[4].name, "nope"], include_vectors=True)
    assert [i.key for i in got.items] == [files[4].name] and list(got.not_found) == ["nope"]
    assert len(got.items[0].vector) == 24
    rm = client.remove([files[4].name, "nope"])
    assert rm.removed == 1 and list(rm.not_found) == ["nope"]
    st = client.stats()
    assert st.items == 11 and st.indexed == 11 and st.dim == 24
    streamed = client.add_stream(((f"s{i}", files[i], None) for i in range(5)), collection="streamed", batch=2)
    assert streamed == 5 and client.stats("streamed").items == 5
    assert set(client.collections()) >= {"default", "streamed"}


def test_crop_views_server_stores_pooled_vectors_and_says_so(stamp_folder, tmp_path):
    import numpy as np

    from simserve.inference.crops import crop_view_pixels, pool_views
    from simserve.inference.engine import load_engine

    # The default model: its search re-scores by the views, which only a trained model orders well.
    files = sorted(p for p in stamp_folder.rglob("*.png") if p.name != "broken.png")[:6]
    engine = load_engine()
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path), crop_views=True))
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=20) as c:
            assert c.add([(f.name, f, None) for f in files]) == 6
            assert c.stats().crop_views is True
            got = c.get([files[2].name], include_vectors=True).items[0]
            views = crop_view_pixels(files[2].read_bytes(), engine.config.input_size, engine.config.in_channels)
            assert np.allclose(got.vector, pool_views(engine.embed(views)[1][None])[0], atol=1e-5)
            assert c.search(files[2], k=1)[0]["key"] == files[2].name
    finally:
        srv.stop(2)


def test_hnsw_collection_searches_adds_while_buffered_and_after_the_graph_takes_them(tiny_bundle, stamp_folder, tmp_path):
    files = sorted(p for p in stamp_folder.rglob("*.png") if p.name != "broken.png")[:20]
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path), bundle=str(tiny_bundle), factory="HNSW16"))
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=20) as c:
            assert c.add([(f.name, f, None) for f in files]) == 20
            st = c.stats()
            assert st.index_type == "IndexHNSWFlat" and st.items == st.indexed == 20 and 0 <= st.buffered <= 20
            assert c.search(files[7], k=1)[0]["key"] == files[7].name  # buffered or not, it is found
            deadline = time.monotonic() + 30
            while c.stats().buffered and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.stats().buffered == 0 and c.stats().indexed == 20
            assert c.search(files[7], k=1)[0]["key"] == files[7].name
    finally:
        srv.stop(2)


def test_every_error_is_a_clear_status(client):
    png = (EX / "bee.png").read_bytes()
    s = client.similarity
    code, msg = _code(lambda: client.score([(b"garbage", png)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("pairs[0].a:")
    code, msg = _code(lambda: client.score([(png, png[: len(png) // 2])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("pairs[0].b:")
    code, msg = _code(lambda: client.score([]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at least one pair" in msg
    code, msg = _code(lambda: client.score([(_png_header_claiming(50_000, 50_000), png)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pixel" in msg
    code, msg = _code(lambda: client.score([(png, png)] * 65))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "130 images (65 pairs)" in msg and "1024" not in msg
    code, msg = _code(lambda: client.score([(Key("no-such-key"), png)]))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-key" in msg
    code, msg = _code(lambda: client.search(png, collection="no-such-collection"))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-collection" in msg
    code, msg = _code(lambda: client.search(png, k=100000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "k must be" in msg
    code, msg = _code(lambda: s.Search(pb.SearchRequest(), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "query" in msg
    code, msg = _code(lambda: client.index.Add(pb.AddRequest(items=[pb.AddItem(key="x", image=png, metadata_json="{nope")]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "metadata_json" in msg
    code, msg = _code(lambda: client.index.Add(pb.AddRequest(collection="../etc", items=[pb.AddItem(key="x", image=png)]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "collection name" in msg
    code, msg = _code(lambda: client.index.Add(pb.AddRequest(items=[pb.AddItem(key="", image=png)]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "key" in msg
    code, msg = _code(lambda: client.index.Stats(pb.StatsRequest(collection="missing"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    huge = b"\0" * (65 * 1024 * 1024)
    code, _ = _code(lambda: client.embed([huge]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # past the 64 MB message limit
    # a number JSON cannot hold (1e999 parses as Infinity) would break every filtered search later
    code, msg = _code(lambda: client.index.Add(pb.AddRequest(items=[pb.AddItem(key="inf", image=png, metadata_json='{"x": 1e999}')]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in msg
    code, msg = _code(lambda: client.search(png, where={f"f{i}": "v" for i in range(999)}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "999 fields" in msg
    assert client.search(png, where={f"f{i}": "v" for i in range(16)}) == []  # 16 is fine, and matches nothing
    code, msg = _code(lambda: client.embed([_eps()]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "format this server reads" in msg
    assert client.health_status() == "SERVING"  # none of it hurt the server


def _eps() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"


def test_a_small_file_of_many_pixels_decodes_off_the_event_loop(tiny_bundle, tmp_path):
    """A 6600 x 6000 PNG of one colour is ~164 KB, under the inline byte limit, but a big decode:
    the declared pixel count sends it to a worker thread, so health answers meanwhile."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (6600, 6000), (1, 2, 3, 255)).save(buf, "PNG")
    assert len(buf.getvalue()) < 256 * 1024
    import gc

    gc.unfreeze()
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path), bundle=str(tiny_bundle)))  # the default pixel limit
    # What startup loaded is out of the collector's reach: a full pass over it held the GIL 25-45 ms.
    assert gc.get_freeze_count() > 10_000
    try:
        target = f"127.0.0.1:{srv.port}"
        with Client(target, timeout=60) as c, Client(target) as probe:  # the probe on its own channel, as a kubelet's
            done = threading.Event()
            t = threading.Thread(target=lambda: (c.embed([buf.getvalue()] * 4), done.set()))
            t.start()
            slowest, probes = 0.0, 0
            while not done.is_set():
                t0 = time.perf_counter()
                assert probe.health_status() == "SERVING"
                slowest, probes = max(slowest, time.perf_counter() - t0), probes + 1
                time.sleep(0.05)
            t.join()
    finally:
        srv.stop(1)
    assert probes > 5 and slowest < 1.0, (probes, slowest)  # probes time out at 1 s; a strip decoded on the event loop took 4.6 s


def test_a_failed_add_creates_nothing_and_collections_are_limited(tiny_bundle, tmp_path):
    png = (EX / "bee.png").read_bytes()
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path), bundle=str(tiny_bundle), max_collections=2))
    try:
        with Client(f"127.0.0.1:{srv.port}") as c:
            code, _ = _code(lambda: c.index.Add(pb.AddRequest(collection="fresh", items=[pb.AddItem(key="a", image=png), pb.AddItem(key="b", image=b"junk")]), timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert c.index.ListCollections(pb.ListCollectionsRequest(), timeout=5).collections == ["default"]  # nothing half-made
            assert c.index.Add(pb.AddRequest(collection="second", items=[pb.AddItem(key="a", image=png)]), timeout=10).added == 1
            code, msg = _code(lambda: c.index.Add(pb.AddRequest(collection="third", items=[pb.AddItem(key="a", image=png)]), timeout=10))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-collections" in msg
            assert c.index.Add(pb.AddRequest(collection="second", items=[pb.AddItem(key="b", image=png)]), timeout=10).added == 1  # existing ones go on
    finally:
        srv.stop(1)


def test_metrics_count_requests_by_method_and_code(server, client, caplog):
    from simserve.index.collection import Collections
    from simserve.index.store import NewItem

    # A collection on disk that this server has not opened since it started is counted too.
    offline = Collections(server.config.data_dir)
    offline.create("offline", 4).add([NewItem("a", np.ones(4, np.float32)), NewItem("b", np.ones(4, np.float32))])
    offline.close()
    client.stats()
    client.embed([EX / "bee.png"])
    caplog.set_level("INFO", logger="simserve")  # for the whole test: the server logs a call just after answering it
    _code(lambda: client.search(EX / "bee.png", collection="no-such-collection"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'simserve_requests_total{code="OK",method="/simserve.v1.Index/Stats"}' in text
    assert "simserve_batch_size_bucket" in text and "simserve_request_seconds_bucket" in text
    # What an operator expects: the process, requests in flight, where a request's time goes, every collection.
    assert "process_resident_memory_bytes" in text and "process_open_fds" in text and "process_cpu_seconds_total" in text
    assert 'simserve_in_flight_requests{method="/simserve.v1.Similarity/Embed"} 0.0' in text
    for name in ("simserve_queue_wait_seconds", "simserve_engine_seconds", "simserve_decode_seconds"):
        count = re.search(rf"^{name}_count (\S+)$", text, re.M)
        assert count and float(count[1]) >= 1, name
    assert 'simserve_collection_items{collection="offline"} 2.0' in text
    assert re.search(r'^simserve_collection_bytes\{collection="offline"\} [1-9]', text, re.M)
    # The log line of a failed call says why, not only its code.
    deadline = time.monotonic() + 10
    while not (failed := [r for r in caplog.records if getattr(r, "code", "") == "NOT_FOUND"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert failed and "no-such-collection" in failed[-1].error


def test_token_auth_guards_everything_but_health_and_reflection(tiny_bundle, tmp_path):
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path), bundle=str(tiny_bundle), token="s3cret"))
    try:
        target = f"127.0.0.1:{srv.port}"
        with Client(target) as anon, Client(target, token="wrong") as wrong, Client(target, token="s3cret") as ok:
            with Client(target, token="s3cre") as short, Client(target, token="s3cret2") as long_:
                for c in (short, long_):  # prefixes and extensions of the token are refused too
                    assert _code(lambda: c.stats())[0] == grpc.StatusCode.UNAUTHENTICATED
            for c in (anon, wrong):
                code, msg = _code(lambda: c.stats())
                assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in msg
                code, _ = _code(lambda: c.score([(EX / "bee.png", EX / "bee.png")]))
                assert code == grpc.StatusCode.UNAUTHENTICATED
            assert anon.health_status() == "SERVING"
            assert ok.stats().collection == "default"
            assert _services_by_reflection(target) >= {"simserve.v1.Similarity", "simserve.v1.Index"}
    finally:
        srv.stop(1)


def _services_by_reflection(target: str, creds=None) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    with channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        return {s.name for r in responses for s in r.list_services_response.service}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certs(d: Path) -> None:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by it."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    for name, san in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "subjectAltName=DNS:client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def test_tls_and_mutual_tls(tiny_bundle, tmp_path):
    _make_certs(tmp_path)
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path / "d"), bundle=str(tiny_bundle), tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.key")))
    try:
        with Client(f"localhost:{srv.port}", ca_cert=str(tmp_path / "ca.pem")) as c:
            assert c.score([(EX / "bee.png", EX / "bee.png")])[0].cosine > 0.999
        with Client(f"localhost:{srv.port}", retries=0, timeout=3) as plain:
            code, _ = _code(lambda: plain.stats())
            assert code == grpc.StatusCode.UNAVAILABLE  # plaintext against TLS
    finally:
        srv.stop(1)
    srv = start(ServerConfig(port=0, data_dir=str(tmp_path / "d2"), bundle=str(tiny_bundle), tls_cert=str(tmp_path / "server.pem"),
                             tls_key=str(tmp_path / "server.key"), tls_client_ca=str(tmp_path / "ca.pem")))
    try:
        with Client(f"localhost:{srv.port}", ca_cert=str(tmp_path / "ca.pem"), client_cert=str(tmp_path / "client.pem"), client_key=str(tmp_path / "client.key")) as c:
            assert c.stats().collection == "default"
        with Client(f"localhost:{srv.port}", ca_cert=str(tmp_path / "ca.pem"), retries=0, timeout=3) as no_cert:
            code, _ = _code(lambda: no_cert.stats())
            assert code == grpc.StatusCode.UNAVAILABLE  # handshake refused without a client certificate
    finally:
        srv.stop(1)


def test_health_transitions_across_start_and_sigterm(tiny_bundle, tmp_path):
    env = {**os.environ, "SIMSERVE_DATA_DIR": str(tmp_path), "SIMSERVE_PORT": "0", "SIMSERVE_BUNDLE": str(tiny_bundle)}
    proc = subprocess.Popen([sys.executable, "-m", "simserve.cli", "serve", "--grace-s", "5"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.time() + 60
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            if line.startswith("{") and json.loads(line)["msg"] == "serving":
                port = int(json.loads(line)["address"].rsplit(":", 1)[1])
        assert port, "server never said it was serving"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="simserve.v1.Similarity"), timeout=30)
        seen: list[str] = []

        def follow():
            try:
                for r in watch:
                    seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
            except grpc.RpcError:
                pass

        t = threading.Thread(target=follow)
        t.start()
        with Client(f"127.0.0.1:{port}") as c:
            c.add({"bee": EX / "bee.png"})
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        t.join(10)
        assert seen[0] == "SERVING" and "NOT_SERVING" in seen[1:]
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "collections" / "default" / "index.faiss").exists()  # flushed at shutdown


def test_grpcurl_through_reflection_agrees_with_the_python_client(client, server):
    grpcurl = Path(sys.executable).parent / "grpcurl"
    target = f"127.0.0.1:{server.port}"
    listed = subprocess.run([str(grpcurl), "-plaintext", target, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "simserve.v1.Similarity" in listed.stdout and "simserve.v1.Index" in listed.stdout
    import base64

    a, b = (EX / "seagull.png").read_bytes(), (EX / "seagull-copy.jpg").read_bytes()
    req = {"pairs": [{"a": {"data": base64.b64encode(a).decode()}, "b": {"data": base64.b64encode(b).decode()}}]}
    out = subprocess.run([str(grpcurl), "-plaintext", "-d", "@", target, "simserve.v1.Similarity/ScorePairs"], input=json.dumps(req), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = json.loads(out.stdout)["scores"][0]
    ours = client.score([(a, b)])[0]
    assert abs(theirs["score"] - ours.score) < 1e-6 and abs(theirs["cosine"] - ours.cosine) < 1e-6
    client.add({"seagull-ref": EX / "seagull.png"}, collection="grpcurl")
    req = {"collection": "grpcurl", "query": {"data": base64.b64encode(b).decode()}, "k": 1}
    out = subprocess.run([str(grpcurl), "-plaintext", "-d", "@", target, "simserve.v1.Similarity/Search"], input=json.dumps(req), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = json.loads(out.stdout)["neighbors"][0]
    ours = client.search(b, k=1, collection="grpcurl")[0]
    assert theirs["key"] == ours["key"] == "seagull-ref" and abs(theirs["score"] - ours["score"]) < 1e-6


def test_client_cli_add_search_score_stats_health(server, tmp_path):
    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "simserve.cli", "client", "--target", f"127.0.0.1:{server.port}", "--json", *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert cli("--collection", "cli", "add", str(EX)) == {"added": 3, "skipped": 0, "failed": {}}
    hits = cli("--collection", "cli", "search", str(EX / "seagull.png"), "-k", "2")
    assert hits[0]["key"] == "seagull.png" and hits[0]["metadata"] == {"path": "seagull.png"}
    s = cli("--collection", "cli", "score", str(EX / "bee.png"), "key:bee.png")
    assert s["cosine"] > 0.999
    assert cli("--collection", "cli", "stats")["items"] == 3
    assert cli("health") == {"status": "SERVING"}
    r = subprocess.run([sys.executable, "-m", "simserve.cli", "client", "--target", f"127.0.0.1:{server.port}", "--collection", "nope", "stats"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr
    # Options after the action, as people type them.
    r = subprocess.run([sys.executable, "-m", "simserve.cli", "client", "stats", "--target", f"127.0.0.1:{server.port}", "--collection", "cli", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["items"] == 3, r.stderr


def test_client_add_goes_past_bad_files_and_names_each(server, client, tmp_path):
    """One Add is all or nothing on the server; `client add` and Client.add_each still add
    every good image and name every bad one with its reason."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("bee.png", "seagull.png", "seagull-copy.jpg"):
        (folder / name).write_bytes((EX / name).read_bytes())
    (folder / "notes.png").write_text("not an image at all")  # refused by the server
    (folder / "half.png").write_bytes((EX / "bee.png").read_bytes()[:300])  # truncated
    r = subprocess.run([sys.executable, "-m", "simserve.cli", "client", "add", str(folder), "--target", f"127.0.0.1:{server.port}", "--collection", "mixed", "--batch", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr  # something was skipped
    assert "added 3 images to mixed, skipped 2" in r.stdout
    assert "skipped notes.png: INVALID_ARGUMENT" in r.stdout and "skipped half.png: INVALID_ARGUMENT" in r.stdout
    assert client.stats("mixed").items == 3
    rows = [("a", EX / "bee.png", None), ("gone", tmp_path / "no-such.png", None), ("bad", b"garbage", None), ("b", EX / "seagull.png", None)]
    report = client.add_each(rows, collection="each", batch=4)
    assert sorted(report.added) == ["a", "b"] and set(report.failed) == {"gone", "bad"}
    assert "cannot read" in report.failed["gone"] and report.failed["bad"].startswith("INVALID_ARGUMENT: image")
    assert client.stats("each").items == 2


def test_serve_benchmark_runs_end_to_end_with_its_cpu_accounting(tiny_bundle):
    """`simserve bench serve` in miniature: real servers, real load processes, no errors,
    every figure present (a broken load generator would report zero requests)."""
    from simserve.bench import serve as serve_bench

    r = serve_bench.run(str(tiny_bundle), clients=4, procs=1, seconds=1.0, rounds=2, collection_size=600)
    assert r["engine_images_per_s"] > 0 and len(r["engine_per_round"]) == 2
    for label in ("embed_batching_on", "embed_batching_off"):
        m = r[label]
        assert m["requests"] > 0 and m["errors"] == {}, m
        assert len(m["vs_engine_per_round"]) == 2 and m["vs_engine"] > 0
        assert m["server_cpu_s"] > 0 and m["load_cpu_s"] > 0 and m["ceiling_vs_engine"] > 0
    floor = r["grpc_floor"]  # the bare gRPC server under the same load
    assert floor["per_s"] > 0 and floor["server_cpu_ms_per_request"] > 0 and floor["ceiling_vs_engine"] > 0
    assert r["engine_cpu_ms_per_image"] > 0
    assert r["search_600"]["requests"] > 0 and r["search_600"]["errors"] == {}


def test_embed_and_score_agree_whether_decoded_on_the_event_loop_or_a_worker_thread(client, stamp_folder, monkeypatch):
    """Small requests decode on the aio event loop, big ones on a worker thread; the
    answer must not depend on which."""
    import simserve.serve.service

    files = sorted(p for p in stamp_folder.rglob("*.png") if p.name != "broken.png")[:6]
    inline = client.embed(files)
    inline_scores = [s.score for s in client.score([(files[0], files[1]), (files[2], files[3])])]
    monkeypatch.setattr(simserve.serve.service, "INLINE_MAX_BYTES", 0)  # every request is "heavy"
    assert np.array_equal(np.array(client.embed(files)), np.array(inline))
    assert [s.score for s in client.score([(files[0], files[1]), (files[2], files[3])])] == inline_scores
    one_by_one = [client.embed([f])[0] for f in files]
    assert np.allclose(np.array(one_by_one), np.array(inline), atol=1e-6)  # batched with others or alone


def test_serve_refuses_a_busy_port_or_an_impossible_one_in_one_line(server, tmp_path):
    env = {**os.environ, "SIMSERVE_DATA_DIR": str(tmp_path)}
    busy = subprocess.run([sys.executable, "-m", "simserve.cli", "serve", "--port", str(server.port)], capture_output=True, text=True, timeout=60, env=env)
    assert busy.returncode == 2 and "Traceback" not in busy.stderr
    assert busy.stderr.strip().splitlines()[-1] == f"simserve: error: could not listen on 127.0.0.1:{server.port}: the port is in use or the address is not this machine's (--host, --port)"
    for bad in ("99999", "-1", "http"):
        r = subprocess.run([sys.executable, "-m", "simserve.cli", "serve", "--port", bad], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 2 and "argument --port" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "simserve.cli", "client", "--target", f"127.0.0.1:{server.port}", "search", str(EX / "bee.png"), "--where", "bad"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "'bad' is not FIELD=VALUE" in r.stderr and "Traceback" not in r.stderr


def test_compare_and_the_server_give_the_same_scores(server, client, tiny_bundle):
    """`simserve compare` decodes and scores as ScorePairs does: the same files, the same numbers."""
    a, b = EX / "seagull.png", EX / "seagull-copy.jpg"
    r = subprocess.run([sys.executable, "-m", "simserve.cli", "compare", str(a), str(b), "--bundle", str(tiny_bundle), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    local = json.loads(r.stdout)
    remote = client.score([(a, b)])[0]
    assert local["score"] == pytest.approx(remote.score, abs=1e-6) and local["match"] == remote.match
    assert local["cosine"] == pytest.approx(remote.cosine, abs=1e-6) and local["head"] == pytest.approx(remote.head_score, abs=1e-6)
