#!/usr/bin/env python3
"""Fine-tune a sentence-transformers model with each way of getting negatives, through the
library's own Trainer, and measure held-out retrieval.

For each BEIR-format collection folder (corpus.jsonl, queries.jsonl, qrels/):

Split. With qrels/train.tsv, the model trains on it and is evaluated on qrels/test.tsv: one
(anchor, positive) pair per judged-relevant (query, document) line of train.tsv (score > 0),
so a query with several relevant documents has several rows (and, for every miner, several
positives). Without a training split, the judged queries of test.tsv are ordered by the
SHA-256 hex digest of their id; the first floor(n/2) train (one pair each, its highest-scored
document; its other judged documents are hidden from every miner, so a negative that is one of
them is a leak) and the rest are evaluated.

Rows (the same model, hyper-parameters and seeds; only the negatives differ). Every trained
row is sentence-transformers' SentenceTransformerTrainer with MultipleNegativesRankingLoss and
the NO_DUPLICATES batch sampler; nothing here trains or computes a loss itself:
  0  the base model, untrained (evaluated once: it has no seed)
  1  the pairs alone: in-batch negatives only
  2  sentence-transformers `mine_hard_negatives` (base model), top-n of ranks [0, 30), n-tuple
  3  the same with relative_margin 0.05
  4  hardneg `training.mine_hard_negatives` (base model), ranks [0, 30), preset denoised
  5  hardneg online: `training.MiningTrainer` + `MiningCollator` (query vectors from the model
     being trained, preset denoised, ranks [0, 30)), `RefreshCallback` every --refresh-every
     steps (the model's document vectors uploaded and committed)
  6  row 5 with sampling "ambiguous" (SimANS; more options with --simans-option KEY=VALUE)
Offline rows (2-4) keep only the queries that got all n negatives (the library's n-tuple
format), so they train on fewer rows ("rows used"); online rows keep every row and fill a
missing negative with a random corpus document (the collator's default on_short="random").
--row-option R:KEY=VALUE adds a MineOptions field to hardneg row R (4, 5 or 6);
--topic-batches ROWS trains those rows on hardneg's topic batches (training.topic_batches,
TAS-B's topic-aware sampling) instead of the library's NO_DUPLICATES sampler.

Evaluation: the test queries against the whole corpus (every non-empty document), exact
cosine ranking (ties by corpus order). nDCG@10 with linear graded gains (as pytrec_eval /
BEIR) and Recall@100 (relevant = score > 0). Mean and sample standard deviation over seeds.
Train leak: the share of the negatives trained on that are judged relevant for their query.

Tuning without the test split: --holdout 0.2 holds out a fifth of the training queries
(ordered by the SHA-256 of their id; a held-out query whose text is also a training query's is
dropped) and evaluates on them; qrels/test.tsv is not read. Results go to their own files.

Resumable: every finished (row, seed) is written to the results JSON at once, with the
protocol and the row's own settings (its mining options, refresh cadence); a later run skips
what was measured with the same settings and redoes a row whose settings changed. The
server's presets are not part of the settings: after changing them, --redo 4,5,6. --fresh
starts over. The mined datasets of rows 2-4 and the base model's vectors are cached beside
the results.

Setup: the script makes its virtual environment (bench/.venv from bench/requirements.txt) and
installs the hardneg client from this checkout into it, then runs itself there. It starts its
own hardneg server (--server; default target/release/hardneg-server, else target/debug) on a
free loopback port and stops it at the end.

    python3 bench/train_eval.py ../shared/datasets/scifact              # the table (resumes)
    python3 bench/train_eval.py --quick ../shared/datasets/scifact      # a 1-seed, 6-step smoke run
    python3 bench/train_eval.py --rows 1,5 --seeds 1,2,3,4,5 ../shared/datasets/scifact
    python3 bench/train_eval.py --holdout 0.2 --rows 3,5 --row-option 5:range_min=2 ../shared/datasets/scifact

Defaults: seeds 1, 2, 3; 1 epoch, batch 32, 3 negatives per query (the library's
mine_hard_negatives default), lr 5e-5 with 10% warmup then
linear decay (the Trainer's), max length 128 tokens for every text in training and evaluation,
online rows refresh every 10 steps with 2 batches in flight. The device is the GPU when torch
sees one, else the CPU. Writes bench/results/train_eval-<collection>.{md,json} (--quick:
train_eval-quick-<collection>).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_st as cst  # noqa: E402  (the venv, small helpers)

ROOT = cst.ROOT
RESULTS = ROOT / "bench" / "results"

RANGE_MIN, RANGE_MAX = 0, 30
RELATIVE_MARGIN = 0.05
QUICK = {"seeds": [1], "max_steps": 6, "refresh_every": 3}

ROWS = {
    0: "base model, untrained",
    1: "in-batch negatives only",
    2: "sentence-transformers mine_hard_negatives, top-n of [0, 30)",
    3: "sentence-transformers mine_hard_negatives, relative_margin 0.05",
    4: "hardneg mine_hard_negatives, preset denoised (offline, base model)",
    5: "hardneg online (MiningTrainer), preset denoised, refresh every K steps",
    6: "hardneg online, preset denoised, sampling ambiguous (SimANS)",
}
# The MineOptions each hardneg row sets beyond the collator's (--row-option adds to them).
ROW_OPTIONS = {4: {}, 5: {}, 6: {"sampling": "ambiguous"}}


# ---------------------------------------------------------------- setup


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", type=Path, help="BEIR collection folders (default: $HARDNEG_DATASETS/scifact)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--server", type=Path, help="hardneg-server binary (default: target/release, else target/debug)")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2", help="model directory to fine-tune")
    p.add_argument("--rows", default="0,1,2,3,4,5,6", help="rows to run, e.g. 0,1,5")
    p.add_argument("--seeds", help="comma-separated (default 1,2,3; --quick 1)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="training pairs per step")
    p.add_argument("--negatives", type=int, default=3, help="mined negatives per query (rows 2-6; default 3, as the library's mine_hard_negatives)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (the Trainer's default)")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--scale", type=float, default=20.0, help="MultipleNegativesRankingLoss scale")
    p.add_argument("--max-seq-length", type=int, default=128, help="truncation for every text, in training and evaluation")
    p.add_argument("--encode-batch", type=int, default=64, help="texts per batch when encoding without gradients")
    p.add_argument("--refresh-every", type=int, help="online rows: steps between index refreshes (default 10; --quick 3)")
    p.add_argument("--prefetch", type=int, default=2, help="online rows: batches in flight")
    p.add_argument("--topic-batches", default="", metavar="ROWS",
                   help="trained rows whose batches are drawn by topic (hardneg's training.topic_batches) instead of the "
                        "library's NO_DUPLICATES sampler, e.g. 4,5")
    p.add_argument("--simans-option", action="append", default=[], metavar="KEY=VALUE", help="extra MineOptions field for row 6")
    p.add_argument("--row-option", action="append", default=[], metavar="R:KEY=VALUE", help="extra MineOptions field for hardneg row R")
    p.add_argument("--holdout", type=float, help="tune without the test split: hold out this share of the training queries "
                   "(ordered by sha256 of their id) and evaluate on them; qrels/test.tsv is not read")
    p.add_argument("--fresh", action="store_true", help="ignore every earlier result")
    p.add_argument("--redo", default="", help="rows whose earlier results are dropped, e.g. 4,5,6 after a server preset changed")
    p.add_argument("--out", type=Path, help="output path without suffix (default bench/results/train_eval[-quick]-<collection>)")
    p.add_argument("--setup-only", action="store_true", help="create the venv, install the client and exit")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else (QUICK["seeds"] if args.quick else [1, 2, 3])
    if args.quick and args.max_steps is None:
        args.max_steps = QUICK["max_steps"]
    args.refresh_every = args.refresh_every or (QUICK["refresh_every"] if args.quick else 10)
    args.rows = sorted({int(r) for r in args.rows.split(",")})
    args.redo = sorted({int(r) for r in args.redo.split(",") if r.strip()})
    args.topic_batches = sorted({int(r) for r in args.topic_batches.split(",") if r.strip()})
    if not set(args.topic_batches) <= set(ROWS) - {0}:
        p.error(f"--topic-batches: trained rows are {sorted(set(ROWS) - {0})}")
    if not set(args.rows) <= set(ROWS):
        p.error(f"--rows: rows are {sorted(ROWS)}")
    args.options = {r: dict(o) for r, o in ROW_OPTIONS.items()}
    for kv in args.simans_option:
        key, eq, value = kv.partition("=")
        if not eq:
            p.error(f"--simans-option {kv!r}: expected KEY=VALUE")
        args.options[6][key] = _literal(value)
    for spec in args.row_option:
        row, colon, kv = spec.partition(":")
        key, eq, value = kv.partition("=")
        if not colon or not eq or not row.isdigit() or int(row) not in args.options:
            p.error(f"--row-option {spec!r}: expected R:KEY=VALUE with R in 4, 5, 6")
        args.options[int(row)][key] = _literal(value)
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


def read_qrels(path: Path) -> dict:
    """Query id -> {document id: score} (the highest score when a pair repeats)."""
    out: dict = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            fields = [x.strip() for x in line.rstrip("\n").split("\t")]
            if not line.strip() or (n == 0 and fields[0] == "query-id"):
                continue
            q, doc, score = fields[:3]
            out.setdefault(q, {})[doc] = max(float(score), out.get(q, {}).get(doc, float("-inf")))
    return out


def load(folder: Path, holdout: float | None = None) -> dict:
    """The corpus (as the server stores it: trimmed title, a space, the text), the training
    pairs and the evaluation queries with their graded judgments. With ``holdout``, the last
    share of the training queries (ordered by the SHA-256 of their id) are the evaluation
    queries instead of the test split's, which is then not read."""
    docs = []
    for d in cst.read_jsonl(folder / "corpus.jsonl"):
        title, text = (d.get("title") or "").strip(), d.get("text") or ""
        if title or text.strip():
            docs.append((str(d["_id"]), f"{title} {text}" if title else text))
    text_of = dict(docs)
    queries = {str(q["_id"]): q["text"] for q in cst.read_jsonl(folder / "queries.jsonl")}
    col = {"name": folder.name, "folder": str(folder), "docs": docs, "text_of": text_of}
    if holdout is not None:
        if not (folder / "qrels" / "train.tsv").is_file() or not 0 < holdout < 1:
            sys.exit(f"--holdout needs a collection with qrels/train.tsv and a share in (0, 1); got {folder}, {holdout}")
        train = read_qrels(folder / "qrels" / "train.tsv")
        ordered = sorted((q for q, j in train.items() if q in queries and any(s > 0 for s in j.values())),
                         key=lambda q: hashlib.sha256(q.encode("utf-8")).hexdigest())
        cut = len(ordered) - max(1, round(holdout * len(ordered)))
        test = {q: train[q] for q in ordered[cut:]}
        train = {q: train[q] for q in ordered[:cut]}
        # A held-out query whose text is also a training query's would be seen in training.
        seen = {queries[q] for q in train}
        test = {q: j for q, j in test.items() if queries[q] not in seen}
        col["split"] = (f"tuning split: {len(train)} training queries of qrels/train.tsv, {len(test)} held out "
                        f"({holdout:g} by sha256 of the id; test.tsv not read)")
    else:
        test = read_qrels(folder / "qrels" / "test.tsv")
    if holdout is not None:
        pairs = [(q, doc) for q, judged in train.items() for doc, s in judged.items() if s > 0 and doc in text_of]
        relevant = {q: {d for d, s in judged.items() if s > 0} for q, judged in train.items()}
        test_ids = list(test)
    elif (folder / "qrels" / "train.tsv").is_file():
        train = read_qrels(folder / "qrels" / "train.tsv")
        col["split"] = "qrels/train.tsv for training, qrels/test.tsv for evaluation"
        pairs = [(q, doc) for q, judged in train.items() for doc, s in judged.items() if s > 0 and doc in text_of and q in queries]
        relevant = {q: {d for d, s in judged.items() if s > 0} for q, judged in train.items()}
        test_ids = [q for q, judged in test.items() if any(s > 0 for s in judged.values()) and q in queries]
    else:
        col["split"] = "judged queries of qrels/test.tsv ordered by sha256(query id); first floor(n/2) train, rest test"
        judged = sorted((q for q, j in test.items() if any(s > 0 for s in j.values()) and q in queries),
                        key=lambda q: hashlib.sha256(q.encode("utf-8")).hexdigest())
        half = len(judged) // 2
        pairs = []
        for q in judged[:half]:
            best = max((d for d, s in test[q].items() if s > 0 and d in text_of), key=lambda d: test[q][d], default=None)
            if best is not None:
                pairs.append((q, best))
        relevant = {q: {d for d, s in test[q].items() if s > 0} for q in judged[:half]}
        test_ids = judged[half:]
    col["pairs"] = [{"qid": q, "anchor": queries[q], "positive_id": d, "positive": text_of[d]} for q, d in pairs]
    col["relevant"] = relevant  # every judged-relevant document of a training query: a leak if mined
    col["test"] = [{"id": q, "text": queries[q]} for q in test_ids]
    col["gains"] = {q: {d: s for d, s in test[q].items() if s > 0} for q in test_ids}
    col["relevant_outside_corpus"] = sum(1 for q in test_ids for d in col["gains"][q] if d not in text_of)
    if not col["pairs"] or not col["test"]:
        sys.exit(f"{folder}: no training pairs or no evaluation queries")
    return col


