"""hardneg inside sentence-transformers training.

Three ways in, each where a sentence-transformers user already is:

- **Online, in the Trainer.** :class:`MiningCollator` is a data collator: it takes the
  batch's ``(anchor, positive)`` rows, mines negatives for exactly that batch (the queries sent
  as vectors from the model being trained, or as text for the server to encode; the batch's
  own positives excluded) and hands the loss ordinary ``(anchor, positive, negative_1 ..
  negative_n)`` columns, so any loss that takes them (MultipleNegativesRankingLoss,
  CachedMultipleNegativesRankingLoss, GISTEmbedLoss, ...) works unchanged. Passed to a plain
  ``SentenceTransformerTrainer`` it mines each batch as the batch is collated;
  :class:`MiningTrainer` (a ``SentenceTransformerTrainer``) keeps ``prefetch`` batches in
  flight on one ``MineStream`` call, so mining overlaps training.
- **Refresh, as a callback.** :class:`RefreshCallback` moves the index to the model every N
  steps, at each epoch's end or at each evaluation: the trainer's own device encodes the
  corpus and uploads it (under torchrun every rank its shard, rank 0 commits), or a saved
  checkpoint is re-encoded by the server. Later batches ask for the new generation.
- **Offline, one call.** :func:`mine_hard_negatives` takes what
  ``sentence_transformers.util.mine_hard_negatives`` takes and returns the same
  ``datasets.Dataset`` formats, mined by the server.

Needs ``torch``, ``sentence-transformers`` (with ``datasets`` and ``accelerate``, its
``train`` extra): ``pip install "hardneg[train]"``. The rest of the package does not.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple, Union

from ._client import Miner, batch as _batch, document as _document, options as _options
from .rows import document_text
from .errors import NotFound
from .v1 import hardneg_pb2 as pb

try:  # the training stack; the client itself works without it
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"hardneg.training needs torch and sentence-transformers with its training extra ({e}): "
        'pip install "hardneg[train]"'
    ) from e

logger = logging.getLogger(__name__)

__all__ = [
    "Corpus",
    "MinedBatch",
    "MiningCollator",
    "MiningTrainer",
    "RefreshCallback",
    "TopicBatchSampler",
    "cluster_anchors",
    "index_corpus",
    "mine_hard_negatives",
    "positives_of",
    "topic_batches",
]

OnShort = Literal["random", "drop"]


# ------------------------------------------------------------------------------ distributed


def _rank() -> Tuple[int, int]:
    """(rank, world size) of this process under torch.distributed (torchrun), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_ok(ok: bool, what: str) -> None:
    """Every rank learns whether every rank got through ``what``: a rank that failed raises
    its own error; the others raise here instead of waiting forever at the next barrier."""
    rank, world = _rank()
    if world == 1:
        return
    # NCCL reduces CUDA tensors only; gloo (CPU) takes CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.tensor([1 if ok else 0], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    if not ok:
        return  # the caller re-raises its own exception
    if int(flags.item()) == 0:
        raise RuntimeError(f"{what} failed on another rank (its own error is in that rank's output)")


@contextlib.contextmanager
def _every_rank(what: str) -> Iterator[None]:
    """The block runs on this rank; then the ranks wait for each other, and if it failed on
    any of them every rank raises (its own error, or one naming ``what``)."""
    ok = False
    try:
        yield
        ok = True
    finally:
        _all_ok(ok, what)
    _barrier()


# ------------------------------------------------------------------------------ corpus


