#!/usr/bin/env python3
"""Fine-tune all-MiniLM-L6-v2 with each way of getting negatives and measure held-out retrieval.

For each BEIR-format collection folder (corpus.jsonl, queries.jsonl, qrels/test.tsv):

Split. The judged queries (those with at least one judged-relevant document, score > 0: the
queries of `hardneg eval`) are ordered by the SHA-256 hex digest of their query id (UTF-8), ties
impossible; the first floor(n/2) are the train half, the rest the test half. The rule depends
only on the ids, not on file order or on a random state (Cranfield: 112 train / 113 test of 225
judged queries; CISI: 38 / 38 of 76).

Training data: one (query, positive) pair per train query; the positive is the query's
highest-scored judged document (ties: first in the qrels file), as `hardneg eval` and
bench/compare_st.py pick it. The query's other judged-relevant documents are hidden from every
miner: they play the unlabeled positives a real training set has, and a negative that is one of
them is a leak (a false negative).

Rows (same model, hyper-parameters, seeds and batch order for rows 1-6; only the negatives
differ):
  0  the base model, untrained (evaluated once: it has no seed)
  1  no mined negatives: in-batch negatives only
  2  sentence-transformers `mine_hard_negatives`, top-n of ranks [0, 30), base model
  3  the same with relative_margin 0.05
  4  hardneg, preset denoised (PRESET_DENOISED), mined once with the base model (offline),
     ranks [0, 30), requests of 32 train queries in split order (as `hardneg mine` sends them)
  5  hardneg online, preset denoised: every batch mined through `Miner.mine_stream` with query
     vectors from the model being trained; every --refresh-every steps the index is rebuilt
     from the corpus encoded by that model (`Miner.refresh_vectors`), and the following batches
     ask for that generation (min_generation)
  6  row 5 with `sampling="ambiguous"` (SimANS; extra options with --simans-option KEY=VALUE).
     A client or server that refuses the value fails the row with its message (the table says
     FAILED, the script exits 1); nothing is skipped or faked.
Rows 2-6 train on (anchor, positive, negative_1..n) tuples with n = --negatives; a query that
got fewer than n negatives is left out of its batch, as sentence-transformers' n-tuple output
and `hardneg.rows` do ("rows used" in the table).

Training: a plain loop with sentence-transformers' MultipleNegativesRankingLoss (scale 20, cosine),
AdamW, linear warmup over 10% of the steps then linear decay, gradient norm clipped at 1.0,
dropout on. Batches are drawn from successive seeded shuffles of the train pairs (a query or a
positive never twice in one batch), the same sequence for every row with the same seed.

Evaluation: the test-half queries against the whole corpus (every non-empty document), exact
cosine ranking (ties by corpus order). nDCG@10 with linear graded gains (gain = the qrels score,
log2 discount, the ideal ranking from every judged-relevant document of the query, as
pytrec_eval / BEIR compute it) and Recall@100 (relevant = score > 0; denominator = every
judged-relevant document). Mean and sample standard deviation over the seeds. For rows with
mined negatives, the leak rate: the share of the negatives used in training that are judged
relevant for their query (every use counts; online rows: as mined at each step).

Setup: the script makes sure its virtual environment exists (bench/compare_st.py's
`ensure_venv`: bench/.venv from bench/requirements.txt) and that the hardneg Python client
built from this checkout (client/python, proto/) is installed in it, then runs itself inside
it. It starts its own hardneg server (--server; default target/release/hardneg-server, else
target/debug) on a free loopback port with a temporary data directory, and stops it at the end.
The corpus goes in through the Python client; by default (--ingest vectors) into a
vectors-only collection, each document with the base model's vector: measured on a debug
server build, the server encoding the corpus itself (--ingest server) took 10.8 s per 64
Cranfield documents (about 4 minutes for the corpus) against under 1 s for the whole upload,
and the base model's document vectors are computed here anyway (row 0's evaluation).

    python3 bench/train_eval.py --quick                        # smoke run on Cranfield
    python3 bench/train_eval.py ../shared/datasets/cranfield   # the full table for one collection
    python3 bench/train_eval.py --server target/release/hardneg-server \\
        ../shared/datasets/cranfield ../shared/datasets/cisi

Defaults: 3 seeds (1, 2, 3); 32 steps of 16 train queries; 1 mined negative per query; lr 5e-5
(the Hugging Face Trainer default), warmup 10%; max length 128 tokens for every text (training
and evaluation); online rows refresh after steps 12 and 24 (--refresh-every 12) and keep 2
batches in flight (--prefetch 2: a batch's query vectors and negatives are up to 2 steps older
than the step that trains on it). --quick: 1 seed, 4 steps, a refresh after step 2; the rest
unchanged (each trained model is still evaluated over the whole corpus).

Time. Measured with --quick on 2 cores of an "Intel(R) Xeon(R) Processor" shared with a Rust
build and test run (this benchmark got 33-38% of the cores, other processes the rest):
Cranfield 488 s, CISI 403 s (rows 0-5; row 6 failed at its first batch). The script
extrapolates its timings to the defaults (per row: mining once + per seed: evaluation +
measured time per step x 32 + measured time per refresh x 2) and prints the estimate:
Cranfield 51 min at that CPU share, about 19 min with the 2 cores to itself (scaled by the share
it got); CISI 46 / 20 min. Per row on Cranfield, at the shared measurement (to itself: about
a third): row 0 1 min, row 1 7 min, row 2 11 min, row 3 7 min, row 4 10 min, row 5 15 min, and
row 6 about as much as row 5. The whole table for one collection: about 25 minutes on 2
unshared cores, about 65 minutes when a build takes two thirds of them. OpenMP threads are
set to wait passively (OMP_WAIT_POLICY=PASSIVE unless set): spinning waits made training steps
4x slower while another job shared the cores.

Writes a Markdown table and a JSON file of every number under bench/results/
(train_eval.md / train_eval.json; --quick: train_eval-quick.*).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_st as cst  # noqa: E402  (the venv, the collection reader, small helpers)

ROOT = cst.ROOT
RESULTS = ROOT / "bench" / "results"

RANGE_MIN, RANGE_MAX = 0, 30
RELATIVE_MARGIN = 0.05
OFFLINE_REQUEST_QUERIES = 32  # `hardneg mine --batch-size` default

FULL = {"seeds": [1, 2, 3], "steps": 32, "refresh_every": 12}
QUICK = {"seeds": [1], "steps": 4, "refresh_every": 2}

ROWS = {
    0: "base model, untrained",
    1: "in-batch negatives only",
    2: "sentence-transformers mine_hard_negatives, top-n of [0, 30)",
    3: "sentence-transformers mine_hard_negatives, relative_margin 0.05",
    4: "hardneg preset denoised, offline (base model)",
    5: "hardneg online, preset denoised, refresh every K",
    6: "hardneg online, preset denoised, sampling ambiguous (SimANS)",
}


# ---------------------------------------------------------------- setup


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", type=Path, help="BEIR collection folders (default: $HARDNEG_DATASETS/cranfield)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--server", type=Path, help="hardneg-server binary (default: target/release, else target/debug)")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2", help="model directory to fine-tune")
    p.add_argument("--rows", default="0,1,2,3,4,5,6", help="rows to run, e.g. 0,1,5")
    p.add_argument("--seeds", help=f"comma-separated (default {FULL['seeds']}, --quick {QUICK['seeds']})")
    p.add_argument("--steps", type=int, help=f"optimizer steps per run (default {FULL['steps']}, --quick {QUICK['steps']})")
    p.add_argument("--refresh-every", type=int, help=f"online rows: steps between index refreshes (default {FULL['refresh_every']}, --quick {QUICK['refresh_every']})")
    p.add_argument("--batch-size", type=int, default=16, help="train queries per step")
    p.add_argument("--negatives", type=int, default=1, help="mined negatives per query (rows 2-6)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (the Hugging Face Trainer default)")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--scale", type=float, default=20.0, help="MultipleNegativesRankingLoss scale (1 / temperature)")
    p.add_argument("--max-seq-length", type=int, default=128, help="truncation for every text, in training and evaluation")
    p.add_argument("--encode-batch", type=int, default=64, help="texts per batch when encoding without gradients")
    p.add_argument("--prefetch", type=int, default=2, help="online rows: batches in flight on the stream")
    p.add_argument("--simans-option", action="append", default=[], metavar="KEY=VALUE", help="extra MineOptions field for row 6 (repeatable)")
    p.add_argument("--ingest", choices=["vectors", "server"], default="vectors", help="how the corpus gets into hardneg (see the docstring)")
    p.add_argument("--out", type=Path, help="output path without suffix (default bench/results/train_eval[-quick])")
    p.add_argument("--setup-only", action="store_true", help="create the venv, install the client and exit")
    args = p.parse_args()
    preset = QUICK if args.quick else FULL
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else preset["seeds"]
    args.steps = args.steps or preset["steps"]
    args.refresh_every = args.refresh_every or preset["refresh_every"]
    args.rows = sorted({int(r) for r in args.rows.split(",")})
    if not set(args.rows) <= set(ROWS):
        p.error(f"--rows: rows are {sorted(ROWS)}")
    args.simans = {}
    for kv in args.simans_option:
        key, _, value = kv.partition("=")
        if not _:
            p.error(f"--simans-option {kv!r}: expected KEY=VALUE")
        args.simans[key] = _literal(value)
    return args


def _literal(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


# ---------------------------------------------------------------- metrics


def ndcg_at_k(ranking: list, gains: dict, k: int = 10) -> float:
    """nDCG@k with linear gains: DCG = sum over the top k of gain / log2(rank + 1) (rank from 1),
    divided by the DCG of the ideal ordering of every judged gain (also cut at k).

    Hand-computed example: judgments {a: 3, b: 2, c: 1}, ranking [b, x, a]:
    DCG = 2/log2(2) + 0/log2(3) + 3/log2(4) = 2 + 0 + 1.5 = 3.5;
    ideal [a, b, c]: 3/1 + 2/log2(3) + 1/log2(4) = 3 + 1.26186 + 0.5 = 4.76186;
    nDCG@10 = 3.5 / 4.76186 = 0.73501. With k = 1: 2 / 3 = 0.66667.

    >>> round(ndcg_at_k(["b", "x", "a"], {"a": 3, "b": 2, "c": 1}), 5)
    0.73501
    """
    dcg = sum(gains.get(doc, 0.0) / math.log2(i + 2) for i, doc in enumerate(ranking[:k]))
    ideal = sorted((g for g in gains.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: list, relevant: set, k: int = 100) -> float:
    """Share of the relevant documents in the top k.

    >>> recall_at_k(["b", "x", "a"], {"a", "b", "c"}, k=100), recall_at_k(["b", "x", "a"], {"a", "b", "c"}, k=2)
    (0.6666666666666666, 0.3333333333333333)
    """
    return len(set(ranking[:k]) & relevant) / len(relevant) if relevant else 0.0


def self_check() -> None:
    """The docstrings' hand-computed values, checked on every run."""
    g = {"a": 3, "b": 2, "c": 1}
    checks = [
        (ndcg_at_k(["b", "x", "a"], g), 3.5 / (3 + 2 / math.log2(3) + 0.5)),
        (ndcg_at_k(["b", "x", "a"], g), 0.735006),
        (ndcg_at_k(["b", "x", "a"], g, k=1), 2 / 3),
        (ndcg_at_k(["a", "b", "c", "x"], g), 1.0),
        (ndcg_at_k(["x", "y"], g), 0.0),
        (recall_at_k(["b", "x", "a"], {"a", "b", "c"}), 2 / 3),
        (recall_at_k(["b", "x", "a"], {"a", "b", "c"}, k=2), 1 / 3),
    ]
    for i, (got, want) in enumerate(checks):
        if abs(got - want) > 1e-5:
            raise AssertionError(f"metric self-check {i}: got {got}, want {want}")


