"""Python client for the simserve gRPC service.

    from simserve.client import Client, Key
    with Client("127.0.0.1:50051") as c:
        c.add({"cat": "cat.jpg"})
        c.score([("a.jpg", "b.jpg")])        # -> [PairScore]
        c.search("query.jpg", k=5, rerank=50)
        c.search(Key("cat"))                 # by a stored item

Images may be paths, bytes, PIL images, or ``Key("...")`` for stored items.
UNAVAILABLE is retried with exponential backoff (every call is safe to
repeat: adds are upserts by key).
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from simserve.v1 import simserve_pb2 as pb
from simserve.v1 import simserve_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Key:
    """An item already stored in the collection, named by its key."""

    key: str


ImageLike = Union[str, os.PathLike, bytes, "PIL.Image.Image", Key]  # noqa: F821


def image_bytes(img: Any) -> bytes:
    if isinstance(img, bytes):
        return img
    if isinstance(img, (str, os.PathLike)):
        return Path(img).read_bytes()
    if hasattr(img, "save"):  # PIL image
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()
    raise TypeError(f"cannot send {type(img).__name__} as an image: give a path, bytes, a PIL image or Key")


def to_image(img: ImageLike) -> pb.Image:
    return pb.Image(key=img.key) if isinstance(img, Key) else pb.Image(data=image_bytes(img))


@dataclass
class AddReport:
    """What ``Client.add_each`` did: the keys added, and each key left out with its reason."""

    added: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


# A refused Add names the one item at fault: "items[3].image: not an image (...)".
_ITEM_ERROR = re.compile(r"^items\[(\d+)\][.:]?\s*(.*)$", re.S)


class Client:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        max_message_mb: int = 64,
    ) -> None:
        size = max_message_mb * 1024 * 1024
        options = [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]
        if tls or ca_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(ca_cert).read_bytes() if ca_cert else None,
                private_key=Path(client_key).read_bytes() if client_key else None,
                certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
            )
            self.channel = grpc.secure_channel(target, creds, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.similarity = pb_grpc.SimilarityStub(self.channel)
        self.index = pb_grpc.IndexStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout, self.retries = timeout, retries

    def _call(self, method: Callable, request: Any, timeout: float | None = None) -> Any:
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- Similarity -------------------------------------------------------------------
    def score(self, pairs: Sequence[tuple[ImageLike, ImageLike]], collection: str = "", threshold: float = 0.0) -> list[pb.PairScore]:
        req = pb.ScorePairsRequest(pairs=[pb.Pair(a=to_image(a), b=to_image(b)) for a, b in pairs], collection=collection, threshold=threshold)
        return list(self._call(self.similarity.ScorePairs, req).scores)

    def embed(self, images: Sequence[ImageLike], collection: str = "") -> list[list[float]]:
        resp = self._call(self.similarity.Embed, pb.EmbedRequest(images=[to_image(i) for i in images], collection=collection))
        return [list(e.values) for e in resp.embeddings]

    def search(self, query: ImageLike, k: int = 10, *, rerank: int = 0, where: Mapping[str, str] | None = None, collection: str = "") -> list[dict[str, Any]]:
        req = pb.SearchRequest(collection=collection, query=to_image(query), k=k, rerank=rerank, filter=dict(where or {}))
        resp = self._call(self.similarity.Search, req)
        return [
            {
                "key": n.key,
                "score": n.score,
                "cosine": n.cosine,
                "head_score": n.head_score if n.HasField("head_score") else None,
                "inliers": n.inliers if n.HasField("inliers") else None,
                "metadata": json.loads(n.metadata_json) if n.metadata_json else None,
            }
            for n in resp.neighbors
        ]

    # -- Index ------------------------------------------------------------------------------
    def add(self, items: Mapping[str, ImageLike] | Iterable[tuple[str, ImageLike, dict | None]], collection: str = "", batch: int = 64) -> int:
        """Add or replace items (key -> image, or (key, image, metadata) tuples), ``batch`` per
        request. All or nothing per request: one bad image raises, and that batch stores nothing
        (the batches before it stay). ``add_each`` adds the rest and names the bad ones instead."""
        rows = [(k, v, None) for k, v in items.items()] if isinstance(items, Mapping) else list(items)
        added = 0
        for s in range(0, len(rows), batch):
            req = pb.AddRequest(collection=collection, items=[_item(*r) for r in rows[s : s + batch]])
            added += self._call(self.index.Add, req).added
        return added

    def add_each(
        self,
        items: Iterable[tuple[str, ImageLike, dict | None]],
        collection: str = "",
        batch: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> AddReport:
        """Add every item that can be added, and name each that cannot with its reason. An Add is
        all or nothing on the server, so a batch refused for one item (the server names it:
        ``items[3].image: ...``) is sent again without it; an unreadable file is skipped before
        sending. Errors that are not one item's (auth, a full disk, a lost server) still raise.
        ``on_batch(n)`` is called as each batch of n items is done (for a progress bar)."""
        report = AddReport()
        rows = list(items)
        for s in range(0, len(rows), batch):
            pending: list[tuple[str, pb.AddItem]] = []
            for key, image, metadata in rows[s : s + batch]:
                try:
                    pending.append((key, _item(key, image, metadata)))
                except (OSError, TypeError) as e:
                    report.failed[key] = f"cannot read: {e.strerror or e}" if isinstance(e, OSError) else str(e)
            while pending:
                try:
                    resp = self._call(self.index.Add, pb.AddRequest(collection=collection, items=[it for _, it in pending]))
                except grpc.RpcError as e:
                    bad = _ITEM_ERROR.match(e.details() or "")
                    if e.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED) or not bad or int(bad[1]) >= len(pending):
                        raise
                    key, _ = pending.pop(int(bad[1]))
                    report.failed[key] = f"{e.code().name}: {bad[2]}"
                    continue
                report.added.extend(resp.keys)
                break
            if on_batch:
                on_batch(len(rows[s : s + batch]))
        return report

    def add_stream(self, items: Iterable[tuple[str, ImageLike, dict | None]], collection: str = "", batch: int = 64) -> int:
        """Bulk load over one client-streaming call; each message is committed as it arrives."""

        def requests():
            chunk = []
            for row in items:
                chunk.append(_item(*row))
                if len(chunk) == batch:
                    yield pb.AddRequest(collection=collection, items=chunk)
                    chunk = []
            if chunk:
                yield pb.AddRequest(collection=collection, items=chunk)

        return self.index.AddStream(requests(), timeout=None, metadata=self.metadata).added

    def remove(self, keys: Sequence[str], collection: str = "") -> pb.RemoveResponse:
        return self._call(self.index.Remove, pb.RemoveRequest(collection=collection, keys=list(keys)))

    def get(self, keys: Sequence[str], collection: str = "", include_vectors: bool = False) -> pb.GetResponse:
        return self._call(self.index.Get, pb.GetRequest(collection=collection, keys=list(keys), include_vectors=include_vectors))

    def stats(self, collection: str = "") -> pb.StatsResponse:
        return self._call(self.index.Stats, pb.StatsRequest(collection=collection))

    def collections(self) -> list[str]:
        return list(self._call(self.index.ListCollections, pb.ListCollectionsRequest()).collections)

    def health_status(self, service: str = "") -> str:
        resp = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _item(key: str, image: ImageLike, metadata: dict | None = None) -> pb.AddItem:
    return pb.AddItem(key=key, image=image_bytes(image), metadata_json=json.dumps(metadata) if metadata else "")