class Corpus:
    """The documents negatives are mined from, with the ids the server knows them by.

    ``documents`` is a mapping id -> text, a sequence of texts (ids ``"0"``, ``"1"``, ... in
    order), or BEIR-style dicts (``{"_id" or "id", "title", "text"}``; the text is ``title +
    " " + text`` as the server stores it). Texts are deduplicated: a text given twice is one
    document (the first id). :meth:`add` appends texts not present yet (the dataset's
    positives, as ``mine_hard_negatives`` adds them), so every positive has an id.
    """

    def __init__(self, documents: Union[Mapping[str, str], Sequence[str], Sequence[Mapping[str, Any]]] = ()) -> None:
        self.ids: List[str] = []
        self.texts: List[str] = []
        self._id_of: Dict[str, str] = {}
        self._position: Dict[str, int] = {}
        if isinstance(documents, Mapping):
            items: Iterable[Tuple[str, str]] = ((str(k), v) for k, v in documents.items())
        else:
            items = (self._item(i, d) for i, d in enumerate(documents))
        for doc_id, text in items:
            self._append(doc_id, text)

    @staticmethod
    def _item(i: int, d: Any) -> Tuple[str, str]:
        if isinstance(d, str):
            return str(i), d
        if isinstance(d, Mapping):
            if d.get("id", d.get("_id")) is None:
                raise ValueError(f"documents[{i}] has no id (or _id)")
            doc = _document(d)  # id or _id, a blank title left out, as the client sends it
            return doc.id, document_text(doc)
        raise TypeError(f"documents[{i}]: expected a text or a dict, got {type(d).__name__}")

    def _append(self, doc_id: str, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            return  # the server refuses blank documents; they cannot be negatives
        if doc_id in self._position:
            raise ValueError(f"document id {doc_id!r} given twice")
        if text in self._id_of:
            return
        self._position[doc_id] = len(self.ids)
        self._id_of[text] = doc_id
        self.ids.append(doc_id)
        self.texts.append(text)

    def add(self, texts: Iterable[str]) -> List[str]:
        """Appends the texts not in the corpus yet, under fresh ids; returns the new ids."""
        added = []
        for text in texts:
            if isinstance(text, str) and text.strip() and text not in self._id_of:
                doc_id = f"hn-{len(self.ids)}"
                while doc_id in self._position:
                    doc_id += "_"
                self._append(doc_id, text)
                added.append(doc_id)
        return added

    def id_of(self, text: str) -> Optional[str]:
        """The id of the document with exactly this text, or ``None``."""
        return self._id_of.get(text)

    def text_of(self, doc_id: str) -> str:
        return self.texts[self._position[doc_id]]

    def __len__(self) -> int:
        return len(self.ids)


def _encode(model: "SentenceTransformer", texts: Sequence[str], kind: Literal["query", "document"], batch_size: int):
    """Embeddings without gradients as float32 numpy, the model left in the mode it was in
    (``encode`` switches it to eval). Queries and documents go through ``encode_query`` /
    ``encode_document``, so the model's own prompts apply, as in ``mine_hard_negatives``."""
    was_training = model.training
    try:
        fn = model.encode_query if kind == "query" else model.encode_document
        return fn(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False).astype("float32", copy=False)
    finally:
        model.train(was_training)


def index_corpus(
    miner: Miner,
    collection: str,
    corpus: Corpus,
    model: Optional["SentenceTransformer"] = None,
    *,
    encoder_name: str = "step-0",
    batch_size: int = 64,
    metric: str = "cosine",
    vectors: Any = None,
) -> pb.CollectionInfo:
    """Creates ``collection`` holding ``corpus``, ready for :class:`MiningCollator`.

    With ``model``, a vectors-only collection: the model (on the trainer's device) encodes
    the documents and the vectors go up with them; queries must then be vectors from the same
    model (``queries="vectors"``). Without it, the server's own encoder encodes the texts (the
    collection then takes text queries, and refreshes from checkpoints).

    Under torchrun every rank calls it: rank 0 creates the collection, every rank encodes and
    uploads its shard of the corpus (rank r: documents r, r + world, ...), and all return
    together. An existing collection with the same number of documents is reused (with
    ``model``: its index is rebuilt from this model's vectors, as a refresh); one with another
    count is an error. ``vectors`` (a ``(len(corpus), dims)`` matrix in corpus order) are the
    model's document vectors when the caller has them already: they are used as they are.
    """
    if vectors is not None and (model is None or len(vectors) != len(corpus)):
        raise ValueError(f"vectors: one row per corpus document ({len(corpus)}) and the model they come from are needed")
    rank, world = _rank()
    existing: Optional[pb.CollectionInfo] = None
    # Every rank looks before any creates: a rank that looked after rank 0 had created the
    # collection would find it empty and take it for someone else's.
    with _every_rank(f"looking up collection {collection!r}"):
        try:
            existing = miner.get(collection)
        except NotFound:
            existing = None
        if existing is not None and existing.doc_count != len(corpus):
            raise ValueError(
                f"collection {collection!r} holds {existing.doc_count} documents, not the corpus's {len(corpus)}: "
                "drop it or use another name"
            )
    with _every_rank(f"creating collection {collection!r}"):
        if existing is None and rank == 0:
            if model is not None:
                dims = model.get_embedding_dimension()
                miner.create(collection, metric, dims=dims, encoder_name=encoder_name)
            else:
                miner.create(collection, metric)
    with _every_rank(f"uploading the corpus to {collection!r}"):
        ids, texts = corpus.ids[rank::world], corpus.texts[rank::world]
        if model is None:
            if existing is None:
                miner.ingest(collection, list(zip(ids, texts)))
        else:
            shard = vectors[rank::world] if vectors is not None else _encode(model, texts, "document", batch_size)
            if existing is None:
                miner.ingest_vectors(collection, ids, shard, texts)
            else:
                miner.upload_vectors(collection, encoder_name, ids, shard)
    if model is not None and existing is not None:
        with _every_rank(f"committing {collection!r}"):
            if rank == 0:
                miner.commit_vectors(collection)
    return miner.get(collection)


def positives_of(dataset: Any, anchor_column: Optional[str] = None, positive_column: Optional[str] = None) -> Dict[str, List[str]]:
    """Anchor -> every positive text it has in ``dataset`` (the first two columns unless
    named), in dataset order: an anchor on several rows has several positives."""
    columns = dataset.column_names
    anchor_column = anchor_column or columns[0]
    positive_column = positive_column or columns[1]
    out: Dict[str, List[str]] = {}
    for a, p in zip(dataset[anchor_column], dataset[positive_column]):
        ps = out.setdefault(a, [])
        if p not in ps:
            ps.append(p)
    return out


# ------------------------------------------------------------------------------ online


@dataclass
class MinedBatch:
    """One collated batch: the request sent, the server's answer, and what reached the loss.

    ``rows`` are the training rows in column order (anchor, positive, negative_1..n);
    ``negative_ids[i]`` are row i's negatives' document ids as mined (``None`` where a
    missing negative was filled, see ``on_short``); ``dropped_rows`` counts rows left out
    (``on_short="drop"``)."""

    request: pb.MineRequest
    response: pb.MineResponse
    rows: List[Dict[str, Any]]
    negative_ids: List[List[Optional[str]]]
    filled: int = 0
    dropped_rows: int = 0
    wait_s: float = 0.0


class MiningCollator:
    """A data collator for ``SentenceTransformerTrainer`` that mines each batch's negatives.

    The training dataset holds ``(anchor, positive)`` pairs (the first two columns, or
    ``anchor_column`` / ``positive_column``; further columns are kept after the negatives).
    For each batch the collator sends one ``MineRequest`` to ``collection``:

    - ``queries="vectors"`` (default): each anchor as a vector from ``model`` as it is at that
      moment (``encode_query``, without gradients), for a collection indexed with that model's
      vectors (:func:`index_corpus` with ``model``, kept current by :class:`RefreshCallback`);
      ``queries="text"``: the anchor's text, encoded by the server's encoder (a collection
      the server encodes; refreshed from checkpoints).
    - each anchor's positives by id: its row's positive, plus, with ``positives`` (anchor ->
      positive texts, e.g. :func:`positives_of` the training dataset), those of every other
      row with the same anchor. Positives that are not in ``corpus`` cannot be mined, and have
      no score for the margins (a warning says so once): add them to the corpus before
      indexing it (``corpus.add(dataset["positive"])``), as ``mine_hard_negatives`` does.
    - ``num_negatives`` (default 3, as ``mine_hard_negatives``) and every other ``MineOptions``
      field as keyword arguments (``preset``, ``range_max``, ``relative_margin``, ``sampling``,
      ``rerank``, ...), the user's own; the batch's other positives are excluded by the server
      (``exclude_batch_positives``).
    - ``min_generation``: the newest generation a :class:`RefreshCallback` made.

    The negatives come back as text and become the columns ``negative_1`` .. ``negative_n``.
    A query that got fewer than ``num_negatives`` (filters can leave too few):
    ``on_short="random"`` (default) fills the missing ones with documents drawn at random from
    the corpus (seeded, never a positive of the batch), so every row and the batch's shape are
    kept; ``on_short="drop"`` leaves the row out of the batch, as ``mine_hard_negatives``'s
    n-tuple format leaves such a query out (a batch with no row left raises).
    ``mined.filled`` / ``mined.dropped_rows`` count them.

    The rows are then tokenized by sentence-transformers' own collator (``prompts`` and
    ``router_mapping`` as in the training arguments). ``on_batch(mined)`` is called with a
    :class:`MinedBatch` for every batch; ``stats`` sums them. A failed mine raises
    :class:`hardneg.HardnegError`, which stops training.

    A plain ``SentenceTransformerTrainer`` calls the collator once per batch, which mines it
    there and then; :class:`MiningTrainer` pipelines it, ``prefetch`` batches ahead.
    """

    def __init__(
        self,
        miner: Miner,
        collection: str,
        corpus: Corpus,
        model: Optional["SentenceTransformer"] = None,
        *,
        num_negatives: int = 3,
        queries: Literal["vectors", "text"] = "vectors",
        prefetch: int = 2,
        on_short: OnShort = "random",
        anchor_column: Optional[str] = None,
        positive_column: Optional[str] = None,
        positives: Optional[Mapping[str, Sequence[str]]] = None,
        min_generation: Optional[int] = None,
        seed: Optional[int] = None,
        encode_batch_size: int = 64,
        prompts: Optional[Any] = None,
        router_mapping: Optional[Any] = None,
        on_batch: Optional[Callable[[MinedBatch], None]] = None,
        **mine_options: Any,
    ) -> None:
        if queries not in ("vectors", "text"):
            raise ValueError(f"queries must be 'vectors' or 'text', got {queries!r}")
        if model is None:
            raise ValueError("MiningCollator needs the model being trained (model=...): it encodes the queries and tokenizes the rows")
        if on_short not in ("random", "drop"):
            raise ValueError(f"on_short must be 'random' or 'drop', got {on_short!r}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 or more, got {prefetch}")
        mine_options.pop("return_text", None)  # always on: the negatives' texts become the columns
        # Checked now, not at the first batch: unknown options and bad enum values raise here.
        _options(num_negatives=num_negatives, **mine_options)
        self.miner, self.collection, self.corpus, self.model = miner, collection, corpus, model
        self.num_negatives, self.queries, self.prefetch, self.on_short = num_negatives, queries, prefetch, on_short
        self.anchor_column, self.positive_column = anchor_column, positive_column
        self.positives = {k: list(v) for k, v in (positives or {}).items()}
        self.min_generation = min_generation
        self.seed = seed
        self.encode_batch_size = encode_batch_size
        self.mine_options = mine_options
        self.on_batch = on_batch
        self._inner = SentenceTransformerDataCollator(preprocess_fn=model.preprocess, prompts=prompts, router_mapping=router_mapping)
        self.valid_label_columns = self._inner.valid_label_columns
        self._batches = 0
        self._warned_unindexed = False
        self.stats: Dict[str, float] = collections.Counter()

    # -- the three steps of one batch --------------------------------------------------------

    def _columns(self, row: Mapping[str, Any]) -> Tuple[str, str, List[str]]:
        names = [c for c in row if c != "dataset_name"]
        anchor = self.anchor_column or (names[0] if names else None)
        positive = self.positive_column or (names[1] if len(names) > 1 else None)
        if anchor not in row or positive not in row:
            raise ValueError(
                f"MiningCollator: rows need an anchor and a positive column (got columns {names}); "
                "set anchor_column / positive_column"
            )
        rest = [c for c in names if c not in (anchor, positive)]
        return anchor, positive, rest

    def request(self, rows: Sequence[Mapping[str, Any]], batch_id: Optional[int] = None) -> pb.MineRequest:
        """The ``MineRequest`` for a batch of dataset rows (query vectors from the model as it
        is now, when ``queries="vectors"``)."""
        if not rows:
            raise ValueError("MiningCollator: an empty batch")
        anchor_col, positive_col, _ = self._columns(rows[0])
        anchors = [row[anchor_col] for row in rows]
        for i, a in enumerate(anchors):
            if not isinstance(a, str) or not a.strip():
                raise ValueError(f"MiningCollator: row {i} of the batch: column {anchor_col!r} must be a non-empty text")
        queries = []
        vectors = _encode(self.model, anchors, "query", self.encode_batch_size) if self.queries == "vectors" else None
        for i, row in enumerate(rows):
            positive_ids = []
            for text in [row[positive_col], *self.positives.get(row[anchor_col], ())]:
                doc_id = self.corpus.id_of(text) if isinstance(text, str) else None
                if doc_id is None:
                    if not self._warned_unindexed:
                        logger.warning(
                            "a positive is not in the mining corpus: it cannot be excluded by id or scored for the "
                            "margins (add the dataset's positives to the Corpus before indexing it)"
                        )
                        self._warned_unindexed = True
                elif doc_id not in positive_ids:
                    positive_ids.append(doc_id)
            q: Dict[str, Any] = {"text": row[anchor_col], "positive_ids": positive_ids}
            if vectors is not None:
                q["vector"] = vectors[i]
            queries.append(q)
        if batch_id is None:
            batch_id = self._batches
        self._batches += 1
        options = dict(self.mine_options)
        if self.seed is not None and "seed" not in options:
            rank, _ = _rank()
            options["seed"] = (self.seed * 1_000_003 + batch_id * 1_009 + rank) % (2**63)
        return _batch(
            self.collection,
            queries,
            batch_id=batch_id,
            min_generation=self.min_generation,
            num_negatives=self.num_negatives,
            return_text=True,
            **options,
        )

    def collate(self, rows: Sequence[Mapping[str, Any]], request: pb.MineRequest, response: pb.MineResponse, wait_s: float = 0.0) -> Dict[str, Any]:
        """The tokenized batch: the rows with their mined negatives as columns."""
        if len(response.results) != len(rows):
            raise ValueError(f"the response has {len(response.results)} results for a batch of {len(rows)} rows")
        anchor_col, positive_col, rest = self._columns(rows[0])
        n = self.num_negatives
        batch_positives = {pid for q in request.queries for pid in q.positive_ids}
        batch_positive_texts = {row[positive_col] for row in rows}
        rng = random.Random((request.options.seed if request.options.HasField("seed") else 0) * 31 + request.batch_id)
        out_rows: List[Dict[str, Any]] = []
        negative_ids: List[List[Optional[str]]] = []
        filled = dropped = 0
        for row, result in zip(rows, response.results):
            negs = [(neg.id, neg.text) for neg in result.negatives][:n]
            if len(negs) < n:
                if self.on_short == "drop":
                    dropped += 1
                    continue
                taken = {i for i, _ in negs}
                while len(negs) < n:
                    negs.append((None, self._random_document(rng, batch_positives | taken, batch_positive_texts)))
                    filled += 1
            new = {anchor_col: row[anchor_col], positive_col: row[positive_col]}
            for j, (_, text) in enumerate(negs, 1):
                new[f"negative_{j}"] = text
            for c in rest:
                new[c] = row[c]
            if "dataset_name" in row:
                new["dataset_name"] = row["dataset_name"]
            out_rows.append(new)
            negative_ids.append([i for i, _ in negs])
        if not out_rows:
            raise ValueError(
                f"MiningCollator: no query of batch {request.batch_id} got {n} negatives, so on_short='drop' left "
                "the batch empty: loosen the filters, or use on_short='random'"
            )
        mined = MinedBatch(request, response, out_rows, negative_ids, filled, dropped, wait_s)
        self.stats["batches"] += 1
        self.stats["rows"] += len(out_rows)
        self.stats["negatives_filled"] += filled
        self.stats["rows_dropped"] += dropped
        self.stats["mine_wait_s"] += wait_s
        if self.on_batch is not None:
            self.on_batch(mined)
        return self._inner(out_rows)

    def _random_document(self, rng: random.Random, excluded_ids: set, excluded_texts: set) -> str:
        if len(self.corpus) == 0:
            raise ValueError("MiningCollator: on_short='random' needs a non-empty corpus")
        for _ in range(64):
            i = rng.randrange(len(self.corpus))
            if self.corpus.ids[i] not in excluded_ids and self.corpus.texts[i] not in excluded_texts:
                return self.corpus.texts[i]
        raise ValueError("MiningCollator: on_short='random' found no document that is not a positive of the batch")

    # -- the two ways to drive them -----------------------------------------------------------

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        """One batch, mined now (one ``Mine`` call)."""
        if not features:
            return {}
        request = self.request(features)
        started = time.perf_counter()
        response = self.miner.mine(request)
        return self.collate(features, request, response, time.perf_counter() - started)

    def stream(self, row_batches: Iterable[Sequence[Mapping[str, Any]]]) -> Iterator[Dict[str, Any]]:
        """Collated batches for ``row_batches`` (lists of dataset rows), mined over one
        ``MineStream`` call with ``prefetch`` batches in flight: batch i+1 .. i+prefetch are
        being encoded and mined while the caller trains on batch i (their query vectors come
        from the model as it was when they were sent)."""
        if self.prefetch < 1:
            for rows in row_batches:
                yield self(list(rows))
            return
        pending: Deque[List[Mapping[str, Any]]] = collections.deque()

        def requests() -> Iterator[pb.MineRequest]:
            for rows in row_batches:
                rows = list(rows)
                if not rows:
                    continue
                pending.append(rows)
                yield self.request(rows)

        waited = time.perf_counter()
        for request, response in self.miner.mine_stream(requests(), prefetch=self.prefetch, with_batches=True):
            rows = pending.popleft()
            batch = self.collate(rows, request, response, time.perf_counter() - waited)
            yield batch
            waited = time.perf_counter()


class _Rows:
    """The collate function of :class:`MiningTrainer`'s inner DataLoader: rows stay rows."""

    def __init__(self, valid_label_columns: Sequence[str]) -> None:
        self.valid_label_columns = list(valid_label_columns)

    def __call__(self, features: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return features


class _Prefetching:
    """A training DataLoader whose batches are mined over one stream, ``prefetch`` ahead; the
    Trainer sees the wrapped loader's length, sampler and epoch hooks."""

    def __init__(self, loader: Any, collator: MiningCollator) -> None:
        self._loader = loader
        self._collator = collator

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self._collator.stream(iter(self._loader))

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class MiningTrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` that pipelines a :class:`MiningCollator`: the training
    batches are mined over one ``MineStream`` call, ``data_collator.prefetch`` batches ahead
    of the step that trains on them. Everything else (losses, arguments, evaluation,
    callbacks, torchrun) is the library's own; evaluation batches go through the collator
    one at a time. With another collator it is a plain ``SentenceTransformerTrainer``."""

    def get_train_dataloader(self):  # type: ignore[override]
        collator = self.data_collator
        if not isinstance(collator, MiningCollator) or collator.prefetch < 1:
            return super().get_train_dataloader()
        self.data_collator = _Rows(collator.valid_label_columns)
        try:
            loader = super().get_train_dataloader()
        finally:
            self.data_collator = collator
        self._train_dataloader = _Prefetching(loader, collator)
        return self._train_dataloader


# ------------------------------------------------------------------------------ topic batches


def cluster_anchors(
    model: "SentenceTransformer",
    anchors: Sequence[str],
    n_clusters: int,
    *,
    seed: int = 0,
    iterations: int = 10,
    batch_size: int = 64,
) -> List[int]:
    """Each anchor's topic: spherical k-means (cosine similarity; k-means++ seeding drawn with
    ``seed``, then ``iterations`` Lloyd steps) over the model's query embeddings
    (``encode_query``, so the model's prompts apply). Deterministic for given embeddings and
    seed; embeddings made on different devices can differ in their last bits, so
    :func:`topic_batches` clusters on torchrun process 0 only and sends the topics. Time grows with anchors x
    clusters x dimensions per iteration; memory stays at the embeddings plus 8,192 x clusters
    similarities."""
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, got {n_clusters}")
    if not anchors:
        return []
    x = torch.nn.functional.normalize(torch.from_numpy(_encode(model, anchors, "query", batch_size)), dim=1)
    g = torch.Generator().manual_seed(seed)
    k = min(n_clusters, len(anchors))

    def nearest(centroids: "torch.Tensor") -> Tuple["torch.Tensor", "torch.Tensor"]:
        best = [(chunk @ centroids.T).max(dim=1) for chunk in x.split(8192)]
        return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])

    # k-means++: each next seed drawn with probability growing with its distance to the seeds so far.
    chosen = [int(torch.randint(len(anchors), (1,), generator=g))]
    closest = (x @ x[chosen[0]]).clamp(max=1.0)
    while len(chosen) < k:
        weight = (1.0 - closest).clamp(min=0.0) ** 2
        nxt = int(torch.multinomial(weight, 1, generator=g)) if float(weight.sum()) > 0 else int(
            torch.randint(len(anchors), (1,), generator=g))
        chosen.append(nxt)
        closest = torch.maximum(closest, x @ x[nxt])
    centroids = x[chosen].clone()
    assign = nearest(centroids)[1]
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centroids = torch.where((counts > 0)[:, None], torch.nn.functional.normalize(sums, dim=1), centroids)
        assign = nearest(centroids)[1]
    return assign.tolist()


class TopicBatchSampler(DefaultBatchSampler):
    """Batches of anchors on one topic (topic-aware sampling, as TAS-B): the other rows of a
    batch are about the same thing, so the in-batch negatives that losses such as
    MultipleNegativesRankingLoss use are hard ones too, not random documents.

    ``topics[i]`` is row i's topic (see :func:`cluster_anchors`). Each epoch the topics are
    shuffled, and each topic's rows, and the rows are cut into batches in that order, so a
    batch holds one topic (or the end of one and the start of the next). As the library's
    ``NO_DUPLICATES`` sampler, no text appears twice in a batch (any column but the label): a
    row whose text is already in the batch waits for the next batch. Deterministic for a
    given ``seed`` and epoch. ``len`` is the library's estimate (rows / batch size); with
    ``drop_last=False`` a batch closed early by duplicates, and the last one, may be short."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: Optional[List[str]] = None,
        generator: Optional["torch.Generator"] = None,
        seed: int = 0,
        *,
        topics: Sequence[int],
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns,
                         generator=generator, seed=seed)
        if len(topics) != len(dataset):
            raise ValueError(f"topics: one per dataset row ({len(dataset)}), got {len(topics)}")
        labels = set(dataset.column_names) & set(valid_label_columns or [])
        self._columns = [c for c in dataset.column_names if c not in labels]
        self._dataset = dataset
        self._topics = list(topics)

    def _values(self, index: int) -> set:
        row = self._dataset[index]
        return {str(row[c]) for c in self._columns}

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        by_topic: Dict[int, List[int]] = {}
        for i, t in enumerate(self._topics):
            by_topic.setdefault(t, []).append(i)
        groups = list(by_topic.values())
        pending: Deque[int] = collections.deque()
        for t in torch.randperm(len(groups), generator=g).tolist():
            pending.extend(groups[t][j] for j in torch.randperm(len(groups[t]), generator=g).tolist())
        waiting: List[int] = []  # rows that collided with an earlier batch: first in line for the next
        while pending or waiting:
            batch: List[int] = []
            values: set = set()
            collided: List[int] = []

            def offer(i: int) -> None:
                v = self._values(i)
                if v.isdisjoint(values):
                    batch.append(i)
                    values.update(v)
                else:
                    collided.append(i)

            for n, i in enumerate(waiting):
                if len(batch) == self.batch_size:
                    collided.extend(waiting[n:])
                    break
                offer(i)
            while len(batch) < self.batch_size and pending:
                offer(pending.popleft())
            waiting = collided
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch  # never empty: the first row offered always fits
            # With drop_last a short batch (only at the end, or duplicates of one text) is dropped.

    def __len__(self) -> int:
        n = len(self._dataset)
        return n // self.batch_size if self.drop_last else (n + self.batch_size - 1) // self.batch_size


def topic_batches(
    model: "SentenceTransformer",
    *,
    cluster_size: Optional[int] = None,
    max_clusters: int = 1024,
    anchor_column: Optional[str] = None,
    iterations: int = 10,
    encode_batch_size: int = 64,
) -> Callable[..., TopicBatchSampler]:
    """A ``batch_sampler`` for ``SentenceTransformerTrainingArguments`` that draws each batch
    from one topic of the training anchors (:class:`TopicBatchSampler`)::

        args = SentenceTransformerTrainingArguments(..., batch_sampler=training.topic_batches(model))

    When the Trainer builds its data loader, ``model`` encodes the distinct anchors (the first
    column unless ``anchor_column`` names one) and :func:`cluster_anchors` groups them into
    topics of about ``cluster_size`` anchors (default: one batch's worth, in at most
    ``max_clusters`` topics, which bounds the clustering's time on large sets), seeded with
    the Trainer's seed. It is the trainer's model at that moment, so the topics are those of
    the model training starts from. Under torchrun process 0 clusters and sends the topics to
    the others, so that all cut the same batches.

    Related anchors in one batch make every loss that uses in-batch negatives harder, and
    also riskier: a positive of one anchor may be relevant to another anchor of its topic
    and is then a false negative for it. Measure it on held-out queries (bench/train_eval.py
    ``--topic-batches``)."""

    def make(dataset: Any, batch_size: int, drop_last: bool, valid_label_columns: Optional[List[str]] = None,
             generator: Optional["torch.Generator"] = None, seed: int = 0) -> TopicBatchSampler:
        column = anchor_column or dataset.column_names[0]
        if column not in dataset.column_names:
            raise ValueError(f"anchor_column {column!r} is not a column of the training dataset {dataset.column_names}")
        anchors = list(dict.fromkeys(dataset[column]))
        if cluster_size is not None and cluster_size < 1:
            raise ValueError(f"cluster_size must be at least 1, got {cluster_size}")
        if max_clusters < 1:
            raise ValueError(f"max_clusters must be at least 1, got {max_clusters}")
        n = round(len(anchors) / cluster_size) if cluster_size else min(max_clusters, round(len(anchors) / batch_size))
        # Under torchrun process 0 clusters and the others take its topics: every process must
        # cut the same batches (each then trains on its share of them).
        rank, world = _rank()
        found: List[Optional[List[int]]] = [None]
        with _every_rank("clustering the training anchors into topics"):
            if rank == 0:
                found[0] = cluster_anchors(model, anchors, max(1, n), seed=seed, iterations=iterations,
                                           batch_size=encode_batch_size)
        if world > 1:
            torch.distributed.broadcast_object_list(found, src=0)
        topic_of = dict(zip(anchors, found[0] or []))
        return TopicBatchSampler(dataset, batch_size, drop_last, valid_label_columns, generator, seed,
                                 topics=[topic_of[a] for a in dataset[column]])

    return make


# ------------------------------------------------------------------------------ refresh


class RefreshCallback(TrainerCallback):
    """Moves ``collator``'s collection to the model being trained.

    When: every ``every_n_steps`` optimizer steps, and/or at each epoch's end
    (``on_epoch=True``), and/or after each evaluation (``on_evaluate=True``); never after
    the last step (nothing would mine from it).

    How (``mode``):

    - ``"vectors"`` (default): the model encodes the corpus on the trainer's own device
      (``encode_document``) and uploads it as a trainer generation named
      ``f"{name_prefix}-{global_step}"`` (``UploadVectors``); rank 0 commits
      (``CommitVectors``) once every rank has uploaded its shard (rank r: documents r,
      r + world, ...).
    - ``"checkpoint"``: rank 0 saves the model to ``checkpoint_root / f"{name_prefix}-{step}"``
      and the server re-encodes the corpus with it (``Refresh``); ``checkpoint_root`` must be
      the server's ``encoder.models_root`` as this machine sees it.

    Afterwards ``collator.min_generation`` is the new generation, so every batch sent later
    is mined from it (batches already in flight keep theirs). ``history`` lists ``(step,
    generation, seconds)``. A failed refresh raises and stops training.
    """

    def __init__(
        self,
        collator: MiningCollator,
        *,
        every_n_steps: Optional[int] = None,
        on_epoch: bool = False,
        on_evaluate: bool = False,
        mode: Literal["vectors", "checkpoint"] = "vectors",
        checkpoint_root: Optional[Union[str, "os.PathLike[str]"]] = None,
        name_prefix: str = "step",
        batch_size: int = 64,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        if every_n_steps is None and not on_epoch and not on_evaluate:
            raise ValueError("RefreshCallback: say when (every_n_steps, on_epoch or on_evaluate)")
        if mode not in ("vectors", "checkpoint"):
            raise ValueError(f"mode must be 'vectors' or 'checkpoint', got {mode!r}")
        if mode == "checkpoint" and checkpoint_root is None:
            raise ValueError("mode='checkpoint' needs checkpoint_root: the server's encoder.models_root as this machine sees it")
        if mode == "vectors" and collator.queries == "text":
            raise ValueError(
                "mode='vectors' indexes the trainer's vectors, but the collator sends text queries (queries='text'): "
                "use queries='vectors', or mode='checkpoint'"
            )
        self.collator = collator
        self.every_n_steps, self.on_epoch, self.on_evaluate_ = every_n_steps, on_epoch, on_evaluate
        self.mode, self.checkpoint_root, self.name_prefix, self.batch_size = mode, checkpoint_root, name_prefix, batch_size
        self.history: List[Tuple[int, int, float]] = []
        self._last_step: Optional[int] = None

    def _due(self, state: Any) -> bool:
        return state.global_step < state.max_steps and state.global_step != self._last_step

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.every_n_steps and state.global_step % self.every_n_steps == 0 and self._due(state):
            self.refresh(model, state.global_step)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.on_epoch and self._due(state):
            self.refresh(model, state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.on_evaluate_ and self._due(state):
            self.refresh(model, state.global_step)

    def refresh(self, model: Optional["SentenceTransformer"], step: int) -> int:
        """Refreshes now; returns the new generation."""
        model = model if model is not None else self.collator.model
        model = getattr(model, "module", model)  # a DDP-wrapped model
        started = time.perf_counter()
        miner, collection = self.collator.miner, self.collator.collection
        name = f"{self.name_prefix}-{step}"
        rank, world = _rank()
        with _every_rank(f"refresh of {collection!r} at step {step}"):
            if self.mode == "vectors":
                corpus = self.collator.corpus
                ids, texts = corpus.ids[rank::world], corpus.texts[rank::world]
                vectors = _encode(model, texts, "document", self.batch_size)
                miner.upload_vectors(collection, name, ids, vectors)
            elif rank == 0:
                path = os.path.join(os.fspath(self.checkpoint_root), name)
                model.save(path)
        with _every_rank(f"refresh of {collection!r} at step {step}"):
            if rank == 0:
                if self.mode == "vectors":
                    miner.commit_vectors(collection)
                else:
                    miner.refresh(collection, name)
        generation = miner.get(collection).generation
        self.collator.min_generation = generation
        self._last_step = step
        seconds = time.perf_counter() - started
        self.history.append((step, generation, seconds))
        logger.info("hardneg: %s refreshed at step %d: generation %d (%.1f s)", collection, step, generation, seconds)
        return generation


# ------------------------------------------------------------------------------ offline


_SAMPLING = {"top": "top", "random": "uniform"}


def mine_hard_negatives(
    dataset: Any,
    model: Optional["SentenceTransformer"] = None,
    anchor_column_name: Optional[str] = None,
    positive_column_name: Optional[str] = None,
    corpus: Optional[Sequence[str]] = None,
    cross_encoder: Any = None,
    range_min: int = 0,
    range_max: Optional[int] = None,
    max_score: Optional[float] = None,
    min_score: Optional[float] = None,
    absolute_margin: Optional[float] = None,
    relative_margin: Optional[float] = None,
    num_negatives: int = 3,
    sampling_strategy: str = "top",
    query_prompt_name: Optional[str] = None,
    query_prompt: Optional[str] = None,
    corpus_prompt_name: Optional[str] = None,
    corpus_prompt: Optional[str] = None,
    include_positives: bool = False,
    output_format: Literal["triplet", "n-tuple", "labeled-pair", "labeled-list"] = "triplet",
    output_scores: bool = False,
    batch_size: int = 32,
    faiss_batch_size: int = 16384,
    use_faiss: bool = False,
    use_multi_process: Any = False,
    verbose: bool = True,
    cache_folder: Optional[str] = None,
    *,
    miner: Union[Miner, str, None] = None,
    collection: Optional[str] = None,
    request_size: int = 64,
    **hardneg_options: Any,
) -> Any:
    """``sentence_transformers.util.mine_hard_negatives``, mined by a hardneg server.

    Same inputs and outputs: ``dataset`` of (anchor, positive) pairs (an anchor on several
    rows has several positives), an optional ``corpus`` of texts (the positives are added to
    it, duplicates removed), and a ``datasets.Dataset`` back in ``output_format``
    (``"triplet"``, ``"n-tuple"``, ``"labeled-pair"``, ``"labeled-list"``; with
    ``output_scores``, the bi-encoder scores as the library gives them). ``range_min``,
    ``range_max``, ``max_score``, ``min_score``, ``absolute_margin``, ``relative_margin``,
    ``num_negatives`` and ``sampling_strategy`` (``"top"``, ``"random"``) mean what they mean
    there; ``range_max=None`` takes the server's default window, searched deeper when the
    filters leave too few (adaptive depth). Switching is changing the import:
    ``from hardneg.training import mine_hard_negatives``.

    ``miner``: a :class:`hardneg.Miner` or its address (default: ``$HARDNEG_ADDR``, else
    ``127.0.0.1:50051``), so changing the import is enough to switch. With ``model``, the corpus and the
    queries are encoded here by ``model`` (its prompts, ``query_prompt*``/``corpus_prompt*``
    as in the library) into a vectors-only collection; without it, the server's encoder
    encodes them (the server must hold that model). ``collection``: the collection to create
    and keep (default: a temporary one, dropped at the end). Any other ``MineOptions`` field
    goes in ``hardneg_options``: ``preset="denoised"``, ``max_positive_similarity``,
    ``sampling="ambiguous"``, ``rerank=True`` (the server's cross-encoder), ``seed``, ...
    Unlike the library, every other anchor's positives in a request of ``request_size``
    anchors are excluded too (``exclude_batch_positives``, default on).

    Not supported, refused by name: ``cross_encoder`` (pass ``rerank=True`` to use the
    server's cross-encoder) and ``include_positives``. ``faiss_batch_size``, ``use_faiss``,
    ``use_multi_process`` and ``cache_folder`` are accepted and do nothing: the server
    searches its own index.
    """
    from datasets import Dataset

    if cross_encoder is not None:
        raise ValueError("cross_encoder: hardneg reranks with the server's cross-encoder: pass rerank=True instead")
    if include_positives:
        raise ValueError("include_positives: not supported by hardneg (it never returns a positive as a negative)")
    if output_format not in ("triplet", "n-tuple", "labeled-pair", "labeled-list"):
        raise ValueError(f"output_format must be one of 'triplet', 'n-tuple', 'labeled-pair', 'labeled-list', got {output_format!r}")
    if sampling_strategy not in _SAMPLING:
        raise ValueError(f"sampling_strategy must be 'top' or 'random', got {sampling_strategy!r}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
    if range_min < 0:
        raise ValueError(f"range_min must be non-negative, got {range_min}")
    if range_max is not None and range_min >= range_max:
        raise ValueError(f"range_min must be smaller than range_max, got range_min={range_min} and range_max={range_max}")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty. Please provide a non-empty dataset.")
    columns = dataset.column_names
    if not anchor_column_name or anchor_column_name not in columns:
        anchor_column_name = columns[0]
    if not positive_column_name or positive_column_name not in columns:
        if len(columns) < 2:
            raise ValueError("Dataset must contain at least two columns to select the positive column automatically.")
        positive_column_name = columns[1]
    if "sampling" not in hardneg_options:
        hardneg_options["sampling"] = _SAMPLING[sampling_strategy]

    anchors: List[str] = list(dataset[anchor_column_name])
    positives: List[str] = list(dataset[positive_column_name])
    docs = Corpus(list(corpus or []))
    docs.add(positives)
    # One query per distinct anchor, with every positive of its rows.
    by_anchor: Dict[str, List[str]] = {}
    for a, p in zip(anchors, positives):
        ids = by_anchor.setdefault(a, [])
        pid = docs.id_of(p)
        if pid is not None and pid not in ids:
            ids.append(pid)
    unique = list(by_anchor)

    own = not isinstance(miner, Miner)
    client = Miner(miner or os.environ.get("HARDNEG_ADDR", "127.0.0.1:50051")) if own else miner
    name = collection or f"mine-hard-negatives-{uuid.uuid4().hex[:12]}"
    created = False
    try:
        started = time.perf_counter()
        if model is not None:
            doc_vectors = model.encode_document(
                docs.texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=verbose,
                prompt_name=corpus_prompt_name, prompt=corpus_prompt,
            )
            query_vectors = model.encode_query(
                unique, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=verbose,
                prompt_name=query_prompt_name, prompt=query_prompt,
            )
            client.create(name, dims=doc_vectors.shape[1], encoder_name="mine-hard-negatives")
            created = True
            client.ingest_vectors(name, docs.ids, doc_vectors, docs.texts)
        else:
            if query_prompt_name or query_prompt or corpus_prompt_name or corpus_prompt:
                raise ValueError("query/corpus prompts: without a model the server's encoder applies its own prompts")
            query_vectors = None
            client.create(name)
            created = True
            client.ingest(name, list(zip(docs.ids, docs.texts)))
        results = []
        for start in range(0, len(unique), request_size):
            chunk = unique[start : start + request_size]
            queries = []
            for i, a in enumerate(chunk):
                q: Dict[str, Any] = {"id": str(start + i), "text": a, "positive_ids": by_anchor[a]}
                if query_vectors is not None:
                    q["vector"] = query_vectors[start + i]
                queries.append(q)
            response = client.mine(
                name, queries, num_negatives=num_negatives, range_min=range_min, range_max=range_max,
                min_score=min_score, max_score=max_score, absolute_margin=absolute_margin,
                relative_margin=relative_margin, return_text=True, **hardneg_options,
            )
            results.extend(response.results)
    finally:
        if created and collection is None:
            try:
                client.drop(name)
            except Exception:  # the answer is mined; a failed clean-up must not hide it
                logger.warning("mine_hard_negatives: could not drop the temporary collection %s", name)
        if own:
            client.close()

    result_of = dict(zip(unique, results))
    data = _format(anchors, positives, anchor_column_name, positive_column_name, result_of, num_negatives, output_format, output_scores)
    if verbose:
        asked = len(unique)
        short = sum(1 for r in results if len(r.negatives) < num_negatives)
        mined = sum(len(r.negatives) for r in results)
        dropped: Dict[str, int] = collections.Counter()
        for r in results:
            for reason, count in r.dropped.items():
                dropped[reason] += count
        print(
            f"hardneg mined {mined} negatives for {asked} anchors in {time.perf_counter() - started:.1f} s; "
            f"{short} anchors got fewer than {num_negatives}; dropped by reason: {dict(dropped)}"
        )
    return Dataset.from_dict(data)


def _format(
    anchors: List[str],
    positives: List[str],
    anchor_col: str,
    positive_col: str,
    result_of: Mapping[str, pb.QueryResult],
    n: int,
    output_format: str,
    output_scores: bool,
) -> Dict[str, list]:
    """The library's output layouts (see ``sentence_transformers.util.mine_hard_negatives``):
    rows in the order of the anchors' first appearance, each anchor's positives in dataset
    order. A positive's score is the query's lowest-scoring positive's (the server's
    ``positive_score``, the one the margins use)."""
    grouped: Dict[str, List[str]] = {}
    for a, p in zip(anchors, positives):
        ps = grouped.setdefault(a, [])
        if p not in ps:
            ps.append(p)
    out: Dict[str, list] = collections.defaultdict(list)
    if output_format == "triplet":
        out.update({anchor_col: [], positive_col: [], "negative": []})
    for a, ps in grouped.items():
        r = result_of[a]
        negs = [(neg.text, float(neg.score)) for neg in r.negatives][:n]
        pos_score = float(r.positive_score) if r.HasField("positive_score") else float("nan")
        for p in ps:
            if output_format == "triplet":
                for text, score in negs:
                    out[anchor_col].append(a)
                    out[positive_col].append(p)
                    out["negative"].append(text)
                    if output_scores:
                        out["scores"].append([pos_score, score])
            elif output_format == "n-tuple":
                if len(negs) < n:
                    continue
                out[anchor_col].append(a)
                out[positive_col].append(p)
                for j, (text, _) in enumerate(negs, 1):
                    out[f"negative_{j}"].append(text)
                if output_scores:
                    out["scores"].append([pos_score] + [s for _, s in negs])
            elif output_format == "labeled-list":
                if not negs:
                    continue
                out[anchor_col].append(a)
                out[positive_col].append([p] + [t for t, _ in negs])
                if output_scores:
                    out["scores"].append([pos_score] + [s for _, s in negs])
                else:
                    out["labels"].append([1] + [0] * len(negs))
        if output_format == "labeled-pair":
            for p in ps:
                out[anchor_col].append(a)
                out[positive_col].append(p)
                out["score" if output_scores else "label"].append(pos_score if output_scores else 1)
            for text, score in negs:
                out[anchor_col].append(a)
                out[positive_col].append(text)
                out["score" if output_scores else "label"].append(score if output_scores else 0)
    if output_format in ("n-tuple",) and not out:
        out.update({anchor_col: [], positive_col: [], **{f"negative_{j}": [] for j in range(1, n + 1)}})
    return dict(out)
