"""The ``Miner`` client: a thin, typed wrapper over the generated gRPC stub."""
from __future__ import annotations

import collections
import os
import queue
import threading
import time
from typing import (
    Any,
    Callable,
    Deque,
    Generator,
    Iterable,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    overload,
)

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import rows as _rows
from .errors import HardnegError, from_rpc_error
from .v1 import hardneg_pb2 as pb
from .v1 import hardneg_pb2_grpc as pb_grpc

SERVICE = "hardneg.v1.NegativeMiner"

#: A document: a ``Document`` message, a dict with ``id`` (or BEIR's ``_id``), ``text`` and
#: optionally ``title``, ``metadata`` and ``vector`` (a sequence of floats or a 1-d numpy
#: array; required in a vectors-only collection), or an ``(id, text)`` pair.
DocumentLike = Union[pb.Document, Mapping[str, Any], Tuple[str, str]]
#: A query: a ``Query`` message, a dict with any of ``id``, ``text``, ``vector`` (a sequence
#: of floats or a 1-d numpy array), ``positive_ids``, ``positive_texts``, a plain text, or a
#: bare vector (a 1-d numpy array, e.g. a row of a query matrix, or a list of floats).
QueryLike = Union[pb.Query, Mapping[str, Any], str, Sequence[float]]
#: A matrix of vectors: a 2-d numpy array or a sequence of float sequences.
Vectors = Any

_METRICS = {"cosine": pb.METRIC_COSINE, "inner_product": pb.METRIC_INNER_PRODUCT, "ip": pb.METRIC_INNER_PRODUCT}
_QUANTIZATIONS = {"f32": pb.QUANTIZATION_F32, "f16": pb.QUANTIZATION_F16, "i8": pb.QUANTIZATION_I8}
_SAMPLINGS = {
    "top": pb.SAMPLING_TOP,
    "uniform": pb.SAMPLING_UNIFORM,
    "softmax": pb.SAMPLING_SOFTMAX,
    "ambiguous": pb.SAMPLING_AMBIGUOUS,
}
_PRESETS = {"none": pb.PRESET_UNSPECIFIED, "denoised": pb.PRESET_DENOISED}
_OPTION_FIELDS = frozenset(f.name for f in pb.MineOptions.DESCRIPTOR.fields)


def _enum(value: Union[str, int], table: Mapping[str, int], what: str) -> Any:
    if isinstance(value, int):
        return value
    try:
        return table[value.lower()]
    except KeyError:
        raise ValueError(f"{what}: {value!r} is not one of {', '.join(sorted(table))}") from None


def _floats(vector: Any) -> List[float]:
    """A vector as a list of Python floats (numpy arrays through ``tolist``)."""
    if hasattr(vector, "tolist"):
        values = vector.tolist()
        if values and isinstance(values[0], list):
            raise ValueError(f"a vector must be 1-d, got shape {getattr(vector, 'shape', '?')}")
        return values
    return [float(x) for x in vector]


def options(**kwargs: Any) -> pb.MineOptions:
    """``MineOptions`` from keyword arguments named after its proto fields, e.g.
    ``options(num_negatives=5, range_max=30, relative_margin=0.05, sampling="softmax",
    preset="denoised", seed=1, return_text=True)``. ``sampling`` takes ``top``, ``uniform``,
    ``softmax``, ``ambiguous`` (SimANS: around the positive's score, with ``simans_a`` and
    ``simans_b``); ``preset`` takes ``none``, ``denoised``. Unset options keep the server's
    defaults."""
    unknown = set(kwargs) - _OPTION_FIELDS
    if unknown:
        raise TypeError(f"unknown mining option(s): {', '.join(sorted(unknown))}")
    if "sampling" in kwargs:
        kwargs["sampling"] = _enum(kwargs["sampling"], _SAMPLINGS, "sampling")
    if "preset" in kwargs:
        kwargs["preset"] = _enum(kwargs["preset"], _PRESETS, "preset")
    return pb.MineOptions(**{k: v for k, v in kwargs.items() if v is not None})


