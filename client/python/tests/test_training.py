"""hardneg.training against the real library: sentence-transformers' Trainer and losses,
driving the real server (a corpus of Cranfield documents, all-MiniLM-L6-v2, a few steps)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

pytest.importorskip("sentence_transformers", reason="hardneg.training needs sentence-transformers (requirements-test.txt)")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402
from sentence_transformers.util import mine_hard_negatives as st_mine_hard_negatives  # noqa: E402

import hardneg  # noqa: E402
from hardneg import training  # noqa: E402

from conftest import ROOT, Server, model_dir  # noqa: E402

HERE = Path(__file__).resolve().parent
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def pairs(corpus: List[dict], judged: List[dict], texts: Dict[str, str]) -> Dataset:
    """(anchor, positive) pairs: Cranfield queries with their positive's text."""
    return Dataset.from_dict({"anchor": [q["text"] for q in judged], "positive": [texts[q["positive"]] for q in judged]})


def load_model() -> SentenceTransformer:
    torch.manual_seed(0)
    model = SentenceTransformer(str(model_dir()), device="cpu")
    model.max_seq_length = MAX_LENGTH
    return model


def arguments(tmp_path: Path, steps: int, batch_size: int = 4) -> SentenceTransformerTrainingArguments:
    return SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=5e-5,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=1,
        disable_tqdm=True,
    )


def corpus_of(corpus: List[dict], pairs: Dataset) -> training.Corpus:
    docs = training.Corpus(corpus)
    docs.add(pairs["positive"])
    return docs