def mean_sd(values: list) -> tuple:
    """Mean and sample standard deviation (None with fewer than two values)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# ---------------------------------------------------------------- collection and split


def load(folder: Path) -> dict:
    """compare_st's collection (documents as hardneg ingests them, queries and positives as
    `hardneg eval` picks them) plus the graded judgments and the train / test split."""
    col = cst.load_collection(folder)
    graded: dict = {}
    with open(folder / "qrels" / "test.tsv", encoding="utf-8") as f:
        for n, line in enumerate(f):
            fields = [x.strip() for x in line.rstrip("\n").split("\t")]
            if not line.strip() or (n == 0 and fields[0] == "query-id"):
                continue
            q, doc, score = fields
            graded.setdefault(q, {})[doc] = max(float(score), graded.get(q, {}).get(doc, float("-inf")))
    col["gains"] = {q: {d: s for d, s in docs.items() if s > 0} for q, docs in graded.items()}
    ordered = sorted(col["queries"], key=lambda q: hashlib.sha256(q["id"].encode("utf-8")).hexdigest())
    half = len(ordered) // 2
    col["train"], col["test"] = ordered[:half], ordered[half:]
    corpus_ids = set(col["text_of"])
    col["relevant_outside_corpus"] = sum(1 for q in col["test"] for d in col["gains"][q["id"]] if d not in corpus_ids)
    if len({q["text"] for q in col["train"]}) != len(col["train"]):
        sys.exit(f"{col['name']}: two train queries share a text; sentence-transformers would merge them")
    return col


# ---------------------------------------------------------------- models


def load_model(args):
    from sentence_transformers import SentenceTransformer

    with contextlib.redirect_stderr(io.StringIO()):  # a weight-loading progress bar
        model = SentenceTransformer(str(args.model), device="cpu")
    model.max_seq_length = args.max_seq_length
    return model


def encode(model, texts: list, args):
    """Unit-length embeddings without gradients (numpy float32)."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.encode(texts, batch_size=args.encode_batch, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    model.train(was_training)
    return out