def query(q: QueryLike) -> pb.Query:
    """A ``Query`` message from any ``QueryLike``."""
    if isinstance(q, pb.Query):
        return q
    if isinstance(q, str):
        return pb.Query(text=q)
    if not isinstance(q, Mapping):
        return pb.Query(vector=_floats(q))
    unknown = set(q) - {"id", "text", "vector", "positive_ids", "positive_texts"}
    if unknown:
        raise TypeError(f"unknown query field(s): {', '.join(sorted(unknown))}")
    vector = q.get("vector")
    return pb.Query(
        id=str(q.get("id") or ""),
        text=q.get("text") or "",
        vector=_floats(vector) if vector is not None else [],
        positive_ids=[str(p) for p in q.get("positive_ids") or ()],
        positive_texts=list(q.get("positive_texts") or ()),
    )


def document(d: DocumentLike) -> pb.Document:
    """A ``Document`` message from any ``DocumentLike`` (a blank title is left unset)."""
    if isinstance(d, pb.Document):
        return d
    if isinstance(d, tuple):
        doc_id, text = d
        return pb.Document(id=str(doc_id), text=text)
    doc_id = d.get("id", d.get("_id"))
    if doc_id is None:
        raise ValueError(f"document without an id: {dict(d)!r:.200}")
    title = d.get("title")
    vector = d.get("vector")
    return pb.Document(
        id=str(doc_id),
        text=d.get("text") or "",
        title=title if title and title.strip() else None,
        metadata={str(k): str(v) for k, v in (d.get("metadata") or {}).items()},
        vector=_floats(vector) if vector is not None else [],
    )


def batch(
    collection: str,
    queries: Iterable[QueryLike],
    *,
    batch_id: int = 0,
    min_generation: Optional[int] = None,
    **mine_options: Any,
) -> pb.MineRequest:
    """A ``MineRequest``: ``queries`` (see ``QueryLike``) mined from ``collection`` with the
    options of :func:`options`, e.g. ``batch("cranfield", [{"text": "...",
    "positive_ids": ["12"]}], num_negatives=5, seed=1)``. ``min_generation`` makes the server
    wait (a bounded time) until the collection's index is at least that generation."""
    return pb.MineRequest(
        collection=collection,
        batch_id=batch_id,
        queries=[query(q) for q in queries],
        options=options(**mine_options),
        min_generation=min_generation,
    )


_build_batch = batch


def _read_certificates(value: Union[bytes, str, "os.PathLike[str]"]) -> bytes:
    if isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _row_ids(ids: Sequence[Any], vectors: Vectors) -> List[str]:
    """The ids of a matrix's rows as strings, checked: one per row of a 2-d matrix."""
    ids = [str(i) for i in ids]
    shape = getattr(vectors, "shape", None)
    if shape is not None and len(shape) != 2:
        raise ValueError(f"vectors must be a 2-d matrix, got shape {tuple(shape)}")
    if len(vectors) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
    return ids