class Recording(losses.MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss that keeps the token ids of every column it is given."""

    def __init__(self, model: SentenceTransformer) -> None:
        super().__init__(model)
        self.seen: List[List[torch.Tensor]] = []

    def forward(self, features, labels=None):  # type: ignore[override]
        self.seen.append([f["input_ids"].clone() for f in features])
        return super().forward(features, labels)


def test_online_mining_in_the_trainer_with_prefetch_and_refresh(
    miner: hardneg.Miner, corpus: List[dict], pairs: Dataset, tmp_path: Path
) -> None:
    model = load_model()
    docs = corpus_of(corpus, pairs)
    info = training.index_corpus(miner, "online", docs, model)
    assert (info.doc_count, info.dims, info.generation, info.vectors_only) == (len(docs), 384, 1, True)

    mined: List[training.MinedBatch] = []
    collator = training.MiningCollator(
        miner, "online", docs, model, num_negatives=2, preset="denoised", prefetch=2, seed=7,
        positives=training.positives_of(pairs), on_batch=mined.append,
    )
    refresh = training.RefreshCallback(collator, every_n_steps=2)
    loss = Recording(model)
    trainer = training.MiningTrainer(
        model=model, args=arguments(tmp_path, steps=5), train_dataset=pairs, loss=loss,
        data_collator=collator, callbacks=[refresh],
    )
    assert isinstance(trainer, SentenceTransformerTrainer)
    trainer.train()

    # Every step's loss got (anchor, positive, negative_1, negative_2), and the negatives are
    # exactly the texts the server returned for that batch, tokenized as the library does.
    assert len(loss.seen) == 5
    assert len(mined) >= 5  # up to prefetch more were mined ahead of the last step
    for step, columns in enumerate(loss.seen):
        batch = mined[step]
        assert len(columns) == 4
        assert len(batch.rows) == columns[0].shape[0] == 4
        for j in (1, 2):
            server_texts = [list(r.negatives)[j - 1].text for r in batch.response.results]
            assert [row[f"negative_{j}"] for row in batch.rows] == server_texts
            expected = model.preprocess(server_texts)["input_ids"]
            assert torch.equal(columns[1 + j], expected), f"step {step}: negative_{j} is not what the server returned"
        # Positives are never negatives: neither the row's own nor another row's of the batch.
        batch_positives = {p for q in batch.request.queries for p in q.positive_ids}
        assert batch_positives
        assert not {i for ids in batch.negative_ids for i in ids} & batch_positives
        assert batch.filled == 0 and batch.dropped_rows == 0

    # The callback refreshed at steps 2 and 4 (not after the last step); generations advanced
    # and later batches asked for them.
    assert [(step, gen) for step, gen, _ in refresh.history] == [(2, 2), (4, 3)]
    assert miner.get("online").encoder_name == "step-4"
    assert collator.min_generation == 3
    asked = [b.request.min_generation if b.request.HasField("min_generation") else None for b in mined]
    answered = [b.response.generation for b in mined]
    assert asked[0] is None and answered[0] == 1
    assert 2 in asked and all(a is None or g >= a for a, g in zip(asked, answered))
    assert answered == sorted(answered) and answered[-1] >= 2
    # Query vectors came from the model being trained: the server saw what the model encodes.
    first = mined[0].request.queries[0]
    assert len(first.vector) == 384


def test_plain_trainer_any_loss_and_short_queries(miner: hardneg.Miner, corpus: List[dict], pairs: Dataset, tmp_path: Path) -> None:
    """The collator alone in the library's own Trainer, with a cached loss; a filter that
    leaves too few negatives fills the rows (on_short="random") without breaking the batch."""
    model = load_model()
    docs = corpus_of(corpus, pairs)
    training.index_corpus(miner, "plain", docs, model)
    mined: List[training.MinedBatch] = []
    # min_score 0.99: almost nothing passes, so most negatives are filled at random.
    collator = training.MiningCollator(
        miner, "plain", docs, model, num_negatives=2, min_score=0.99, adaptive_depth=False, seed=3, on_batch=mined.append,
    )
    loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    trainer = SentenceTransformerTrainer(
        model=model, args=arguments(tmp_path, steps=2), train_dataset=pairs, loss=loss, data_collator=collator,
    )
    trainer.train()
    assert len(mined) >= 2  # the Trainer's data loader collates one batch ahead
    for batch in mined:
        assert len(batch.rows) == 4 and batch.filled > 0
        filled = [i for ids in batch.negative_ids for i in ids if i is None]
        assert len(filled) == batch.filled
        positives = {row["positive"] for row in batch.rows}
        for row in batch.rows:
            assert row["negative_1"] not in positives and row["negative_2"] not in positives
            assert row["negative_1"] in docs.texts and row["negative_2"] in docs.texts
    assert collator.stats["negatives_filled"] == sum(b.filled for b in mined)

    # on_short="drop" leaves a batch with nothing: a clear error, not a silent empty step.
    drop = training.MiningCollator(miner, "plain", docs, model, num_negatives=2, min_score=0.999, adaptive_depth=False, on_short="drop")
    with pytest.raises(ValueError, match="on_short='drop' left the batch empty"):
        drop([{"anchor": pairs[0]["anchor"], "positive": pairs[0]["positive"]}])


def test_a_failed_mine_stops_training(miner: hardneg.Miner, corpus: List[dict], pairs: Dataset, tmp_path: Path) -> None:
    model = load_model()
    docs = corpus_of(corpus, pairs)
    for trainer_class, prefetch in ((training.MiningTrainer, 2), (SentenceTransformerTrainer, 0)):
        collator = training.MiningCollator(miner, "no-such-collection", docs, model, prefetch=prefetch)
        trainer = trainer_class(
            model=model, args=arguments(tmp_path, steps=2), train_dataset=pairs,
            loss=losses.MultipleNegativesRankingLoss(model), data_collator=collator,
        )
        with pytest.raises(hardneg.NotFound, match="no-such-collection"):
            trainer.train()
    # Options are checked when the collator is made, not at the first batch.
    with pytest.raises(TypeError, match="range_maxx"):
        training.MiningCollator(miner, "online", docs, model, range_maxx=3)
    with pytest.raises(ValueError, match="sampling"):
        training.MiningCollator(miner, "online", docs, model, sampling="best")


def test_a_failed_refresh_stops_training(miner: hardneg.Miner, corpus: List[dict], pairs: Dataset, tmp_path: Path) -> None:
    """A checkpoint saved where the server does not look (outside its encoder.models_root):
    the server refuses the refresh, and the error reaches the caller of train()."""
    model = load_model()
    docs = corpus_of(corpus, pairs)
    training.index_corpus(miner, "refused", docs, model)
    collator = training.MiningCollator(miner, "refused", docs, model, prefetch=1)
    refresh = training.RefreshCallback(collator, every_n_steps=1, mode="checkpoint", checkpoint_root=tmp_path / "elsewhere")
    trainer = training.MiningTrainer(
        model=model, args=arguments(tmp_path, steps=3), train_dataset=pairs,
        loss=losses.MultipleNegativesRankingLoss(model), data_collator=collator, callbacks=[refresh],
    )
    with pytest.raises(hardneg.HardnegError) as e:
        trainer.train()
    assert "step-1" in e.value.details
    assert (tmp_path / "elsewhere" / "step-1" / "modules.json").is_file()
    assert refresh.history == [] and collator.min_generation is None
    assert miner.get("refused").generation == 1


def test_refresh_from_a_checkpoint_with_text_queries(corpus: List[dict], pairs: Dataset, tmp_path: Path) -> None:
    """queries="text" on a collection the server encodes; the callback saves a checkpoint
    under the server's models_root and the server re-encodes the corpus with it."""
    root = tmp_path / "models"
    root.mkdir()
    server = Server(tmp_path / "data", env={"HARDNEG__ENCODER__MODELS_ROOT": str(root)})
    try:
        with server.miner(timeout=120.0) as miner:
            model = load_model()
            docs = training.Corpus(corpus[:40])
            small = pairs.filter(lambda row: docs.id_of(row["positive"]) is not None)
            assert len(small) >= 4
            info = training.index_corpus(miner, "text", docs)
            assert (info.vectors_only, info.generation) == (False, 1)
            mined: List[training.MinedBatch] = []
            collator = training.MiningCollator(miner, "text", docs, model, queries="text", num_negatives=1, on_batch=mined.append)
            refresh = training.RefreshCallback(collator, every_n_steps=1, mode="checkpoint", checkpoint_root=root)
            trainer = training.MiningTrainer(
                model=model, args=arguments(tmp_path, steps=2), train_dataset=small,
                loss=losses.MultipleNegativesRankingLoss(model), data_collator=collator, callbacks=[refresh],
            )
            trainer.train()
            assert [(s, g) for s, g, _ in refresh.history] == [(1, 2)]
            assert (root / "step-1" / "modules.json").is_file()
            info = miner.get("text")
            assert (info.generation, info.encoder_name) == (2, "step-1")
            assert all(not q.vector for b in mined for q in b.request.queries)
    finally:
        assert server.stop() == 0, server.log_text()


def test_mine_hard_negatives_matches_the_library(miner: hardneg.Miner, corpus: List[dict], pairs: Dataset) -> None:
    """Under the library's rules (no batch-positive exclusion, no adaptive depth) the drop-in
    returns the library's own rows, in every output format."""
    model = load_model()
    texts = [d["title"] + " " + d["text"] if d["title"].strip() else d["text"] for d in corpus]
    common = dict(corpus=texts, range_min=0, range_max=10, num_negatives=3, relative_margin=0.05, batch_size=32, verbose=False)
    st_rules = dict(exclude_batch_positives=False, adaptive_depth=False)
    for fmt in ("triplet", "n-tuple", "labeled-pair", "labeled-list"):
        ours = training.mine_hard_negatives(pairs, model, output_format=fmt, miner=miner, **common, **st_rules)
        theirs = st_mine_hard_negatives(pairs, model, output_format=fmt, **common)
        assert ours.column_names == theirs.column_names, fmt
        assert len(ours) == len(theirs) > 0, fmt
        assert ours.to_list() == theirs.to_list(), fmt
    # Scores: the library's cosine scores within float32 rounding.
    ours = training.mine_hard_negatives(pairs, model, output_format="n-tuple", output_scores=True, miner=miner, **common, **st_rules)
    theirs = st_mine_hard_negatives(pairs, model, output_format="n-tuple", output_scores=True, **common)
    np.testing.assert_allclose(np.array(ours["scores"]), np.array(theirs["scores"]), atol=1e-5)
    # The temporary collections are gone.
    assert not [c.name for c in miner.list() if c.name.startswith("mine-hard-negatives-")]


def test_mine_hard_negatives_with_hardneg_options(miner: hardneg.Miner, corpus: List[dict], pairs: Dataset) -> None:
    texts = [d["title"] + " " + d["text"] if d["title"].strip() else d["text"] for d in corpus]
    model = load_model()
    denoised = training.mine_hard_negatives(
        pairs, model, corpus=texts, num_negatives=2, output_format="n-tuple", preset="denoised", seed=1,
        miner=miner.addr, collection="kept", verbose=False,
    )
    assert denoised.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert len(denoised) >= 0.9 * len(pairs)
    for row in denoised:
        assert row["positive"] not in (row["negative_1"], row["negative_2"])
    assert miner.get("kept").doc_count == len(set(texts) | set(pairs["positive"]))
    with pytest.raises(ValueError, match="rerank=True"):
        training.mine_hard_negatives(pairs, model, cross_encoder=object(), miner=miner)
    with pytest.raises(ValueError, match="output_format"):
        training.mine_hard_negatives(pairs, model, output_format="pairs", miner=miner)


def test_torchrun_two_ranks_mine_their_own_batches_and_refresh_in_shards(server: Server, corpus: List[dict], pairs: Dataset, tmp_path: Path) -> None:
    """torchrun, 2 processes on CPU, in topic batches: each rank mines its own batches, the
    refresh uploads one shard per rank and rank 0 commits once; both cut batches from the same
    topics."""
    out = tmp_path / "ddp"
    out.mkdir()
    env = dict(os.environ, HARDNEG_ADDR=server.addr, HARDNEG_OUT=str(out), HARDNEG_MODEL_DIR=str(model_dir()),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    docs = corpus_of(corpus, pairs)
    (out / "pairs.json").write_text(json.dumps({"anchor": list(pairs["anchor"]), "positive": list(pairs["positive"])}))
    (out / "corpus.json").write_text(json.dumps(dict(zip(docs.ids, docs.texts))))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "ddp_train.py")],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Each rank mined its own batches: different anchors, all from the training pairs.
    a0, a1 = (set(r["anchors"]) for r in ranks)
    assert a0 and a1 and not a0 & a1
    assert a0 | a1 <= set(pairs["anchor"])
    # The refresh: each rank uploaded its half of the corpus, disjoint, together all of it;
    # both ranks moved to the one committed generation.
    u0, u1 = (set(r["uploaded"]) for r in ranks)
    assert not u0 & u1 and u0 | u1 == set(docs.ids)
    assert ranks[0]["history"] == ranks[1]["history"] == [[2, 2], [4, 3]]
    assert all(r["generations_after_refresh"] and min(r["generations_after_refresh"]) >= 2 for r in ranks)
    assert (ranks[0]["final_generation"], ranks[1]["final_generation"]) == (3, 3)
    assert ranks[0]["topics"] == ranks[1]["topics"] and len(set(ranks[0]["topics"])) > 1


