from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("data", "key")
    DATA_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    key: str
    def __init__(self, data: _Optional[bytes] = ..., key: _Optional[str] = ...) -> None: ...

class Pair(_message.Message):
    __slots__ = ("a", "b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    a: Image
    b: Image
    def __init__(self, a: _Optional[_Union[Image, _Mapping]] = ..., b: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class ScorePairsRequest(_message.Message):
    __slots__ = ("pairs", "collection", "threshold")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[Pair]
    collection: str
    threshold: float
    def __init__(self, pairs: _Optional[_Iterable[_Union[Pair, _Mapping]]] = ..., collection: _Optional[str] = ..., threshold: _Optional[float] = ...) -> None: ...

class PairScore(_message.Message):
    __slots__ = ("score", "match", "cosine", "head_score")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    HEAD_SCORE_FIELD_NUMBER: _ClassVar[int]
    score: float
    match: bool
    cosine: float
    head_score: float
    def __init__(self, score: _Optional[float] = ..., match: _Optional[bool] = ..., cosine: _Optional[float] = ..., head_score: _Optional[float] = ...) -> None: ...

class ScorePairsResponse(_message.Message):
    __slots__ = ("scores", "threshold", "model")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[PairScore]
    threshold: float
    model: str
    def __init__(self, scores: _Optional[_Iterable[_Union[PairScore, _Mapping]]] = ..., threshold: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images", "collection")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    collection: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., collection: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dim", "model")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dim: int
    model: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dim: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "query", "k", "rerank", "filter")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    collection: str
    query: Image
    k: int
    rerank: int
    filter: _containers.ScalarMap[str, str]
    def __init__(self, collection: _Optional[str] = ..., query: _Optional[_Union[Image, _Mapping]] = ..., k: _Optional[int] = ..., rerank: _Optional[int] = ..., filter: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("key", "score", "head_score", "metadata_json", "inliers", "cosine")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    HEAD_SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    INLIERS_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    key: str
    score: float
    head_score: float
    metadata_json: str
    inliers: int
    cosine: float
    def __init__(self, key: _Optional[str] = ..., score: _Optional[float] = ..., head_score: _Optional[float] = ..., metadata_json: _Optional[str] = ..., inliers: _Optional[int] = ..., cosine: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("neighbors",)
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[Neighbor]
    def __init__(self, neighbors: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ...) -> None: ...

class AddItem(_message.Message):
    __slots__ = ("key", "image", "metadata_json")
    KEY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    key: str
    image: bytes
    metadata_json: str
    def __init__(self, key: _Optional[str] = ..., image: _Optional[bytes] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class AddRequest(_message.Message):
    __slots__ = ("collection", "items")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    items: _containers.RepeatedCompositeFieldContainer[AddItem]
    def __init__(self, collection: _Optional[str] = ..., items: _Optional[_Iterable[_Union[AddItem, _Mapping]]] = ...) -> None: ...

class AddResponse(_message.Message):
    __slots__ = ("added", "keys")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    added: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, added: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("collection", "keys")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ("removed", "not_found")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    removed: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, removed: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("collection", "keys", "include_vectors")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    include_vectors: bool
    def __init__(self, collection: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., include_vectors: _Optional[bool] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("key", "metadata_json", "vector", "added_unix")
    KEY_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ADDED_UNIX_FIELD_NUMBER: _ClassVar[int]
    key: str
    metadata_json: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    added_unix: float
    def __init__(self, key: _Optional[str] = ..., metadata_json: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., added_unix: _Optional[float] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("items", "not_found")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("collection", "items", "indexed", "dim", "factory", "index_type", "index_bytes", "pending_training", "buffered", "crop_views", "verify")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PENDING_TRAINING_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_FIELD_NUMBER: _ClassVar[int]
    CROP_VIEWS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    collection: str
    items: int
    indexed: int
    dim: int
    factory: str
    index_type: str
    index_bytes: int
    pending_training: bool
    buffered: int
    crop_views: bool
    verify: bool
    def __init__(self, collection: _Optional[str] = ..., items: _Optional[int] = ..., indexed: _Optional[int] = ..., dim: _Optional[int] = ..., factory: _Optional[str] = ..., index_type: _Optional[str] = ..., index_bytes: _Optional[int] = ..., pending_training: _Optional[bool] = ..., buffered: _Optional[int] = ..., crop_views: _Optional[bool] = ..., verify: _Optional[bool] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collections: _Optional[_Iterable[str]] = ...) -> None: ...