class Miner:
    """A connection to a hardneg server.

    ``addr`` is ``host:port``, optionally with ``http://`` (plaintext) or ``https://`` (TLS).
    ``token`` is sent as ``authorization: Bearer <token>`` on every call (servers started
    with ``HARDNEG_AUTH_TOKEN``). TLS is used for ``https://`` addresses and whenever
    ``root_certificates`` is given: PEM bytes, or the path of a PEM file, of the CA that
    signed the server's certificate (without it, the system's roots are used).
    ``server_name`` overrides the name checked against the certificate. ``timeout`` (seconds)
    bounds every unary call; streams are not bounded.

    Every failed call raises a :class:`hardneg.HardnegError` subclass carrying the gRPC
    status (``.code``) and the server's message (``.details``). A ``Miner`` is safe to share
    between threads; close it (or use it as a context manager) when done.
    """

    def __init__(
        self,
        addr: str = "127.0.0.1:50051",
        token: Optional[str] = None,
        *,
        root_certificates: Union[bytes, str, "os.PathLike[str]", None] = None,
        server_name: Optional[str] = None,
        timeout: Optional[float] = None,
        channel_options: Sequence[Tuple[str, Any]] = (),
    ) -> None:
        tls = root_certificates is not None
        target = addr
        if target.startswith("https://"):
            tls, target = True, target[len("https://"):]
        elif target.startswith("http://"):
            if root_certificates is not None:
                raise ValueError("root_certificates given for an http:// address: use https:// or host:port")
            target = target[len("http://"):]
        target = target.rstrip("/")
        opts: List[Tuple[str, Any]] = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        if server_name:
            opts += [("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)]
        opts += list(channel_options)
        if tls:
            roots = _read_certificates(root_certificates) if root_certificates is not None else None
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots), opts)
        else:
            self._channel = grpc.insecure_channel(target, opts)
        self.addr = addr
        self.tls = tls
        self._metadata: Tuple[Tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._stub = pb_grpc.NegativeMinerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel; calls in progress are cancelled."""
        self._channel.close()

    def __enter__(self) -> "Miner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Callable[..., Any], request: Any, timeout: Optional[float] = None) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout if timeout is not None else self._timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def health(self, timeout: float = 5.0) -> str:
        """The service's health status name: ``"SERVING"`` once the model and collections are
        loaded. Health needs no token."""
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        try:
            response = self._health.Check(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until :meth:`health` says ``SERVING``; raises ``TimeoutError`` after
        ``timeout`` seconds with the last status or error."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                last = self.health(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except HardnegError as e:
                last = str(e)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.addr} not SERVING after {timeout} s: {last}")
            time.sleep(0.1)

    # -- collections -----------------------------------------------------------------------

    def create(
        self,
        name: str,
        metric: Union[str, int] = "cosine",
        quantization: Union[str, int] = "f32",
        *,
        query_prompt: Optional[str] = None,
        document_prompt: Optional[str] = None,
        dims: Optional[int] = None,
        encoder_name: Optional[str] = None,
    ) -> pb.CollectionInfo:
        """Creates an empty collection bound to the server's encoder. ``metric``: ``cosine``
        or ``inner_product``; ``quantization``: ``f32``, ``f16`` or ``i8``.
        ``query_prompt`` / ``document_prompt`` replace the model's own prompts for this
        collection (``None``: the model's; ``""``: no prompt).

        With ``dims``, the collection is vectors-only: the server encodes no text, every
        document carries its ``vector`` of ``dims`` floats (see :meth:`ingest_vectors`) and
        queries carry vectors; it takes no prompts. ``encoder_name`` names the model the
        vectors come from (``None``: the server's default, ``"trainer"``)."""
        if dims is not None and (query_prompt is not None or document_prompt is not None):
            raise ValueError("a vectors-only collection (dims) encodes no text: it takes no query_prompt or document_prompt")
        if encoder_name is not None and dims is None:
            raise ValueError("encoder_name names the vectors of a vectors-only collection: give dims too")
        request = pb.CreateCollectionRequest(
            name=name,
            metric=_enum(metric, _METRICS, "metric"),
            quantization=_enum(quantization, _QUANTIZATIONS, "quantization"),
            dims=dims or 0,
            encoder_name=encoder_name or "",
        )
        if query_prompt is not None:
            request.query_prompt = query_prompt
        if document_prompt is not None:
            request.document_prompt = document_prompt
        return self._unary(self._stub.CreateCollection, request)

    def get(self, name: str) -> pb.CollectionInfo:
        """A collection's document count, dims, encoder, current generation and any refresh
        in progress."""
        return self._unary(self._stub.GetCollection, pb.GetCollectionRequest(name=name))

    def list(self) -> List[pb.CollectionInfo]:
        """Every collection."""
        return list(self._unary(self._stub.ListCollections, pb.ListCollectionsRequest()).collections)

    def drop(self, name: str) -> bool:
        """Removes a collection with its documents, vectors and index (``NotFound`` if there
        is none)."""
        return self._unary(self._stub.DropCollection, pb.DropCollectionRequest(name=name)).dropped

    # -- documents -------------------------------------------------------------------------

    def ingest(
        self,
        collection: str,
        documents: Iterable[DocumentLike],
        *,
        batch_size: int = 64,
        progress: Optional[Callable[[int, Optional[int]], None]] = None,
    ) -> pb.UpsertResponse:
        """Adds or replaces documents (see ``DocumentLike``; BEIR corpus rows work as they
        are), ``batch_size`` per call. The server encodes each batch and stores it durably
        before answering, and ``progress(done, total)`` is called after each (``total`` is
        ``None`` when ``documents`` has no length). Returns the summed ``inserted`` and
        ``updated`` with the final ``doc_count`` and ``pending``. A failed batch raises;
        the batches before it stay stored. In a vectors-only collection every document
        carries its ``vector`` (:meth:`ingest_vectors` sends a whole matrix)."""
        total = len(documents) if hasattr(documents, "__len__") else None  # type: ignore[arg-type]
        return self._upsert(collection, (document(d) for d in documents), total, batch_size, progress)

    def ingest_vectors(
        self,
        collection: str,
        ids: Sequence[str],
        vectors: Vectors,
        texts: Optional[Sequence[str]] = None,
        *,
        batch_size: int = 256,
        progress: Optional[Callable[[int, Optional[int]], None]] = None,
    ) -> pb.UpsertResponse:
        """Adds or replaces one document per row of ``vectors`` (a 2-d numpy array or a
        sequence of float sequences): ``ids[i]`` with row ``i`` as its vector and
        ``texts[i]`` as its text (without ``texts``, the id is the text: the server needs one
        and returns it with negatives). Rows are converted ``batch_size`` at a time as they
        are sent, so the matrix is never copied whole. Returns what :meth:`ingest` returns."""
        ids = _row_ids(ids, vectors)
        if texts is not None and len(texts) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        docs = (
            pb.Document(id=doc_id, text=texts[i] if texts is not None else doc_id, vector=_floats(vectors[i]))
            for i, doc_id in enumerate(ids)
        )
        return self._upsert(collection, docs, len(ids), batch_size, progress)

    def _upsert(
        self,
        collection: str,
        documents: Iterable[pb.Document],
        total: Optional[int],
        batch_size: int,
        progress: Optional[Callable[[int, Optional[int]], None]],
    ) -> pb.UpsertResponse:
        """One Upsert call per ``batch_size`` documents, the replies summed."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        summary = pb.UpsertResponse()
        done = 0
        chunk: List[pb.Document] = []

        def send() -> None:
            nonlocal done
            request = pb.UpsertRequest(collection=collection, documents=chunk)
            try:
                reply = self._stub.Upsert(iter([request]), metadata=self._metadata, timeout=self._timeout)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
            summary.inserted += reply.inserted
            summary.updated += reply.updated
            summary.doc_count = reply.doc_count
            summary.pending = reply.pending
            done += len(chunk)
            chunk.clear()
            if progress is not None:
                progress(done, total)

        for d in documents:
            chunk.append(d)
            if len(chunk) == batch_size:
                send()
        if chunk:
            send()
        elif done == 0:
            info = self.get(collection)
            summary.doc_count, summary.pending = info.doc_count, info.pending_documents
        return summary

    def delete(self, collection: str, ids: Iterable[str]) -> pb.DeleteResponse:
        """Deletes documents by id; the reply counts deleted and unknown ids."""
        return self._unary(self._stub.Delete, pb.DeleteRequest(collection=collection, ids=list(ids)))

    def documents(self, collection: str, ids: Iterable[str]) -> pb.GetDocumentsResponse:
        """Stored documents by id, in request order, and the ids not found."""
        return self._unary(self._stub.GetDocuments, pb.GetDocumentsRequest(collection=collection, ids=list(ids)))

    # -- mining ----------------------------------------------------------------------------

    @overload
    def mine(self, batch: pb.MineRequest) -> pb.MineResponse: ...

    @overload
    def mine(self, batch: str, queries: Iterable[QueryLike], **mine_options: Any) -> pb.MineResponse: ...

    def mine(self, batch: Union[pb.MineRequest, str], queries: Optional[Iterable[QueryLike]] = None, **mine_options: Any) -> pb.MineResponse:
        """Mines one batch: a ``MineRequest`` (see :func:`hardneg.batch`), or a collection
        name, its queries and options (``miner.mine("c", queries, num_negatives=5)``; a 2-d
        numpy array of query vectors works as ``queries``, one query per row).
        One ``QueryResult`` per query, in order, with the negatives best first."""
        if isinstance(batch, str):
            if queries is None:
                raise TypeError("mine(collection, queries, **options): queries missing")
            request = _build_batch(batch, queries, **mine_options)
        else:
            if queries is not None or mine_options:
                raise TypeError("mine(request) takes no queries or options: they are in the request")
            request = batch
        return self._unary(self._stub.Mine, request)

    @overload
    def mine_stream(self, batches: Iterable[pb.MineRequest], prefetch: int = ..., *, with_batches: Literal[False] = ...) -> Generator[pb.MineResponse, None, None]: ...

    @overload
    def mine_stream(self, batches: Iterable[pb.MineRequest], prefetch: int = ..., *, with_batches: Literal[True]) -> Generator[Tuple[pb.MineRequest, pb.MineResponse], None, None]: ...

    def mine_stream(self, batches: Iterable[pb.MineRequest], prefetch: int = 2, *, with_batches: bool = False) -> Generator[Any, None, None]:
        """Mines ``batches`` over one ``MineStream`` call, keeping up to ``prefetch`` of them
        in flight, and yields the responses in batch order (with ``with_batches``, as
        ``(request, response)`` pairs).

        Batches are taken from ``batches`` lazily, in the caller's thread: ``prefetch`` before
        the first response, then one more each time a response arrives, before it is
        yielded. So while the caller works on response ``i``, batches ``i+1 .. i+prefetch``
        are being mined, and a batch built from the caller's latest state (e.g. query vectors
        from the model being trained) is used ``prefetch`` steps later. (The server answers
        up to 4 batches of a stream at a time; more wait in order.)

        A failed batch ends the stream: the responses before it are yielded, then its error
        is raised (the message names the batch). Leaving the loop early cancels the call.
        """
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        return self._stream(iter(batches), prefetch, with_batches)

    def _stream(self, batches: Iterator[pb.MineRequest], prefetch: int, with_batches: bool) -> Generator[Any, None, None]:
        outbox: "queue.Queue[Optional[pb.MineRequest]]" = queue.Queue()
        closed = threading.Event()

        def requests() -> Iterator[pb.MineRequest]:
            # Runs on grpc's sending thread; None closes the request side.
            while True:
                item = outbox.get()
                if item is None:
                    return
                yield item

        in_flight: Deque[pb.MineRequest] = collections.deque()

        def take() -> bool:
            """Sends the next batch, or closes the request side when there is none."""
            try:
                request = next(batches)
            except StopIteration:
                closed.set()
                outbox.put(None)
                return False
            if not isinstance(request, pb.MineRequest):
                raise TypeError(f"mine_stream takes MineRequest messages (see hardneg.batch), got {type(request).__name__}")
            in_flight.append(request)
            outbox.put(request)
            return True

        call = self._stub.MineStream(requests(), metadata=self._metadata)
        try:
            more = True
            for _ in range(prefetch):
                more = take()
                if not more:
                    break
            while in_flight:
                try:
                    response = next(call)
                except StopIteration:
                    raise HardnegError(
                        grpc.StatusCode.INTERNAL,
                        f"the stream ended with {len(in_flight)} batch(es) unanswered",
                    ) from None
                except grpc.RpcError as e:
                    raise from_rpc_error(e) from None
                request = in_flight.popleft()
                if response.batch_id != request.batch_id:
                    raise HardnegError(
                        grpc.StatusCode.INTERNAL,
                        f"response for batch {response.batch_id} came where batch {request.batch_id} was due",
                    )
                if more:
                    more = take()
                yield (request, response) if with_batches else response
            # Every batch answered and the request side closed: the call ends with its status.
            try:
                for extra in call:
                    raise HardnegError(grpc.StatusCode.INTERNAL, f"unexpected response for batch {extra.batch_id}")
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
        finally:
            if not closed.is_set():
                outbox.put(None)
            call.cancel()

    def rows(
        self,
        batch: pb.MineRequest,
        response: pb.MineResponse,
        *,
        format: Literal["n-tuple", "triplet"] = "n-tuple",
        num_negatives: Optional[int] = None,
    ) -> List[dict]:
        """sentence-transformers rows for a mined batch (see :func:`hardneg.rows.rows`),
        fetching the texts of positives given by id from the collection. The batch must have
        been mined with ``return_text=True``."""
        missing = sorted({q.positive_ids[0] for q in batch.queries if not q.positive_texts and q.positive_ids})
        positives = {}
        if missing:
            found = self.documents(batch.collection, missing)
            positives = {d.id: _rows.document_text(d) for d in found.documents}
        return _rows.rows(batch, response, positives, format=format, num_negatives=num_negatives)

    # -- refresh ---------------------------------------------------------------------------

    def refresh_iter(self, collection: str, encoder_dir: str) -> Generator[pb.RefreshProgress, None, None]:
        """Starts a re-encode of ``collection`` with the checkpoint ``encoder_dir`` (a model
        directory under the server's ``encoder.models_root``; relative paths are taken from
        there) and yields its progress until ``phase == "done"``. A refused, failed
        (``INTERNAL``) or cancelled (``ABORTED``) refresh raises. The refresh goes on on the
        server if the caller stops iterating."""
        stream = self._stub.Refresh(pb.RefreshRequest(collection=collection, encoder_dir=encoder_dir), metadata=self._metadata)
        try:
            yield from stream
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            stream.cancel()

    def refresh(
        self,
        collection: str,
        encoder_dir: str,
        progress: Optional[Callable[[pb.RefreshProgress], None]] = None,
    ) -> pb.RefreshProgress:
        """Re-encodes ``collection`` with ``encoder_dir`` (see :meth:`refresh_iter`) and waits
        for the new generation; ``progress`` gets every progress message. Returns the last
        one (``phase == "done"``, ``generation`` the new current generation)."""
        last: Optional[pb.RefreshProgress] = None
        for last in self.refresh_iter(collection, encoder_dir):
            if progress is not None:
                progress(last)
        if last is None or last.phase != "done":
            raise HardnegError(grpc.StatusCode.INTERNAL, f"refresh ended without finishing: {last}")
        return last

    def upload_vectors(
        self,
        collection: str,
        encoder_name: str,
        ids: Sequence[str],
        vectors: Vectors,
        *,
        chunk_size: int = 256,
    ) -> pb.UploadVectorsResponse:
        """Uploads one vector per document (row ``i`` of ``vectors`` for ``ids[i]``; a 2-d
        numpy array or a sequence of float sequences) into the collection's pending
        generation named ``encoder_name``, in messages of ``chunk_size`` vectors over one
        call. Several uploads may add to the same pending generation; the reply says which
        generation and how many live documents still lack a vector."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        ids = _row_ids(ids, vectors)

        def requests() -> Iterator[pb.UploadVectorsRequest]:
            for start in range(0, max(len(ids), 1), chunk_size):
                chunk = [
                    pb.DocumentVector(id=ids[i], vector=_floats(vectors[i]))
                    for i in range(start, min(start + chunk_size, len(ids)))
                ]
                yield pb.UploadVectorsRequest(collection=collection, encoder_name=encoder_name, vectors=chunk)

        try:
            return self._stub.UploadVectors(requests(), metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def commit_vectors(self, collection: str) -> pb.CommitVectorsResponse:
        """Makes the pending trainer generation current; ``FailedPrecondition`` (nothing
        changed) unless every live document has a vector in it."""
        return self._unary(self._stub.CommitVectors, pb.CommitVectorsRequest(collection=collection))

    def refresh_vectors(
        self,
        collection: str,
        encoder_name: str,
        ids: Sequence[str],
        vectors: Vectors,
        *,
        chunk_size: int = 256,
    ) -> pb.CollectionInfo:
        """Uploads the trainer's vectors for the collection's documents and commits them:
        the index is then built from them, and queries must carry vectors from the same
        model. Returns the collection with its new generation."""
        self.upload_vectors(collection, encoder_name, ids, vectors, chunk_size=chunk_size)
        return self.commit_vectors(collection).collection

    def cancel_refresh(self, collection: str) -> pb.CancelRefreshResponse:
        """Stops a running re-encode or discards pending trainer vectors; ``cancelled`` is
        ``False`` when there was nothing to cancel."""
        return self._unary(self._stub.CancelRefresh, pb.CancelRefreshRequest(collection=collection))

    def refresh_progress(self, collection: str) -> Optional[pb.RefreshProgress]:
        """The progress of the collection's running re-encode, or ``None`` when none runs."""
        info = self.get(collection)
        return info.refresh if info.HasField("refresh") else None