TOPICS = {
    "wing": [f"aircraft wing {x}" for x in ("lift", "drag", "stall", "flutter", "twist", "sweep")],
    "cancer": [f"cancer cells {x}" for x in ("metastasis", "mutation", "growth", "apoptosis", "therapy", "screening")],
    "football": [f"football match {x}" for x in ("score", "referee", "penalty", "tickets", "stadium", "highlights")],
}


def topic_pairs() -> Dataset:
    """Anchors on three topics; two anchors of each topic share a positive text."""
    rows = [{"anchor": a, "positive": f"about {topic}, {i // 2}", "topic": topic}
            for topic, anchors in TOPICS.items() for i, a in enumerate(anchors)]
    return Dataset.from_list(rows)


def test_topic_batches_draw_each_batch_from_one_topic_without_duplicates(tmp_path: Path) -> None:
    """cluster_anchors finds the three topics; TopicBatchSampler cuts them into batches that
    hold one topic each, every row once per epoch, no text twice in a batch, the same
    batches for the same seed and epoch; the Trainer trains on those batches."""
    model = load_model()
    data = topic_pairs()
    found = training.cluster_anchors(model, data["anchor"], 3, seed=1)
    assert {len({t for t, f in zip(data["topic"], found) if f == c}) for c in set(found)} == {1}, found  # one topic per cluster
    assert len(set(found)) == 3
    assert found == training.cluster_anchors(model, data["anchor"], 3, seed=1)

    make = training.topic_batches(model, cluster_size=6)
    sampler = make(data.remove_columns("topic"), batch_size=3, drop_last=False, valid_label_columns=["label"], seed=4)
    assert isinstance(sampler, training.TopicBatchSampler) and len(sampler) == 6
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(data)))  # every row once
        for b in batches:
            texts = [data[i]["anchor"] for i in b] + [data[i]["positive"] for i in b]
            assert len(texts) == len(set(texts))  # no duplicate text in a batch
            assert len({data[i]["topic"] for i in b}) == 1, [data[i]["anchor"] for i in b]  # one topic
        epochs.append(batches)
    sampler.set_epoch(0)
    assert list(sampler) == epochs[0] and epochs[0] != epochs[1]

    # Through the library's Trainer: the loss sees the sampler's batches.
    loss = Recording(model)
    args = arguments(tmp_path, steps=2, batch_size=3)
    args.batch_sampler = training.topic_batches(model, cluster_size=6)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data.remove_columns("topic"), loss=loss)
    trainer.train()
    assert len(loss.seen) == 2
    tokenizer = model.tokenizer
    for features in loss.seen:
        anchors = tokenizer.batch_decode(features[0], skip_special_tokens=True)
        assert len({next(t for t, a in TOPICS.items() if text in a) for text in anchors}) == 1, anchors


def test_topic_batches_bad_input() -> None:
    model = load_model()
    data = topic_pairs()
    with pytest.raises(ValueError, match="anchor_column 'query'"):
        training.topic_batches(model, anchor_column="query")(data, batch_size=3, drop_last=False)
    with pytest.raises(ValueError, match="cluster_size must be at least 1"):
        training.topic_batches(model, cluster_size=-1)(data, batch_size=3, drop_last=False)
    with pytest.raises(ValueError, match="max_clusters must be at least 1, got 0"):
        training.topic_batches(model, max_clusters=0)(data, batch_size=3, drop_last=False)
    with pytest.raises(ValueError, match="n_clusters must be at least 1"):
        training.cluster_anchors(model, data["anchor"], 0)
    with pytest.raises(ValueError, match=r"topics: one per dataset row \(18\), got 2"):
        training.TopicBatchSampler(data, 3, False, topics=[0, 1])
