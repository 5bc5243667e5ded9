"""Index refresh through the client: trainer vectors from numpy (upload, commit, generations),
a re-encode with a checkpoint directory, cancellation and progress."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest

import hardneg

from conftest import Ingested, model_dir


def trainer_vectors(n: int, dims: int = 384) -> np.ndarray:
    """Deterministic unit vectors in 6 clusters (uniform random vectors make neighbours
    meaningless)."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, dims))
    v = centres[np.arange(n) % 6] + 0.3 * rng.normal(size=(n, dims))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def small(miner: hardneg.Miner, name: str, corpus: List[dict], n: int) -> List[str]:
    miner.create(name)
    miner.ingest(name, corpus[:n])
    return [d["id"] for d in corpus[:n]]


def test_trainer_vectors_upload_and_commit(miner: hardneg.Miner, corpus: List[dict]) -> None:
    doc_ids = small(miner, "vec", corpus, 30)
    vectors = trainer_vectors(30)
    assert miner.get("vec").generation == 1

    # Half the vectors: the commit is refused and nothing changes.
    up = miner.upload_vectors("vec", "trainer-step-1", doc_ids[:15], vectors[:15], chunk_size=4)
    assert (up.received, up.generation, up.missing) == (15, 2, 15)
    info = miner.get("vec")
    assert (info.generation, info.building_generation) == (1, 2)
    with pytest.raises(hardneg.FailedPrecondition) as refused:
        miner.commit_vectors("vec")
    assert "lacks vectors for 15 live documents" in refused.value.details
    assert miner.get("vec").generation == 1

    # Wrong sizes are caught by the client or refused by the server.
    with pytest.raises(ValueError, match="15 ids but 14 vectors"):
        miner.upload_vectors("vec", "trainer-step-1", doc_ids[15:], vectors[15:29])
    with pytest.raises(ValueError, match="2-d"):
        miner.upload_vectors("vec", "trainer-step-1", doc_ids[:1], vectors[0])
    with pytest.raises(hardneg.InvalidArgument) as e:
        miner.upload_vectors("vec", "trainer-step-1", doc_ids[15:16], np.zeros((1, 17), dtype=np.float32))
    assert "dims" in e.value.details
    with pytest.raises(hardneg.Aborted):
        miner.upload_vectors("vec", "another-encoder", doc_ids[:1], vectors[:1])

    # The rest, and commit: generation 1 -> 2, answered from the trainer's vectors.
    info = miner.refresh_vectors("vec", "trainer-step-1", doc_ids[15:], vectors[15:])
    assert (info.generation, info.encoder_kind, info.encoder_name, info.doc_count) == (2, "trainer", "trainer-step-1", 30)
    assert not info.HasField("building_generation")
    probes = [0, 7, 20]
    response = miner.mine("vec", [{"vector": vectors[i], "positive_ids": [doc_ids[i]]} for i in probes],
                          num_negatives=4, exclude_batch_positives=False)
    assert response.generation == 2
    for i, result in zip(probes, response.results):
        # Exact search over 30 documents: the 4 nearest by cosine, the positive excluded.
        scores = vectors @ vectors[i]
        order = [j for j in np.argsort(-scores, kind="stable") if j != i][:4]
        assert [n.id for n in result.negatives] == [doc_ids[j] for j in order]
        assert np.allclose([n.score for n in result.negatives], scores[order], atol=1e-4)
        assert all(doc_ids[j] != doc_ids[i] for j in order)

    # The server cannot encode text for trainer vectors; it says what to send.
    with pytest.raises(hardneg.FailedPrecondition) as no_text:
        miner.mine("vec", [{"text": "wing", "positive_ids": [doc_ids[0]]}], num_negatives=2)
    assert "send query vectors" in no_text.value.details

    # Pending vectors can be discarded.
    miner.upload_vectors("vec", "trainer-step-2", doc_ids[:3], vectors[:3])
    assert miner.get("vec").building_generation == 3
    cancelled = miner.cancel_refresh("vec")
    assert cancelled.cancelled and "discarded" in cancelled.what
    info = miner.get("vec")
    assert (info.generation, info.HasField("building_generation")) == (2, False)
    assert miner.cancel_refresh("vec").cancelled is False
    miner.drop("vec")


def test_reencode_with_a_checkpoint_directory(miner: hardneg.Miner, corpus: List[dict], judged: List[dict], texts: Dict[str, str]) -> None:
    doc_ids = small(miner, "re", corpus, 24)
    queries = [{"id": "q", "text": "flow over a wing in a slipstream", "positive_ids": [doc_ids[0]]}]
    before = miner.mine("re", queries, num_negatives=4, seed=1)
    assert before.generation == 1

    # The server's own model directory, named relative to encoder.models_root, is a checkpoint.
    checkpoint = model_dir().name
    seen: List[hardneg.pb.RefreshProgress] = []
    last = miner.refresh("re", checkpoint, progress=seen.append)
    assert (last.phase, last.generation, last.done, last.total) == ("done", 2, 24, 24)
    assert seen[-1] == last and any(p.phase == "encoding" for p in seen)
    assert all(p.collection == "re" and p.generation == 2 for p in seen)
    info = miner.get("re")
    assert (info.generation, info.encoder_kind, info.encoder_name) == (2, "checkpoint", checkpoint)
    assert miner.refresh_progress("re") is None
    after = miner.mine("re", queries, num_negatives=4, seed=1)
    assert after.generation == 2
    assert [n.id for n in after.results[0].negatives] == [n.id for n in before.results[0].negatives], "same weights, same neighbours"

    # Refusals name the problem and change nothing.
    with pytest.raises(hardneg.InvalidArgument) as e:
        miner.refresh("re", "../outside")
    assert ".." in e.value.details
    with pytest.raises(hardneg.InvalidArgument) as e:
        miner.refresh("re", "no-such-checkpoint")
    assert "encoder_dir" in e.value.details
    with pytest.raises(hardneg.NotFound):
        miner.refresh("nope", checkpoint)
    assert miner.get("re").generation == 2
    miner.drop("re")


def test_a_running_reencode_reports_progress_and_can_be_cancelled(miner: hardneg.Miner, cranfield: Ingested) -> None:
    generation = miner.get("cran").generation
    progress = miner.refresh_iter("cran", model_dir().name)
    first = next(progress)
    assert (first.collection, first.generation) == ("cran", generation + 1)
    running = miner.refresh_progress("cran")
    assert running is not None and running.generation == generation + 1 and running.total == miner.get("cran").doc_count
    with pytest.raises(hardneg.Aborted):
        miner.refresh("cran", model_dir().name)  # one refresh per collection at a time
    assert miner.cancel_refresh("cran").cancelled
    with pytest.raises(hardneg.Aborted):
        for _ in progress:
            pass
    info = miner.get("cran")
    assert (info.generation, info.HasField("building_generation")) == (generation, False)
