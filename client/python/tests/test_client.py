"""Collections, ingest, documents, Mine and its errors, and training rows, against the real
server with all-MiniLM-L6-v2 and Cranfield documents."""
from __future__ import annotations

import math
from typing import Dict, List

import grpc
import numpy as np
import pytest

import hardneg
from hardneg import pb

from conftest import DOCS, Ingested, Server, free_port


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def ids(response: pb.MineResponse) -> List[List[str]]:
    return [[n.id for n in r.negatives] for r in response.results]


SMALL = [
    "the wing stalls at high angles of attack",
    "boundary layer transition on a flat plate",
    "heat transfer in hypersonic flow",
    "shock waves in supersonic nozzles",
    "buckling of thin cylindrical shells",
    "flutter of aircraft wings",
]


def small_collection(miner: hardneg.Miner, name: str) -> None:
    miner.create(name)
    reply = miner.ingest(name, [(f"d{i}", t) for i, t in enumerate(SMALL)])
    assert (reply.inserted, reply.updated, reply.doc_count) == (len(SMALL), 0, len(SMALL))


def test_ingest_reports_progress_and_counts(cranfield: Ingested) -> None:
    info, reply = cranfield.info, cranfield.reply
    assert (info.name, info.dims, info.doc_count, info.generation) == ("cran", 384, 0, 1)
    assert info.metric == pb.METRIC_COSINE and info.quantization == pb.QUANTIZATION_F32
    assert info.encoder_name == "all-MiniLM-L6-v2" and info.encoder_kind == "server"
    assert (reply.inserted, reply.updated, reply.doc_count, reply.pending) == (DOCS, 0, DOCS, 0)
    # One call per 64 documents, each reported once durable.
    assert cranfield.progress == [(64, DOCS), (128, DOCS), (DOCS, DOCS)]


def test_collections_documents_and_their_errors(miner: hardneg.Miner, cranfield: Ingested) -> None:
    assert miner.health() == "SERVING"
    small_collection(miner, "small")
    assert {c.name for c in miner.list()} >= {"cran", "small"}
    assert miner.get("small").doc_count == len(SMALL)

    # Updates replace; a generator has no length, so progress has no total.
    seen = []
    docs = ({"_id": "d1", "title": "Transition", "text": "on a cone", "metadata": {"source": "test"}} for _ in range(1))
    reply = miner.ingest("small", docs, progress=lambda done, total: seen.append((done, total)))
    assert (reply.inserted, reply.updated, reply.doc_count) == (0, 1, len(SMALL))
    assert seen == [(1, None)]
    nothing = miner.ingest("small", [])
    assert (nothing.inserted, nothing.updated, nothing.doc_count) == (0, 0, len(SMALL))
    got = miner.documents("small", ["d1", "d0", "nope"])
    assert [d.id for d in got.documents] == ["d1", "d0"] and list(got.missing) == ["nope"]
    assert (got.documents[0].title, got.documents[0].text, dict(got.documents[0].metadata)) == ("Transition", "on a cone", {"source": "test"})
    assert hardneg.document_text(got.documents[0]) == "Transition on a cone"
    assert hardneg.document_text(got.documents[1]) == SMALL[0]

    deleted = miner.delete("small", ["d5", "zz"])
    assert (deleted.deleted, deleted.not_found) == (1, 1)
    assert miner.get("small").doc_count == len(SMALL) - 1

    with pytest.raises(hardneg.AlreadyExists) as exists:
        miner.create("small")
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(hardneg.InvalidArgument) as e:
        miner.create("bad/name")
    assert e.value.status == "INVALID_ARGUMENT" and "name" in e.value.details
    with pytest.raises(hardneg.InvalidArgument) as e:
        miner.ingest("small", [("", "text without an id")])
    assert "documents[0].id" in e.value.details
    with pytest.raises(hardneg.NotFound) as missing:
        miner.get("missing")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and "missing" in missing.value.details
    with pytest.raises(ValueError, match="quantization"):
        miner.create("x", quantization="f8")

    # Prompts in place of the model's own (all-MiniLM-L6-v2 has none): recorded and shown.
    prompted = miner.create("prompted", query_prompt="query: ", document_prompt="")
    assert (prompted.query_prompt, prompted.document_prompt) == ("query: ", "")
    assert prompted.encoder_fingerprint != miner.get("small").encoder_fingerprint
    assert miner.drop("prompted") is True
    with pytest.raises(hardneg.InvalidArgument) as e:
        miner.create("long", query_prompt="q" * 1_000_000)
    assert "query_prompt" in e.value.details

    assert miner.drop("small") is True
    with pytest.raises(hardneg.NotFound):
        miner.get("small")
    with pytest.raises(hardneg.NotFound):
        miner.drop("small")