def evaluate(col: dict, doc_vectors, query_vectors) -> dict:
    """nDCG@10 and Recall@100 of the test queries over the whole corpus (exact cosine)."""
    import numpy as np

    doc_ids = [d for d, _ in col["docs"]]
    scores = query_vectors @ doc_vectors.T
    ndcg, recall = [], []
    for q, row in zip(col["test"], scores):
        top = np.argsort(-row, kind="stable")[:100]
        ranking = [doc_ids[i] for i in top]
        gains = col["gains"][q["id"]]
        ndcg.append(ndcg_at_k(ranking, gains, 10))
        recall.append(recall_at_k(ranking, set(gains), 100))
    return {"ndcg@10": statistics.fmean(ndcg), "recall@100": statistics.fmean(recall), "per_query_ndcg@10": ndcg}


def evaluate_model(model, col: dict, args) -> dict:
    t = time.perf_counter()
    docs = encode(model, [text for _, text in col["docs"]], args)
    queries = encode(model, [q["text"] for q in col["test"]], args)
    out = evaluate(col, docs, queries)
    out["eval_s"] = time.perf_counter() - t
    return out


def batch_plan(n_train: int, col: dict, seed: int, batch_size: int, steps: int) -> list:
    """`steps` batches of train-query indices taken in the order of successive seeded shuffles
    of the train half; a query or a positive is never twice in one batch (a clashing query
    waits, in order, for the next batch)."""
    rng = random.Random(seed)
    batch_size = min(batch_size, n_train)
    upcoming: list = []
    plan = []
    while len(plan) < steps:
        batch, queries, positives, j = [], set(), set(), 0
        while len(batch) < batch_size and j <= 2 * n_train + batch_size:
            while j >= len(upcoming):
                epoch = list(range(n_train))
                rng.shuffle(epoch)
                upcoming += epoch
            q = col["train"][upcoming[j]]
            if q["id"] in queries or q["positive"] in positives:
                j += 1
                continue
            batch.append(upcoming.pop(j))
            queries.add(q["id"])
            positives.add(q["positive"])
        plan.append(batch)
    return plan