# ---------------------------------------------------------------- models and evaluation


def load_model(args):
    from sentence_transformers import SentenceTransformer

    with contextlib.redirect_stderr(io.StringIO()):  # a weight-loading progress bar
        model = SentenceTransformer(str(args.model), device=args.device)
    model.max_seq_length = args.max_seq_length
    return model


def encode(model, texts: list, args, kind: str = "document"):
    fn = model.encode_query if kind == "query" else model.encode_document
    out = fn(texts, batch_size=args.encode_batch, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    model.train()
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
    return {"ndcg@10": statistics.fmean(ndcg), "recall@100": statistics.fmean(recall)}


def evaluate_model(model, col: dict, args) -> dict:
    t = time.perf_counter()
    docs = encode(model, [text for _, text in col["docs"]], args)
    queries = encode(model, [q["text"] for q in col["test"]], args, "query")
    return {**evaluate(col, docs, queries), "eval_s": time.perf_counter() - t}


# ---------------------------------------------------------------- training (the library's Trainer)


def trainer_args(args, seed: int, workdir: str, sampler=None):
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    return SentenceTransformerTrainingArguments(
        output_dir=workdir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_ratio,  # a float below 1: a share of the steps
        lr_scheduler_type="linear",
        batch_sampler=sampler or BatchSamplers.NO_DUPLICATES,
        seed=seed,
        data_seed=seed,
        use_cpu=args.device == "cpu",
        report_to=[],
        save_strategy="no",
        logging_steps=5,
        disable_tqdm=True,
    )


def train_run(r: int, seed: int, col: dict, args, data, miner=None, collection=None, base_vectors=None) -> dict:
    """One fine-tuning run of row r: the Trainer on `data` (pairs, or mined n-tuples)."""
    import torch
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    import hardneg
    from hardneg import training

    torch.manual_seed(seed)
    model = load_model(args)
    loss = MultipleNegativesRankingLoss(model, scale=args.scale)
    workdir = tempfile.mkdtemp(prefix="train-eval-")
    sampler = training.topic_batches(model, encode_batch_size=args.encode_batch) if r in args.topic_batches else None
    stats: dict = {}
    t = time.perf_counter()
    try:
        if r in (5, 6):
            corpus = args.corpus
            relevant = col["relevant"]
            qid_of = {p["anchor"]: p["qid"] for p in col["pairs"]}
            counts = {"negatives": 0, "leaks": 0, "generations": []}

            def seen(batch):
                counts["generations"].append(batch.response.generation)
                for row, ids in zip(batch.rows, batch.negative_ids):
                    rel = relevant.get(qid_of[row["anchor"]], set())
                    counts["negatives"] += len(ids)
                    counts["leaks"] += sum(1 for i in ids if i is not None and i in rel)

            with contextlib.suppress(hardneg.NotFound):
                miner.cancel_refresh(collection)  # a pending generation an interrupted run left
            training.index_corpus(miner, collection, corpus, model, encoder_name=f"seed{seed}-base", vectors=base_vectors)
            collator = training.MiningCollator(
                miner, collection, corpus, model, num_negatives=args.negatives, prefetch=args.prefetch, seed=seed,
                positives=training.positives_of(data), on_batch=seen, encode_batch_size=args.encode_batch,
                **{"preset": "denoised", "range_min": RANGE_MIN, "range_max": RANGE_MAX, **args.options[r]},
            )
            refresh = training.RefreshCallback(collator, every_n_steps=args.refresh_every, batch_size=args.encode_batch,
                                               name_prefix=f"seed{seed}-step")
            trainer = training.MiningTrainer(model=model, args=trainer_args(args, seed, workdir, sampler), train_dataset=data,
                                             loss=loss, data_collator=collator, callbacks=[refresh])
            trainer.train()
            rows = collator.stats["rows"] + collator.stats["rows_dropped"]
            stats = {
                "negatives": counts["negatives"], "leaks": counts["leaks"],
                "rows_used": 1.0 - collator.stats["rows_dropped"] / rows if rows else None,
                "filled": collator.stats["negatives_filled"], "mine_wait_s": collator.stats["mine_wait_s"],
                "refreshes": [[s, g, round(sec, 2)] for s, g, sec in refresh.history],
                "refresh_s": sum(sec for _, _, sec in refresh.history),
                "generations_used": sorted(set(counts["generations"])),
            }
        else:
            trainer = SentenceTransformerTrainer(model=model, args=trainer_args(args, seed, workdir, sampler), train_dataset=data, loss=loss)
            trainer.train()
        stats["steps"] = trainer.state.global_step
        stats["train_loss"] = trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None
        stats["train_s"] = time.perf_counter() - t
        stats.update(evaluate_model(model, col, args))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return stats


def pairs_dataset(col: dict):
    from datasets import Dataset

    return Dataset.from_dict({"anchor": [p["anchor"] for p in col["pairs"]], "positive": [p["positive"] for p in col["pairs"]]})


def offline_leaks(col: dict, data) -> dict:
    """Leaks of a mined n-tuple dataset: negatives whose text is a judged-relevant document of
    the row's query (a text may be several documents)."""
    ids_of: dict = {}
    for doc_id, text in col["docs"]:
        ids_of.setdefault(text, set()).add(doc_id)
    qid_of = {p["anchor"]: p["qid"] for p in col["pairs"]}
    negatives = leaks = 0
    negative_columns = [c for c in data.column_names if c.startswith("negative")]
    for row in data:
        rel = col["relevant"].get(qid_of[row["anchor"]], set())
        for c in negative_columns:
            negatives += 1
            leaks += bool(ids_of.get(row[c], set()) & rel)
    return {"negatives": negatives, "leaks": leaks, "rows_used": len(data) / len(col["pairs"])}


def mine_offline(r: int, col: dict, args, base, miner, cache: Path):
    """Row r's mined n-tuple dataset (cached: the base model and settings decide it)."""
    from datasets import Dataset

    key = hashlib.sha256(json.dumps([r, args.negatives, args.max_seq_length, args.options.get(r), col["name"], len(col["pairs"])]).encode()).hexdigest()[:16]
    path = cache / f"mined-row{r}-{key}.json"
    if r in args.redo:
        path.unlink(missing_ok=True)
    if path.exists():
        saved = json.loads(path.read_text())
        return Dataset.from_dict(saved["data"]), saved["mine_s"]
    pairs = pairs_dataset(col)
    corpus = [text for _, text in col["docs"]]
    t = time.perf_counter()
    common = dict(range_min=RANGE_MIN, range_max=RANGE_MAX, num_negatives=args.negatives, output_format="n-tuple",
                  batch_size=args.encode_batch, verbose=False)
    if r in (2, 3):
        from sentence_transformers.util import mine_hard_negatives

        with contextlib.redirect_stderr(io.StringIO()):
            data = mine_hard_negatives(pairs, base, corpus=corpus, relative_margin=RELATIVE_MARGIN if r == 3 else None,
                                       sampling_strategy="top", cache_folder=str(cache / "st-embeddings"), **common)
    else:
        from hardneg import training

        data = training.mine_hard_negatives(pairs, base, corpus=corpus, miner=miner, **{"preset": "denoised", "seed": 0, **common, **args.options[4]})
    mine_s = time.perf_counter() - t
    path.write_text(json.dumps({"mine_s": mine_s, "data": data.to_dict()}))
    return data, mine_s


# ---------------------------------------------------------------- the table


class Store:
    """The results JSON, written after every run. Each row's runs are kept with the settings
    that decide them (the protocol; for hardneg rows also their mining options), so a rerun
    skips what was measured with the same settings and redoes what was not."""

    def __init__(self, path: Path, protocol: dict, fresh: bool, redo: set):
        self.path = path
        self.protocol = protocol
        self.data = {"protocol": protocol, "rows": {}}
        if path.exists() and not fresh:
            old = json.loads(path.read_text())
            if old.get("protocol") == protocol:
                self.data = old
                for r in redo:
                    self.data["rows"].pop(str(r), None)
            else:
                print(f"{path}: earlier results were made with another protocol; starting over (kept as .old)", flush=True)
                shutil.copyfile(path, str(path) + ".old")

    def row(self, r: int, settings: dict, label: str) -> dict:
        row = self.data["rows"].get(str(r))
        if row is None or row.get("settings") != settings:
            if row is not None and row.get("runs"):
                print(f"  row {r}: its settings changed; its {len(row['runs'])} earlier run(s) are dropped", flush=True)
            row = self.data["rows"][str(r)] = {"label": label, "settings": settings, "runs": {}}
        return row

    def put(self, row: dict, seed, result: dict) -> None:
        row["runs"][str(seed)] = result
        row.pop("error", None)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def run_collection(col: dict, args, miner, store: Store, cache: Path) -> None:
    import numpy as np

    from hardneg import training

    base = load_model(args)
    vectors_file = cache / f"base-{col['name']}-{args.max_seq_length}.npy"
    base_vectors = None
    if any(r in args.rows for r in (0, 5, 6)):
        if vectors_file.exists():
            base_vectors = np.load(vectors_file)
        else:
            t = time.perf_counter()
            base_vectors = encode(base, [text for _, text in col["docs"]], args)
            np.save(vectors_file, base_vectors)
            store.data.setdefault("base_encode_s", time.perf_counter() - t)
    # The corpus as the miners see it: one document per distinct text (the first id).
    args.corpus = training.Corpus(dict(col["docs"]))
    if base_vectors is not None:
        position = {doc_id: i for i, (doc_id, _) in enumerate(col["docs"])}
        args.corpus_vectors = base_vectors[[position[d] for d in args.corpus.ids]]
    collection = f"train-eval-{col['name']}"
    for r in args.rows:
        seeds = [None] if r == 0 else args.seeds
        settings = {"options": args.options.get(r), "refresh_every": args.refresh_every if r in (5, 6) else None,
                    "prefetch": args.prefetch if r in (5, 6) else None}
        label = ROWS[r]
        extra = {k: v for k, v in (args.options.get(r) or {}).items() if ROW_OPTIONS[r].get(k) != v}
        if extra:
            label += ", with " + ", ".join(f"{k}={v}" for k, v in extra.items())
        if r in args.topic_batches:
            settings["batches"] = "topic"
            label += ", topic batches (training.topic_batches)"
        row = store.row(r, settings, label)
        todo = [s for s in seeds if str(s) not in row["runs"]]
        print(f"  row {r}: {ROWS[r]}: {len(seeds) - len(todo)} of {len(seeds)} runs already done", flush=True)
        if not todo:
            continue
        try:
            if r == 0:
                t = time.perf_counter()
                queries = encode(base, [q["text"] for q in col["test"]], args, "query")
                store.put(row, None, {**evaluate(col, base_vectors, queries), "eval_s": time.perf_counter() - t})
                continue
            data, extra = pairs_dataset(col), {}
            if r in (2, 3, 4):
                data, mine_s = mine_offline(r, col, args, base, miner, cache)
                extra = {"mine_s": mine_s, **offline_leaks(col, data)}
            for seed in todo:
                t = time.perf_counter()
                result = {**extra, **train_run(r, seed, col, args, data, miner, collection, getattr(args, "corpus_vectors", None))}
                result["wall_s"] = time.perf_counter() - t
                store.put(row, seed, result)
                print(f"    seed {seed}: nDCG@10 {result['ndcg@10']:.4f}  Recall@100 {result['recall@100']:.4f}  "
                      f"{result['steps']} steps  {result['wall_s']:.0f} s", flush=True)
        except Exception as e:  # the row fails loudly; the others still run
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
            store.save()
            print(f"\n!!! row {r} ({ROWS[r]}) FAILED: {e}\n{traceback.format_exc()}", file=sys.stderr, flush=True)


def summarize(store: Store) -> dict:
    out = {}
    for r, row in sorted(store.data["rows"].items(), key=lambda kv: int(kv[0])):
        runs = list(row["runs"].values())
        if not runs:
            out[int(r)] = {"label": row["label"], "error": row.get("error", "no run finished")}
            continue
        s = {"label": row["label"], "seeds": len(runs)}
        for key in ("ndcg@10", "recall@100"):
            s[key] = mean_sd([x[key] for x in runs])
        if "negatives" in runs[0]:
            neg = sum(x["negatives"] for x in runs)
            s["leak"] = sum(x["leaks"] for x in runs) / neg if neg else None
            s["rows_used"] = statistics.fmean(x["rows_used"] for x in runs if x.get("rows_used") is not None)
        for key in ("train_s", "eval_s", "mine_s", "refresh_s", "steps"):
            if key in runs[0]:
                s[key] = statistics.fmean(x[key] for x in runs)
        if "error" in row:
            s["error"] = row["error"]
        out[int(r)] = s
    return out


def verdict(rows: dict) -> list:
    """hardneg's best row against in-batch and against sentence-transformers' best, with the
    goal's rule: a margin larger than twice the larger of the two rows' standard deviations."""
    ok = {r: s for r, s in rows.items() if "ndcg@10" in s}
    hn = [r for r in (4, 5, 6) if r in ok]
    if not hn:
        return ["No hardneg row finished."]
    best = max(hn, key=lambda r: ok[r]["ndcg@10"][0])
    lines = []
    for other in ([1] if 1 in ok else []) + ([max((r for r in (2, 3) if r in ok), key=lambda r: ok[r]["ndcg@10"][0])] if any(r in ok for r in (2, 3)) else []):
        (m1, s1), (m2, s2) = ok[best]["ndcg@10"], ok[other]["ndcg@10"]
        margin = m1 - m2
        if s1 is None or s2 is None:
            lines.append(f"row {best} against row {other}: nDCG@10 {margin:+.4f}, Recall@100 "
                         f"{ok[best]['recall@100'][0] - ok[other]['recall@100'][0]:+.4f} (one seed: no verdict without a standard deviation).")
            continue
        need = 2 * max(s1 or 0.0, s2 or 0.0)
        r1, r2 = ok[best]["recall@100"][0], ok[other]["recall@100"][0]
        beats = margin > need and r1 >= r2
        lines.append(
            f"row {best} against row {other}: nDCG@10 {margin:+.4f} (needed > {need:.4f}: twice the larger sd), "
            f"Recall@100 {r1 - r2:+.4f}: {'beats it' if beats else 'does not beat it'}."
        )
    if 4 in ok and 5 in ok:
        lines.append(f"online (5) - offline (4): nDCG@10 {ok[5]['ndcg@10'][0] - ok[4]['ndcg@10'][0]:+.4f}, "
                     f"Recall@100 {ok[5]['recall@100'][0] - ok[4]['recall@100'][0]:+.4f}.")
    return lines


def markdown(col: dict, store: Store, args, env: dict) -> str:
    rows = summarize(store)
    cell = lambda v: "–" if v is None else (f"{v[0]:.4f}" + (f" ± {v[1]:.4f}" if v[1] is not None else ""))
    pct = lambda v: "–" if v is None else f"{v:.1%}"
    num = lambda v: "–" if v is None else f"{v:.0f}"
    lines = [
        f"### {col['name']}: {len(col['pairs'])} training pairs, {len(col['test'])} test queries, {len(col['docs'])} documents",
        "",
        f"{Path(str(args.model)).name} fine-tuned with SentenceTransformerTrainer and MultipleNegativesRankingLoss (scale {args.scale:g}, "
        f"{'NO_DUPLICATES' if not args.topic_batches else 'NO_DUPLICATES (topic batches where the row says so)'} batches of {args.batch_size}, " + (f"{args.max_steps} steps" if args.max_steps else f"{args.epochs:g} epoch(s)")
        + f", lr {args.lr:g} with {args.warmup_ratio:g} warmup then linear decay, max length {args.max_seq_length}); "
        f"{args.negatives} mined negative(s) per query (rows 2-6); online rows refresh every {args.refresh_every} steps, "
        f"{args.prefetch} batches in flight. Split: {col['split']}. Mean ± sample sd over the seeds. "
        f"Device: {env['device']}; CPU: {env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads.",
        "",
        "| row | negatives | seeds | nDCG@10 | Recall@100 | train leak | rows used | steps | mine s | train s / seed | eval s / seed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r, s in rows.items():
        if "ndcg@10" not in s:
            lines.append(f"| {r} | {s['label']} | 0 | **FAILED**: {s['error'][:200]} | | | | | | | |")
            continue
        label = s["label"] + (f" (**FAILED** later: {s['error'][:120]})" if "error" in s else "")
        lines.append(
            f"| {r} | {label} | {s['seeds']} | {cell(s['ndcg@10'])} | {cell(s['recall@100'])} | {pct(s.get('leak'))} | "
            f"{pct(s.get('rows_used'))} | {num(s.get('steps'))} | {num(s.get('mine_s'))} | {num(s.get('train_s'))} | {num(s.get('eval_s'))} |"
        )
    lines += ["", *verdict(rows)]
    return "\n".join(lines)


def lscpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    m = re.search(r"^Model name:\s*(.+)$", out, re.M)
    return m.group(1).strip() if m else "unknown"


class Server:
    def __init__(self, binary: Path, model: Path):
        self.port = cst.free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="hardneg-train-eval-"))
        self.log = self.dir / "server.log"
        cmd = [str(binary), "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.dir / "data"), "--model-dir", str(model)]
        env = {k: v for k, v in os.environ.items() if k not in ("HARDNEG_AUTH_TOKEN", "HARDNEG_TOKEN")}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.addr = f"127.0.0.1:{self.port}"

    def wait(self, miner) -> None:
        deadline = time.perf_counter() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hardneg-server exited with {self.proc.returncode}; see {self.log}")
            try:
                miner.wait_ready(timeout=1.0)
                return
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


def main() -> None:
    args = parse_args()
    cst.ensure_venv()
    cst.ensure_client()
    if args.setup_only:
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP waits collapse when another job shares the cores
    if Path(sys.prefix).resolve() != cst.VENV:
        os.execv(str(cst.VENV_PYTHON), [str(cst.VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                 ("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    self_check()
    if args.server is None:
        args.server = next((p for p in (ROOT / "target/release/hardneg-server", ROOT / "target/debug/hardneg-server") if p.exists()), None)
        if args.server is None:
            sys.exit("no hardneg-server binary: build one (cargo build --release -p hardneg-server) or pass --server")
    args.server, args.model = args.server.resolve(), args.model.resolve()

    import hardneg
    import sentence_transformers
    import torch
    import transformers

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {
        "cpu": lscpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU",
        "versions": {"torch": torch.__version__, "sentence-transformers": sentence_transformers.__version__,
                     "transformers": transformers.__version__, "hardneg-client": hardneg.__version__},
    }
    datasets = [d.resolve() for d in (args.datasets or [cst.DATASETS / "scifact"])]
    protocol = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k in ("model", "epochs", "max_steps", "batch_size", "negatives", "lr", "warmup_ratio", "scale",
                         "max_seq_length", "holdout")}
    protocol["device"] = args.device
    # A kill (SIGTERM) unwinds like an error, so the server below is stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    server = Server(args.server, args.model)
    failed = True
    try:
        miner = hardneg.Miner(server.addr, timeout=600.0)
        server.wait(miner)
        for folder in datasets:
            col = load(folder, args.holdout)
            tag = ("-quick" if args.quick else "") + (f"-holdout{args.holdout:g}" if args.holdout else "")
            base = args.out or RESULTS / f"train_eval{tag}-{col['name']}"
            cache = Path(str(base) + "-cache")
            cache.mkdir(parents=True, exist_ok=True)
            store = Store(Path(str(base) + ".json"), {**protocol, "collection": folder.name}, args.fresh, set(args.redo))
            t = time.perf_counter()
            print(f"{col['name']}: {len(col['pairs'])} training pairs, {len(col['test'])} test queries, {len(col['docs'])} documents "
                  f"({col['split']}); results in {store.path}", flush=True)
            run_collection(col, args, miner, store, cache)
            store.data.setdefault("sessions", []).append({"wall_s": time.perf_counter() - t, "env": env, "load_after": os.getloadavg(),
                                                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
            store.data["summary"] = {str(r): s for r, s in summarize(store).items()}
            store.save()
            report = markdown(col, store, args, env)
            walls = ", ".join(f"{s['wall_s'] / 60:.0f} min" for s in store.data["sessions"])
            report += f"\n\nWall time of the runs that made this table: {walls} (server: {args.server.name} {args.server.parent.name} build)."
            Path(str(base) + ".md").write_text(report + "\n")
            print("\n" + report + f"\n\nwrote {base}.md and {base}.json", flush=True)
        miner.close()
        failed = False
    finally:
        server.stop(keep_log=failed)


if __name__ == "__main__":
    main()