def check_contract(request: pb.MineRequest, response: pb.MineResponse, texts: Dict[str, str], k: int) -> None:
    """Negatives never are a positive of the query or of the batch, never share the positive's
    text, never repeat; k of them, best first, with the document's own text."""
    assert response.batch_id == request.batch_id
    assert response.generation == 1
    assert len(response.results) == len(request.queries)
    batch_positives = {p for q in request.queries for p in q.positive_ids}
    for q, r in zip(request.queries, response.results):
        assert r.query_id == q.id
        assert len(r.negatives) == k
        negative_ids = [n.id for n in r.negatives]
        assert not batch_positives & set(negative_ids), (q.id, negative_ids)
        assert len(set(negative_ids)) == k
        for n in r.negatives:
            assert normalize(texts[n.id]) != normalize(texts[q.positive_ids[0]])
            assert normalize(n.text) == normalize(texts[n.id])
        assert all(a.rank < b.rank and a.score >= b.score for a, b in zip(r.negatives, r.negatives[1:]))
        assert r.HasField("positive_score") and 0.0 < r.positive_score <= 1.0
        assert r.dropped.positive <= 1
    assert response.timings.total_seconds >= response.timings.search_seconds


def test_mine_excludes_positives_and_is_seeded(miner: hardneg.Miner, cranfield: Ingested, judged: List[dict], texts: Dict[str, str]) -> None:
    assert len(judged) >= 16
    queries = [{"id": q["id"], "text": q["text"], "positive_ids": [q["positive"]]} for q in judged[:8]]
    request = hardneg.batch("cran", queries, batch_id=42, num_negatives=5, seed=7, return_text=True)
    response = miner.mine(request)
    check_contract(request, response, texts, 5)
    assert sum(r.dropped.positive for r in response.results) >= 4, "most positives rank among the candidates"
    # The keyword form builds the same request; the same seed gives the same answer.
    again = miner.mine("cran", queries, batch_id=42, num_negatives=5, seed=7, return_text=True)
    assert ids(again) == ids(response)
    uniform = dict(num_negatives=5, sampling="uniform", range_max=50, return_text=True)
    a = miner.mine("cran", queries, seed=11, **uniform)
    b = miner.mine("cran", queries, seed=11, **uniform)
    c = miner.mine("cran", queries, seed=12, **uniform)
    assert ids(a) == ids(b) and ids(a) != ids(c)
    # Text positives exclude documents with that text; numpy vectors are accepted as queries.
    positive_text = texts[judged[0]["positive"]]
    by_text = miner.mine("cran", [{"text": judged[0]["text"], "positive_texts": [positive_text.upper()]}], num_negatives=3, range_max=40)
    assert judged[0]["positive"] not in ids(by_text)[0]
    assert by_text.results[0].dropped.duplicate_text >= 1
    vector = np.full(384, 0.05, dtype=np.float32)
    by_vector = miner.mine("cran", [{"vector": vector, "positive_ids": [judged[0]["positive"]]}], num_negatives=3)
    assert len(by_vector.results[0].negatives) == 3


def test_bad_input_raises_with_status_and_field(miner: hardneg.Miner, cranfield: Ingested) -> None:
    good = hardneg.batch("cran", [{"text": "wing stall", "positive_ids": ["1"]}], num_negatives=2)
    nan = [float("nan") if i == 3 else 0.1 for i in range(384)]
    cases = [
        (hardneg.batch("cran", [], num_negatives=2), hardneg.InvalidArgument, "queries"),
        (hardneg.batch("cran", ["  "], num_negatives=2), hardneg.InvalidArgument, "queries[0].text"),
        (hardneg.batch("cran", [{"vector": [0.1] * 17}], num_negatives=2), hardneg.InvalidArgument, "queries[0].vector"),
        (hardneg.batch("cran", [{"vector": nan}], num_negatives=2), hardneg.InvalidArgument, "queries[0].vector[3]"),
        (hardneg.batch("cran", ["x"], num_negatives=0), hardneg.InvalidArgument, "options.num_negatives"),
        (hardneg.batch("cran", ["x"], num_negatives=2, range_min=10, range_max=10), hardneg.InvalidArgument, "options.range_min"),
        (hardneg.batch("cran", ["x"], num_negatives=2, relative_margin=1.5), hardneg.InvalidArgument, "options.relative_margin"),
        (hardneg.batch("nope", ["x"], num_negatives=2), hardneg.NotFound, "nope"),
        (hardneg.batch("cran", ["x"], num_negatives=2, rerank=True), hardneg.FailedPrecondition, "reranker.model_dir"),
    ]
    for request, kind, field in cases:
        with pytest.raises(kind) as e:
            miner.mine(request)
        assert isinstance(e.value, hardneg.HardnegError)
        assert e.value.code.name == e.value.status == {
            hardneg.InvalidArgument: "INVALID_ARGUMENT",
            hardneg.NotFound: "NOT_FOUND",
            hardneg.FailedPrecondition: "FAILED_PRECONDITION",
        }[kind]
        assert field in e.value.details, (field, e.value.details)
        assert field in str(e.value)
        assert len(miner.mine(good).results[0].negatives) == 2, "the server keeps serving"
    # Mistakes caught before any call.
    with pytest.raises(TypeError, match="num_negative"):
        hardneg.batch("cran", ["x"], num_negative=2)
    with pytest.raises(ValueError, match="sampling"):
        hardneg.batch("cran", ["x"], num_negatives=2, sampling="best")
    with pytest.raises(TypeError, match="positive"):
        hardneg.batch("cran", [{"text": "x", "positive": "1"}])
    with pytest.raises(TypeError):
        miner.mine(good, num_negatives=3)  # type: ignore[call-overload]