class LeakCounter:
    def __init__(self):
        self.negatives = self.leaks = self.rows_used = self.rows_asked = 0

    def add(self, q: dict, negative_ids: list) -> None:
        """negative_ids: one set of document ids per negative (a text may be several documents)."""
        self.negatives += len(negative_ids)
        self.leaks += sum(1 for ids in negative_ids if ids & q["hidden"])

    def summary(self) -> dict:
        return {
            "negatives": self.negatives,
            "leaks": self.leaks,
            "leak_rate": self.leaks / self.negatives if self.negatives else None,
            "rows_used": self.rows_used,
            "rows_asked": self.rows_asked,
            "yield": self.rows_used / self.rows_asked if self.rows_asked else None,
        }


def train(col: dict, args, seed: int, source) -> tuple:
    """One fine-tuning run; `source.batches(model, plan)` yields (step, [(query, [negative
    texts], [negative id sets])]) and `source.after_step(model, step)` may refresh an index."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import get_linear_schedule_with_warmup

    random.seed(seed)
    torch.manual_seed(seed)
    model = load_model(args)
    model.train()
    loss_fn = MultipleNegativesRankingLoss(model, scale=args.scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * args.steps), args.steps)
    plan = batch_plan(len(col["train"]), col, seed, args.batch_size, args.steps)
    leaks = LeakCounter()
    losses = []
    t0 = time.perf_counter()
    for step, rows in source.batches(model, plan):
        leaks.rows_asked += len(plan[step])
        leaks.rows_used += len(rows)
        if len(rows) >= 2:  # a batch of one has nothing to contrast in-batch: skipped
            for q, _, ids in rows:
                leaks.add(q, ids)
            columns = [[q["text"] for q, _, _ in rows], [col["text_of"][q["positive"]] for q, _, _ in rows]]
            columns += [[negs[j] for _, negs, _ in rows] for j in range(len(rows[0][1]))]
            model.train()
            loss = loss_fn([model.preprocess(c) for c in columns], None)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
        else:
            losses.append(None)
        scheduler.step()
        source.after_step(model, step + 1)
    train_s = time.perf_counter() - t0
    return model, {"train_s": train_s, "losses": losses, **leaks.summary(), **source.stats()}


class InBatch:
    def batches(self, model, plan):
        for step, idx in enumerate(plan):
            yield step, [(self.col["train"][i], [], []) for i in idx]

    def __init__(self, col):
        self.col = col

    def after_step(self, model, step):
        pass

    def stats(self):
        return {}


class Offline(InBatch):
    """Negatives mined once before training: query id -> [(text, id set)]."""

    def __init__(self, col, mined: dict, n: int):
        super().__init__(col)
        self.mined, self.n = mined, n

    def batches(self, model, plan):
        for step, idx in enumerate(plan):
            rows = []
            for i in idx:
                q = self.col["train"][i]
                negs = self.mined.get(q["id"], [])
                if len(negs) >= self.n:
                    rows.append((q, [t for t, _ in negs[: self.n]], [ids for _, ids in negs[: self.n]]))
            yield step, rows


class Online(InBatch):
    """Every batch mined by hardneg with query vectors from the model being trained; the index
    is rebuilt from that model's document vectors every `refresh_every` steps."""

    def __init__(self, col, args, miner, collection: str, seed: int, base_vectors, options: dict, tag: str):
        super().__init__(col)
        self.args, self.miner, self.collection, self.seed, self.options, self.tag = args, miner, collection, seed, options, tag
        self.doc_ids = [d for d, _ in col["docs"]]
        # Every run starts from the base model's vectors.
        self.generation = miner.refresh_vectors(collection, f"{tag}-base", self.doc_ids, base_vectors).generation
        self.refresh_s, self.refreshes, self.generations_used, self.mine_wait_s = 0.0, 0, [], 0.0

    def batches(self, model, plan):
        import hardneg

        n = self.args.negatives

        def requests():
            for step, idx in enumerate(plan):
                qs = [self.col["train"][i] for i in idx]
                vectors = encode(model, [q["text"] for q in qs], self.args)
                yield hardneg.batch(
                    self.collection,
                    [{"id": q["id"], "text": q["text"], "vector": v, "positive_ids": [q["positive"]]} for q, v in zip(qs, vectors)],
                    batch_id=step,
                    min_generation=self.generation,
                    num_negatives=n,
                    range_min=RANGE_MIN,
                    range_max=RANGE_MAX,
                    preset="denoised",
                    seed=self.seed * 1_000_003 + step,
                    **self.options,
                )

        by_id = {q["id"]: q for q in self.col["train"]}
        waited = time.perf_counter()
        for request, response in self.miner.mine_stream(requests(), prefetch=self.args.prefetch, with_batches=True):
            self.mine_wait_s += time.perf_counter() - waited
            self.generations_used.append(response.generation)
            rows = []
            for rq, result in zip(request.queries, response.results):
                ids = [neg.id for neg in result.negatives][:n]
                if len(ids) >= n:
                    rows.append((by_id[rq.id], [self.col["text_of"][d] for d in ids], [{d} for d in ids]))
            yield request.batch_id, rows
            waited = time.perf_counter()

    def after_step(self, model, step):
        if step % self.args.refresh_every == 0 and step < self.args.steps:
            t = time.perf_counter()
            vectors = encode(model, [text for _, text in self.col["docs"]], self.args)
            self.generation = self.miner.refresh_vectors(self.collection, f"{self.tag}-step{step}", self.doc_ids, vectors).generation
            self.refresh_s += time.perf_counter() - t
            self.refreshes += 1

    def stats(self):
        return {
            "refreshes": self.refreshes,
            "refresh_s": self.refresh_s,
            "mine_wait_s": self.mine_wait_s,
            "generations_used": self.generations_used,
        }


