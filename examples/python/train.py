"""Fine-tune a sentence-transformers model with hard negatives mined online by hardneg.

The training is sentence-transformers' own: MultipleNegativesRankingLoss in its Trainer.
hardneg comes in through hardneg.training: the corpus is indexed with the model being
trained (a vectors-only collection), a MiningCollator mines each batch's negatives with query
vectors from that model (MiningTrainer keeps --prefetch batches in flight over one MineStream
call), and a RefreshCallback re-encodes the corpus with the model every --refresh-every steps,
after which batches ask for the new index generation.

    scripts/run &    # or target/debug/hardneg-server --model-dir models/all-MiniLM-L6-v2
    python examples/python/train.py --steps 100 --refresh-every 25
    torchrun --nproc_per_node 2 examples/python/train.py --steps 100 --refresh-every 25

By default: models/all-MiniLM-L6-v2 on ../shared/datasets/scifact (qrels/train.tsv). Install:
pip install "./client/python[train]"; more in examples/python/README.md.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.training_args import BatchSamplers

import hardneg
from hardneg import training

ROOT = Path(__file__).resolve().parents[2]


def parse_args() -> argparse.Namespace:
    datasets = Path(os.environ.get("HARDNEG_DATASETS", ROOT.parent / "shared/datasets"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="hardneg server")
    p.add_argument("--token", default=os.environ.get("HARDNEG_TOKEN"), help="bearer token, if the server wants one")
    p.add_argument("--model", default=str(ROOT / "models/all-MiniLM-L6-v2"), help="sentence-transformers model (dir or name)")
    p.add_argument("--data", default=str(datasets / "scifact"), help="BEIR dataset dir (qrels/train.tsv, else qrels/test.tsv)")
    p.add_argument("--collection", help="collection to mine from (default: the dataset dir's name + '-train'); "
                   "an existing one must hold as many documents")
    p.add_argument("--max-docs", type=int, help="use only the first N documents (and the pairs whose positive is among them)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the pairs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per batch (per process under torchrun)")
    p.add_argument("--negatives", type=int, default=3, help="mined negatives per pair")
    p.add_argument("--preset", default="denoised", choices=["denoised", "none"], help="mining preset")
    p.add_argument("--refresh-every", type=int, default=50, help="steps between index refreshes (0: never)")
    p.add_argument("--prefetch", type=int, default=2, help="batches mined ahead of the step training (0: mine each batch when collated)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", help="save the fine-tuned model here")
    return p.parse_args()


def load_pairs(data: Path, max_docs: Optional[int]) -> Tuple[Dataset, training.Corpus]:
    """(anchor, positive) pairs, one per judged (query, document) with score > 0, and the
    corpus to mine their negatives from."""
    docs = hardneg.beir.read_corpus(data / "corpus.jsonl")[:max_docs]
    text_of = {d["id"]: f"{d['title']} {d['text']}" if d["title"].strip() else d["text"] for d in docs}
    queries = hardneg.beir.read_queries(data / "queries.jsonl")
    qrels = data / "qrels/train.tsv" if (data / "qrels/train.tsv").exists() else data / "qrels/test.tsv"
    anchors, positives = [], []
    for qid, judged in hardneg.beir.read_qrels(qrels).items():
        for doc_id, score in judged:
            if score > 0 and qid in queries and doc_id in text_of:
                anchors.append(queries[qid])
                positives.append(text_of[doc_id])
    if not anchors:
        raise SystemExit(f"no judged pair in {qrels} has its positive among the documents used")
    pairs = Dataset.from_dict({"anchor": anchors, "positive": positives})
    corpus = training.Corpus(text_of)
    corpus.add(pairs["positive"])  # every positive needs an id to be excluded (here they all have one)
    return pairs, corpus


def main() -> None:
    args = parse_args()
    data = Path(args.data)
    collection = args.collection or f"{data.name}-train"
    pairs, corpus = load_pairs(data, args.max_docs)

    # Under torchrun this sets up torch.distributed: from here on every process takes part.
    train_args = SentenceTransformerTrainingArguments(
        output_dir=args.output or os.path.join(tempfile.gettempdir(), "hardneg-train"),
        max_steps=args.steps or -1,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # an anchor or positive at most once per batch
        learning_rate=args.lr,
        seed=args.seed,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    first = train_args.process_index == 0  # prints once under torchrun
    model = SentenceTransformer(args.model, device=str(train_args.device))
    model.max_seq_length = args.max_seq_length

    miner = hardneg.Miner(args.addr, args.token)
    miner.wait_ready()
    info = training.index_corpus(miner, collection, corpus, model)
    if first:
        print(f"{len(pairs)} pairs; collection {collection}: {info.doc_count} documents, generation {info.generation} (vectors from this model)")

    collator = training.MiningCollator(
        miner, collection, corpus, model,
        num_negatives=args.negatives, preset=args.preset, prefetch=args.prefetch, seed=args.seed,
        positives=training.positives_of(pairs),  # an anchor's other positives are never its negatives
    )
    refresh = training.RefreshCallback(collator, every_n_steps=args.refresh_every) if args.refresh_every else None
    trainer = training.MiningTrainer(
        model=model,
        args=train_args,
        train_dataset=pairs,
        loss=MultipleNegativesRankingLoss(model),
        data_collator=collator,
        callbacks=[refresh] if refresh else [],
    )
    result = trainer.train()

    if first:
        print(f"{result.global_step} steps, mean training loss {result.training_loss:.4f}")
        for step, generation, seconds in refresh.history if refresh else []:
            print(f"refresh after step {step}: generation {generation} ({seconds:.1f} s)")
    s = collator.stats
    rank = f"rank {train_args.process_index}: " if train_args.world_size > 1 else ""
    print(f"{rank}{s['batches']:.0f} batches mined, {s['rows']:.0f} rows, {s['negatives_filled']:.0f} negatives filled at random, "
          f"{s['rows_dropped']:.0f} rows dropped, {s['mine_wait_s']:.1f} s waiting for negatives")
    if args.output:
        trainer.save_model(args.output)
        if first:
            print(f"saved to {args.output}")
    miner.close()


if __name__ == "__main__":
    main()