def test_rows_for_sentence_transformers(miner: hardneg.Miner, cranfield: Ingested, judged: List[dict], texts: Dict[str, str]) -> None:
    queries = [{"id": q["id"], "text": q["text"], "positive_ids": [q["positive"]]} for q in judged[:4]]
    queries.append({"text": "heat transfer in hypersonic flow", "positive_texts": ["a positive given as text"]})
    request = hardneg.batch("cran", queries, num_negatives=3, seed=1, return_text=True)
    response = miner.mine(request)
    rows = miner.rows(request, response)
    assert len(rows) == 5
    for q, r, row in zip(queries, response.results, rows):
        assert list(row) == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
        assert row["anchor"] == q["text"]
        want = texts[q["positive_ids"][0]] if "positive_ids" in q else "a positive given as text"
        assert normalize(row["positive"]) == normalize(want)
        assert [row[f"negative_{j}"] for j in (1, 2, 3)] == [n.text for n in r.negatives]
    triplets = miner.rows(request, response, format="triplet")
    assert len(triplets) == 15 and set(triplets[0]) == {"anchor", "positive", "negative"}
    assert [t["negative"] for t in triplets[:3]] == [n.text for n in response.results[0].negatives]

    # Without the texts, rows says what to do.
    bare = hardneg.batch("cran", queries[:1], num_negatives=3, seed=1)
    with pytest.raises(ValueError, match="return_text"):
        miner.rows(bare, miner.mine(bare))


def test_rows_leave_out_queries_short_of_negatives() -> None:
    request = hardneg.batch("c", [{"text": "q0", "positive_texts": ["p0"]}, {"text": "q1", "positive_ids": ["7"]}], num_negatives=2)
    response = pb.MineResponse(results=[
        pb.QueryResult(negatives=[pb.Negative(id="a", text="A"), pb.Negative(id="b", text="B")]),
        pb.QueryResult(negatives=[pb.Negative(id="c", text="C")]),
    ])
    assert hardneg.rows(request, response, {"7": "P7"}) == [{"anchor": "q0", "positive": "p0", "negative_1": "A", "negative_2": "B"}]
    assert hardneg.rows(request, response, {"7": "P7"}, num_negatives=1)[1] == {"anchor": "q1", "positive": "P7", "negative_1": "C"}
    assert hardneg.rows(request, response, {"7": "P7"}, format="triplet")[2] == {"anchor": "q1", "positive": "P7", "negative": "C"}
    with pytest.raises(ValueError, match="positive '7'"):
        hardneg.rows(request, response)


def test_query_vectors_from_numpy_keep_their_values() -> None:
    v = np.linspace(-1, 1, 384, dtype=np.float32)
    q = hardneg.query({"vector": v, "positive_ids": [3]})
    assert list(q.positive_ids) == ["3"]
    assert all(math.isclose(a, float(b), rel_tol=0, abs_tol=1e-7) for a, b in zip(q.vector, v))
    with pytest.raises(ValueError, match="1-d"):
        hardneg.query({"vector": np.zeros((2, 384))})


def test_addresses_and_readiness(server: Server) -> None:
    with hardneg.Miner(f"http://{server.addr}/") as m:
        assert not m.tls and m.health() == "SERVING"
        m.wait_ready(timeout=5)
    with pytest.raises(ValueError, match="https"):
        hardneg.Miner(f"http://{server.addr}", root_certificates=b"not used")
    with hardneg.Miner(f"127.0.0.1:{free_port()}") as nobody:
        with pytest.raises(hardneg.Unavailable):
            nobody.health(timeout=1)
        with pytest.raises(TimeoutError, match="not SERVING"):
            nobody.wait_ready(timeout=0.5)