# ---------------------------------------------------------------- miners run once


def mine_sentence_transformers(col: dict, args, model, relative_margin, cache_folder: str) -> tuple:
    """mine_hard_negatives on the train pairs over the whole corpus: query id -> [(text, id set)]."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    ids_of: dict = {}
    for doc_id, text in col["docs"]:
        ids_of.setdefault(text, set()).add(doc_id)
    pairs = Dataset.from_dict({"query": [q["text"] for q in col["train"]], "positive": [col["text_of"][q["positive"]] for q in col["train"]]})
    qid_of = {q["text"]: q["id"] for q in col["train"]}
    t = time.perf_counter()
    bars = io.StringIO()
    try:
        with contextlib.redirect_stderr(bars):  # progress bars, kept only for a failure
            out = mine_hard_negatives(
                pairs,
                model,
                corpus=[text for _, text in col["docs"]],
                range_min=RANGE_MIN,
                range_max=RANGE_MAX,
                relative_margin=relative_margin,
                num_negatives=args.negatives,
                sampling_strategy="top",
                output_format="labeled-list",
                batch_size=args.encode_batch,
                cache_folder=cache_folder,
                verbose=False,
            )
    except Exception:
        sys.stderr.write(bars.getvalue())
        raise
    took = time.perf_counter() - t
    mined = {}
    for row in out:
        # labeled-list: the positive first, then the negatives, best first.
        mined[qid_of[row["query"]]] = [(text, ids_of[text]) for text in row["positive"][1:]]
    return mined, took


def mine_hardneg_offline(col: dict, args, miner, collection: str, base_query_vectors) -> tuple:
    """PRESET_DENOISED negatives for every train query, from the base model's index."""
    t = time.perf_counter()
    mined = {}
    train = col["train"]
    for start in range(0, len(train), OFFLINE_REQUEST_QUERIES):
        chunk = train[start : start + OFFLINE_REQUEST_QUERIES]
        response = miner.mine(
            collection,
            [{"id": q["id"], "text": q["text"], "vector": base_query_vectors[start + i], "positive_ids": [q["positive"]]} for i, q in enumerate(chunk)],
            num_negatives=args.negatives,
            range_min=RANGE_MIN,
            range_max=RANGE_MAX,
            preset="denoised",
            seed=0,
        )
        for q, result in zip(chunk, response.results):
            mined[q["id"]] = [(col["text_of"][neg.id], {neg.id}) for neg in result.negatives]
    return mined, time.perf_counter() - t


# ---------------------------------------------------------------- hardneg server


