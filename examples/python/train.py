"""Fine-tune all-MiniLM-L6-v2 on Cranfield with hard negatives mined online by hardneg.

Each step trains on one batch of (query, positive) pairs with a contrastive loss over in-batch
negatives (the other queries' positives) plus the negatives hardneg mined for that batch.
Batches reach hardneg through one ``MineStream`` call that keeps ``--prefetch`` batches in
flight, so mining overlaps training. Queries are sent as vectors from the model being trained,
and every ``--refresh-every`` steps the collection's index is rebuilt from the corpus encoded
by that model (upload + commit), so the negatives stay hard as the model moves.

    scripts/run &    # or target/debug/hardneg-server --model-dir models/all-MiniLM-L6-v2
    python examples/python/train.py --steps 20 --refresh-every 5

See examples/python/README.md for the install.
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

import hardneg

ROOT = Path(__file__).resolve().parents[2]


def parse_args() -> argparse.Namespace:
    datasets = Path(os.environ.get("HARDNEG_DATASETS", ROOT.parent / "shared/datasets"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="hardneg server")
    p.add_argument("--token", default=os.environ.get("HARDNEG_TOKEN"), help="bearer token, if the server wants one")
    p.add_argument("--model", default=str(ROOT / "models/all-MiniLM-L6-v2"), help="sentence-transformers model dir")
    p.add_argument("--data", default=str(datasets / "cranfield"), help="BEIR dataset dir")
    p.add_argument("--collection", default="cranfield-train")
    p.add_argument("--max-docs", type=int, default=400, help="documents to ingest (the server encodes ~20/s on 2 CPU cores)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--negatives", type=int, default=2, help="mined negatives per query")
    p.add_argument("--refresh-every", type=int, default=5, help="steps between index refreshes")
    p.add_argument("--prefetch", type=int, default=2, help="batches in flight while a step trains")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--scale", type=float, default=20.0, help="similarity scale (inverse temperature)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", help="save the fine-tuned model here")
    return p.parse_args()


def load_pairs(data: Path, doc_ids: set) -> List[Tuple[str, str, str]]:
    """(query id, query text, positive id) for queries with a judged document among doc_ids."""
    queries = hardneg.beir.read_queries(data / "queries.jsonl")
    qrels = hardneg.beir.read_qrels(data / "qrels/test.tsv")
    pairs = []
    for qid, text in queries.items():
        positive = hardneg.beir.positive(qrels.get(qid, []), among=doc_ids)
        if positive is not None:
            pairs.append((qid, text, positive))
    return pairs


def embed(model: SentenceTransformer, texts: List[str]) -> np.ndarray:
    """Unit-length embeddings for indexing and querying, without gradients."""
    model.eval()
    with torch.no_grad():
        return model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)


def embed_for_loss(model: SentenceTransformer, texts: List[str], device: str) -> torch.Tensor:
    prepare = getattr(model, "preprocess", None) or model.tokenize  # `tokenize` before sentence-transformers 6
    features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prepare(texts).items()}
    return F.normalize(model(features)["sentence_embedding"], dim=-1)


def contrastive_loss(model: SentenceTransformer, rows: List[dict], n: int, scale: float, device: str) -> Tuple[torch.Tensor, float, float]:
    """InfoNCE: each anchor against every positive of the batch (in-batch negatives) and every
    mined negative; the right answer is its own positive. Also returns the mean similarity of
    anchors to their positive and to their own mined negatives."""
    anchors = embed_for_loss(model, [r["anchor"] for r in rows], device)
    candidates = [r["positive"] for r in rows] + [r[f"negative_{j}"] for r in rows for j in range(1, n + 1)]
    docs = embed_for_loss(model, candidates, device)
    scores = anchors @ docs.T
    b = len(rows)
    loss = F.cross_entropy(scores * scale, torch.arange(b, device=device))
    own_negatives = scores[:, b:].reshape(b, b, n)[torch.arange(b), torch.arange(b)]
    return loss, scores[:, :b].diagonal().mean().item(), own_negatives.mean().item()


def ensure_collection(miner: hardneg.Miner, name: str, docs: List[dict]) -> hardneg.pb.CollectionInfo:
    """Creates and fills the collection, unless a previous run did."""
    try:
        info = miner.get(name)
        if info.doc_count == len(docs):
            return info
        raise SystemExit(f"collection {name!r} holds {info.doc_count} documents, not {len(docs)}: drop it or pick another --collection")
    except hardneg.NotFound:
        pass
    miner.create(name)
    start = time.monotonic()
    miner.ingest(name, docs, progress=lambda done, total: print(f"\ringest {done}/{total}", end="", flush=True))
    print(f" ({time.monotonic() - start:.1f} s, encoded by the server)")
    return miner.get(name)


def main() -> None:
    args = parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    data = Path(args.data)
    docs = hardneg.beir.read_corpus(data / "corpus.jsonl")[: args.max_docs]
    doc_ids = [d["id"] for d in docs]
    doc_texts: Dict[str, str] = {d["id"]: f"{d['title']} {d['text']}" if d["title"].strip() else d["text"] for d in docs}
    pairs = load_pairs(data, set(doc_ids))
    print(f"{len(docs)} documents, {len(pairs)} training queries")

    model = SentenceTransformer(args.model, device=args.device)
    model.max_seq_length = args.max_seq_length
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    miner = hardneg.Miner(args.addr, args.token)
    miner.wait_ready()
    info = ensure_collection(miner, args.collection, docs)
    if info.encoder_kind == "trainer":
        # A previous run left its own model's vectors: index with this run's model instead.
        info = miner.refresh_vectors(args.collection, "step-0", doc_ids, embed(model, [doc_texts[i] for i in doc_ids]))
    generation = info.generation
    print(f"collection {args.collection}: generation {generation} ({info.encoder_kind} encoder {info.encoder_name})")

    def batches():
        """Batches of queries as vectors from the model as it is when the batch is made,
        mined from at least the latest generation this run made."""
        rng = random.Random(args.seed)
        for batch_id in itertools.count():
            chunk = rng.sample(pairs, args.batch_size)
            vectors = embed(model, [text for _, text, _ in chunk])
            queries = [{"id": qid, "text": text, "vector": v, "positive_ids": [pos]} for (qid, text, pos), v in zip(chunk, vectors)]
            yield hardneg.batch(args.collection, queries, batch_id=batch_id, min_generation=generation,
                                num_negatives=args.negatives, preset="denoised", seed=batch_id, return_text=True)

    stream = miner.mine_stream(batches(), prefetch=args.prefetch, with_batches=True)
    waited = time.monotonic()
    for step, (request, response) in enumerate(stream, 1):
        mine_wait = time.monotonic() - waited
        rows = hardneg.rows(request, response, doc_texts, num_negatives=args.negatives)
        if not rows:
            continue
        model.train()
        loss, pos_sim, neg_sim = contrastive_loss(model, rows, args.negatives, args.scale, args.device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step:3d}  loss {loss.item():.4f}  sim(q, positive) {pos_sim:.3f}  sim(q, mined negative) {neg_sim:.3f}  "
              f"rows {len(rows)}/{len(request.queries)}  generation {response.generation}  waited for negatives {mine_wait * 1000:.0f} ms")
        if step % args.refresh_every == 0 and step < args.steps:
            start = time.monotonic()
            vectors = embed(model, [doc_texts[i] for i in doc_ids])
            info = miner.refresh_vectors(args.collection, f"step-{step}", doc_ids, vectors)
            generation = info.generation
            print(f"refreshed the index with this model's vectors: generation {generation} ({time.monotonic() - start:.1f} s)")
        if step == args.steps:
            break
        waited = time.monotonic()
    stream.close()
    miner.close()
    if args.output:
        model.save(args.output)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
