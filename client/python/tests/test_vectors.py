"""Vectors-only collections: created with ``dims``, filled from a numpy matrix with
``ingest_vectors``, mined with numpy query vectors and checked against numpy's exact cosine
top-k; text queries and documents without vectors are refused with the field named."""
from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Tuple

import grpc
import numpy as np
import pytest

import hardneg

from conftest import Server, free_port

NAME = "vectors16"
DIMS = 16
#: Below the server's index.exact_search_below (20000): the search is exact, so its top-k is
#: numpy's.
N = 2000


class VectorCollection(NamedTuple):
    created: hardneg.pb.CollectionInfo
    reply: hardneg.pb.UpsertResponse
    progress: List[Tuple[int, Optional[int]]]
    ids: List[str]
    texts: List[str]
    vectors: np.ndarray


@pytest.fixture(scope="module")
def collection(server: Server) -> Iterator[VectorCollection]:
    """``NAME``: N random float32 vectors of DIMS, each with its own text, in batches of 500."""
    rng = np.random.default_rng(11)
    vectors = rng.normal(size=(N, DIMS)).astype(np.float32)
    ids = [f"v{i}" for i in range(N)]
    texts = [f"random document {i}" for i in range(N)]
    calls: List[Tuple[int, Optional[int]]] = []
    with server.miner(timeout=120.0) as m:
        created = m.create(NAME, "cosine", dims=DIMS, encoder_name="test-vectors")
        reply = m.ingest_vectors(NAME, ids, vectors, texts, batch_size=500, progress=lambda done, total: calls.append((done, total)))
        yield VectorCollection(created, reply, calls, ids, texts, vectors)
        m.drop(NAME)


def test_the_collection_reports_vectors_only_and_its_dims(miner: hardneg.Miner, collection: VectorCollection) -> None:
    assert (collection.created.vectors_only, collection.created.dims, collection.created.doc_count) == (True, DIMS, 0)
    reply = collection.reply
    assert (reply.inserted, reply.updated, reply.doc_count, reply.pending) == (N, 0, N, 0)
    assert collection.progress == [(500, N), (1000, N), (1500, N), (N, N)]
    info = miner.get(NAME)
    assert (info.vectors_only, info.dims, info.doc_count, info.encoder_name) == (True, DIMS, N, "test-vectors")
    assert info.metric == hardneg.pb.METRIC_COSINE
    assert any(c.name == NAME and c.vectors_only for c in miner.list())


def test_numpy_query_vectors_mine_the_exact_cosine_top_k(miner: hardneg.Miner, collection: VectorCollection) -> None:
    queries = np.random.default_rng(12).normal(size=(6, DIMS)).astype(np.float32)
    # Rows of a numpy matrix are queries as they are.
    response = miner.mine(NAME, queries, num_negatives=8, sampling="top", return_text=True)
    assert len(response.results) == len(queries)
    docs = collection.vectors.astype(np.float64)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    for q, result in zip(queries.astype(np.float64), response.results):
        cosine = docs @ (q / np.linalg.norm(q))
        top = np.argsort(-cosine, kind="stable")[:8]
        assert [n.id for n in result.negatives] == [collection.ids[j] for j in top]
        assert np.allclose([n.score for n in result.negatives], cosine[top], rtol=0, atol=1e-4)
        assert [n.text for n in result.negatives] == [collection.texts[j] for j in top]


def test_text_queries_and_documents_without_vectors_are_refused(miner: hardneg.Miner, collection: VectorCollection) -> None:
    with pytest.raises(hardneg.FailedPrecondition) as text_query:
        miner.mine(NAME, [{"text": "a wing in a slipstream"}], num_negatives=2)
    assert text_query.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "queries[0].vector" in text_query.value.details

    with pytest.raises(hardneg.InvalidArgument) as no_vector:
        miner.ingest(NAME, [{"id": "plain", "text": "a document without a vector"}])
    assert "documents[0].vector" in no_vector.value.details
    assert miner.get(NAME).doc_count == N

    # A document dict carries a numpy row as its vector; the same vector again is an update.
    again = miner.ingest(NAME, [{"id": collection.ids[0], "text": collection.texts[0], "vector": collection.vectors[0]}])
    assert (again.inserted, again.updated, again.doc_count) == (0, 1, N)


def test_vectors_are_checked_and_converted_before_any_call() -> None:
    # Nothing listens on this port: every check below happens in the client.
    with hardneg.Miner(f"127.0.0.1:{free_port()}") as nobody:
        with pytest.raises(ValueError, match="no query_prompt or document_prompt"):
            nobody.create("x", dims=DIMS, document_prompt="passage: ")
        with pytest.raises(ValueError, match="give dims"):
            nobody.create("x", encoder_name="trainer")
        vectors = np.zeros((3, DIMS), dtype=np.float32)
        with pytest.raises(ValueError, match="2 ids but 3 vectors"):
            nobody.ingest_vectors("x", ["a", "b"], vectors)
        with pytest.raises(ValueError, match="3 ids but 2 texts"):
            nobody.ingest_vectors("x", ["a", "b", "c"], vectors, ["t", "u"])
        with pytest.raises(ValueError, match="2-d"):
            nobody.ingest_vectors("x", ["a"], vectors[0])
    row = np.linspace(-1, 1, DIMS, dtype=np.float32)
    doc = hardneg.document({"_id": 7, "text": "t", "vector": row})
    assert doc.id == "7" and np.array_equal(np.asarray(doc.vector, dtype=np.float32), row)
    assert np.array_equal(np.asarray(hardneg.query(row).vector, dtype=np.float32), row)
    assert list(hardneg.query([0.5, 1]).vector) == [0.5, 1.0]