class Server:
    def __init__(self, binary: Path, model: Path):
        self.port = cst.free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="hardneg-train-eval-"))
        self.log = self.dir / "server.log"
        cmd = [str(binary), "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.dir / "data"), "--model-dir", str(model)]
        env = dict(os.environ)
        for k in ("HARDNEG_AUTH_TOKEN", "HARDNEG_TOKEN"):
            env.pop(k, None)
        self.started = time.perf_counter()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.addr = f"127.0.0.1:{self.port}"

    def wait(self, miner) -> float:
        deadline = time.perf_counter() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hardneg-server exited with {self.proc.returncode}; see {self.log}")
            try:
                miner.wait_ready(timeout=1.0)
                return time.perf_counter() - self.started
            except TimeoutError:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"hardneg-server not serving after 300 s; see {self.log}")

    def stop(self, keep_log: bool) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if keep_log:
            print(f"server log kept: {self.log}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def fill_collection(miner, col: dict, name: str, base_vectors, how: str) -> dict:
    """Creates the collection and makes the base model's document vectors its index."""
    t = time.perf_counter()
    ids = [d for d, _ in col["docs"]]
    if how == "server":
        miner.create(name)
        miner.ingest(name, col["docs"])  # the server encodes every document
        ingested = time.perf_counter() - t
        miner.refresh_vectors(name, "base", ids, base_vectors)
    else:
        # A vectors-only collection: the base model's vectors go in with the documents.
        miner.create(name, dims=int(base_vectors.shape[1]), encoder_name="base")
        miner.ingest_vectors(name, ids, base_vectors, texts=[text for _, text in col["docs"]])
        ingested = time.perf_counter() - t
    info = miner.get(name)
    if info.doc_count != len(ids) or info.pending_documents or info.encoder_kind != "trainer":
        raise RuntimeError(f"collection {name}: {info}")
    return {"ingest": how, "ingest_s": ingested, "total_s": time.perf_counter() - t, "generation": info.generation}


# ---------------------------------------------------------------- one collection


def run_collection(col: dict, args, miner) -> dict:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", col["name"])[:64]
    n = args.negatives
    out = {"rows": {}}
    print(f"== {col['name']}: {len(col['train'])} train / {len(col['test'])} test queries, {len(col['docs'])} documents", flush=True)

    t = time.perf_counter()
    base = load_model(args)
    base_docs = encode(base, [text for _, text in col["docs"]], args)
    base_doc_s = time.perf_counter() - t
    base_train_queries = encode(base, [q["text"] for q in col["train"]], args)
    out["base_corpus_encode_s"] = base_doc_s

    def row_done(r, result):
        out["rows"][r] = result
        m = result.get("metrics")
        if m:
            sd = lambda v: f" ± {v:.4f}" if v is not None else ""
            print(
                f"  row {r}: nDCG@10 {m['ndcg@10']['mean']:.4f}{sd(m['ndcg@10']['sd'])}  Recall@100 {m['recall@100']['mean']:.4f}{sd(m['recall@100']['sd'])}"
                f"  leak {_pct(result.get('leak_rate'))}  wall {result['wall_s']:.0f} s",
                flush=True,
            )

    mined_cache = tempfile.mkdtemp(prefix="train-eval-st-")
    hardneg_ready = None

    for r in args.rows:
        print(f"  row {r}: {ROWS[r]} ...", flush=True)
        started = time.perf_counter()
        result = {"label": ROWS[r]}
        try:
            if r == 0:
                t = time.perf_counter()
                queries = encode(base, [q["text"] for q in col["test"]], args)
                ev = evaluate(col, base_docs, queries)
                ev["eval_s"] = base_doc_s + time.perf_counter() - t
                result["runs"] = [{"seed": None, **ev}]
            else:
                mine_s = 0.0
                if r == 1:
                    make = lambda seed: InBatch(col)
                elif r in (2, 3):
                    mined, mine_s = mine_sentence_transformers(col, args, base, RELATIVE_MARGIN if r == 3 else None, mined_cache)
                    make = lambda seed: Offline(col, mined, n)
                else:
                    if hardneg_ready is None:
                        hardneg_ready = fill_collection(miner, col, name, base_docs, args.ingest)
                        out["hardneg_collection"] = hardneg_ready
                        mine_s += hardneg_ready["total_s"]
                    if r == 4:
                        mined, s = mine_hardneg_offline(col, args, miner, name, base_train_queries)
                        mine_s += s
                        make = lambda seed: Offline(col, mined, n)
                    else:
                        options = {"sampling": "ambiguous", **args.simans} if r == 6 else {}
                        make = lambda seed: Online(col, args, miner, name, seed, base_docs, options, f"row{r}-seed{seed}")
                result["mine_s"] = mine_s
                runs = []
                for seed in args.seeds:
                    model, stats = train(col, args, seed, make(seed))
                    ev = evaluate_model(model, col, args)
                    runs.append({"seed": seed, **stats, **ev})
                    del model
                result["runs"] = runs
            _summarize(result)
        except Exception as e:  # the row fails, loudly; the others still run
            result["error"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()
            print(f"\n!!! row {r} ({ROWS[r]}) FAILED: {result['error']}\n{result['traceback']}", file=sys.stderr, flush=True)
        result["wall_s"] = time.perf_counter() - started + (base_doc_s if r == 0 else 0.0)
        row_done(r, result)
    shutil.rmtree(mined_cache, ignore_errors=True)
    return out


def _summarize(result: dict) -> None:
    runs = result["runs"]
    result["metrics"] = {}
    for key in ("ndcg@10", "recall@100"):
        mean, sd = mean_sd([x[key] for x in runs])
        result["metrics"][key] = {"mean": mean, "sd": sd, "per_seed": [x[key] for x in runs]}
    if "negatives" in runs[0]:
        neg = sum(x["negatives"] for x in runs)
        result["leak_rate"] = sum(x["leaks"] for x in runs) / neg if neg else None
        asked = sum(x["rows_asked"] for x in runs)
        result["yield"] = sum(x["rows_used"] for x in runs) / asked if asked else None
    for key in ("train_s", "eval_s", "refresh_s"):
        if key in runs[0]:
            result[key] = statistics.fmean(x[key] for x in runs)


def _pct(x) -> str:
    return f"{x:.1%}" if x is not None else "–"


# ---------------------------------------------------------------- report


def cpu_snapshot(server_pid: int) -> dict:
    """The machine's busy CPU seconds (/proc/stat, all cores; idle and iowait excluded) and this
    benchmark's own (this process, its ended children, the server)."""
    values = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    busy = sum(values) - values[3] - values[4]
    own = resource.getrusage(resource.RUSAGE_SELF)
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = own.ru_utime + own.ru_stime + ended.ru_utime + ended.ru_stime + cst.server_cpu(server_pid)
    return {"wall": time.perf_counter(), "busy_s": busy / os.sysconf("SC_CLK_TCK"), "ours_s": ours}


def cpu_shares(before: dict, after: dict) -> dict:
    """Shares of the machine's CPU capacity used by this benchmark and by everything else."""
    capacity = (after["wall"] - before["wall"]) * (os.cpu_count() or 1)
    ours = after["ours_s"] - before["ours_s"]
    others = max(0.0, after["busy_s"] - before["busy_s"] - ours)
    return {"ours": ours / capacity, "others": others / capacity}


def lscpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    m = re.search(r"^Model name:\s*(.+)$", out, re.M)
    return m.group(1).strip() if m else "unknown"


def extrapolate(col_out: dict, args) -> dict:
    """Wall time of this collection's table with the default sizes, from this run's timings:
    per row, mining once + per seed (eval + training time per step x steps + refresh time per
    refresh x refreshes)."""
    full_refreshes = (FULL["steps"] - 1) // FULL["refresh_every"]
    total = 0.0
    rows = {}
    for r, res in col_out["rows"].items():
        if "runs" not in res or "metrics" not in res:
            continue
        if r == 0:
            est = res["runs"][0]["eval_s"]
        else:
            per_seed = []
            for x in res["runs"]:
                refresh = x.get("refresh_s", 0.0)
                per_step = (x["train_s"] - refresh) / args.steps
                per_refresh = refresh / x["refreshes"] if x.get("refreshes") else 0.0
                per_seed.append(x["eval_s"] + per_step * FULL["steps"] + per_refresh * full_refreshes)
            est = res.get("mine_s", 0.0) + statistics.fmean(per_seed) * len(FULL["seeds"])
        rows[r] = est
        total += est
    return {"rows_s": rows, "total_s": total}


def markdown(col: dict, col_out: dict, args, env: dict) -> str:
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"### {col['name']}: {len(col['train'])} train / {len(col['test'])} test queries, {len(col['docs'])} documents",
        "",
        f"all-MiniLM-L6-v2 fine-tuned with MultipleNegativesRankingLoss (scale {args.scale:g}): {args.steps} steps x {args.batch_size} "
        f"train queries, {args.negatives} mined negative(s) per query (rows 2-6), lr {args.lr:g} (warmup {args.warmup_ratio:g}, linear decay), "
        f"max length {args.max_seq_length}; online rows refresh every {args.refresh_every} steps. Seeds {seeds}: mean ± sample sd. "
        f"CPU: {env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads; during this collection the benchmark used "
        f"{col_out['cpu_share']['ours']:.0%} of the cores and other processes {col_out['cpu_share']['others']:.0%} "
        f"({'shared with another job' if col_out['cpu_share']['others'] > 0.1 else 'not shared'}).",
        "",
        "| row | negatives | nDCG@10 | Recall@100 | train leak | rows used | mine s | train s / seed | eval s / seed | row wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r, res in sorted(col_out["rows"].items()):
        if "error" in res:
            msg = res["error"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r} | {res['label']} | **FAILED**: {msg} | | | | | | | {res['wall_s']:.0f} |")
            continue
        m = res["metrics"]
        cell = lambda k: f"{m[k]['mean']:.4f}" + (f" ± {m[k]['sd']:.4f}" if m[k]["sd"] is not None else "")
        num = lambda k, fmt="{:.0f}": fmt.format(res[k]) if res.get(k) is not None else "–"
        lines.append(
            f"| {r} | {res['label']} | {cell('ndcg@10')} | {cell('recall@100')} | {_pct(res.get('leak_rate'))} | {_pct(res.get('yield'))} "
            f"| {num('mine_s')} | {num('train_s')} | {num('eval_s')} | {res['wall_s']:.0f} |"
        )
    lines += [
        "",
        "train leak: share of the negatives trained on that are judged relevant for their query. rows used: share of "
        "the batches' queries that got all their negatives (the others sit the step out). mine s: once per row, before "
        "its seeds (row 3 reuses row 2's cached corpus embeddings; the hardneg collection's setup counts in the first "
        "hardneg row). train s: per seed, online mining waits and index refreshes included. eval s: per seed, encoding "
        "the corpus and the test queries (row 0: the base model's, shared with rows 4-6).",
        "",
        verdict(col_out),
    ]
    return "\n".join(lines)


def verdict(col_out: dict) -> str:
    """Which row is best, and hardneg's best against sentence-transformers' best, in sds."""
    ok = {r: res for r, res in col_out["rows"].items() if "metrics" in res}
    if not ok:
        return "No row finished."
    parts = []
    for key in ("ndcg@10", "recall@100"):
        best = max(ok, key=lambda r: ok[r]["metrics"][key]["mean"])
        text = f"{key}: best row {best}"
        st = [r for r in (2, 3) if r in ok]
        hn = [r for r in (4, 5, 6) if r in ok]
        if st and hn:
            s = max(st, key=lambda r: ok[r]["metrics"][key]["mean"])
            h = max(hn, key=lambda r: ok[r]["metrics"][key]["mean"])
            diff = ok[h]["metrics"][key]["mean"] - ok[s]["metrics"][key]["mean"]
            sd = ok[s]["metrics"][key]["sd"]
            text += f"; best hardneg row {h} - best sentence-transformers row {s} = {diff:+.4f}"
            if sd is None:
                text += " (one seed: no sd)"
            elif sd > 0:
                text += f" ({diff / sd:+.1f} sd of row {s})"
            else:
                text += f" (row {s}'s sd is 0)"
        if 4 in ok and 5 in ok:
            text += f"; online (5) - offline (4) = {ok[5]['metrics'][key]['mean'] - ok[4]['metrics'][key]['mean']:+.4f}"
        parts.append(text)
    return ". ".join(parts) + "."


def main() -> None:
    args = parse_args()
    cst.ensure_venv()
    cst.ensure_client()
    if args.setup_only:
        return
    # OpenMP threads that spin while they wait collapse (4x slower steps, measured) when
    # another job shares the cores; passive waiting costs nothing measurable when none does.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if Path(sys.prefix).resolve() != cst.VENV:
        os.execv(str(cst.VENV_PYTHON), [str(cst.VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    self_check()
    if args.server is None:
        args.server = next((p for p in (ROOT / "target/release/hardneg-server", ROOT / "target/debug/hardneg-server") if p.exists()), None)
        if args.server is None:
            sys.exit("no hardneg-server binary: build one (cargo build --release -p hardneg-server) or pass --server")
    args.server, args.model = args.server.resolve(), args.model.resolve()
    out_base = args.out or RESULTS / ("train_eval-quick" if args.quick else "train_eval")
    datasets = [d.resolve() for d in (args.datasets or [cst.DATASETS / "cranfield"])]

    import hardneg
    import sentence_transformers
    import torch
    import transformers

    env = {
        "cpu": lscpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_before": os.getloadavg()[0],
        "versions": {
            "torch": torch.__version__,
            "sentence-transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "hardneg-client": hardneg.__version__,
        },
        "server": str(args.server),
    }
    config = {k: v for k, v in vars(args).items() if k not in ("datasets", "simans_option")}
    config = {k: str(v) if isinstance(v, Path) else v for k, v in config.items()}
    config["split"] = "judged queries ordered by sha256(query id); first floor(n/2) train, rest test"
    results = {"config": config, "env": env, "collections": {}}
    server = Server(args.server, args.model)
    failed = True
    reports = []
    started = time.perf_counter()
    try:
        miner = hardneg.Miner(server.addr)
        env["server_start_s"] = server.wait(miner)
        for folder in datasets:
            col = load(folder)
            t, cpu0 = time.perf_counter(), cpu_snapshot(server.proc.pid)
            col_out = run_collection(col, args, miner)
            col_out["wall_s"] = time.perf_counter() - t
            col_out["cpu_share"] = cpu_shares(cpu0, cpu_snapshot(server.proc.pid))
            col_out["load_average_after"] = os.getloadavg()
            col_out["split"] = {"train": [q["id"] for q in col["train"]], "test": [q["id"] for q in col["test"]]}
            col_out["documents"] = len(col["docs"])
            col_out["relevant_outside_corpus"] = col["relevant_outside_corpus"]
            col_out["extrapolated_default_run"] = extrapolate(col_out, args)
            results["collections"][col["name"]] = col_out
            reports.append((col, col_out))
        miner.close()
        failed = False
    finally:
        server.stop(keep_log=failed)
    text = []
    for col, col_out in reports:
        text.append(markdown(col, col_out, args, env))
        est = col_out["extrapolated_default_run"]
        share = col_out["cpu_share"]["ours"]
        text.append(
            f"This run: {col_out['wall_s']:.0f} s. Estimated wall time of the default table "
            f"({len(FULL['seeds'])} seeds, {FULL['steps']} steps, refresh every {FULL['refresh_every']}), from this run's timings: "
            f"{est['total_s'] / 60:.1f} min at this run's CPU share ({share:.0%} of the cores); about "
            f"{est['total_s'] * share / 0.9 / 60:.1f} min with the cores to itself (at 90% of them). Rows: "
            + ", ".join(f"{r}: {s:.0f} s" for r, s in sorted(est["rows_s"].items()))
            + (". Rows that failed are not in the estimate (row 6 costs about what row 5 does)." if any("error" in x for x in col_out["rows"].values()) else ".")
        )
    report = "\n\n".join(text)
    print("\n" + report)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out_base) + ".md").write_text(report + "\n")
    Path(str(out_base) + ".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nwrote {out_base}.md and {out_base}.json (total {time.perf_counter() - started:.0f} s)")
    errors = [(c["name"], r, res["error"]) for c, o in reports for r, res in o["rows"].items() if "error" in res]
    if errors:
        for name, r, e in errors:
            print(f"FAILED: {name} row {r}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
