"""One rank of test_training.py's torchrun test: online mining with a refresh at step 2, in
topic batches, under torch.distributed on CPU. Writes what this rank mined and uploaded to $HARDNEG_OUT/rank<r>.json."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

import hardneg
from hardneg import training


class RecordingMiner(hardneg.Miner):
    """A Miner that remembers the document ids this process uploaded as refresh vectors."""

    uploaded: list = []

    def upload_vectors(self, collection, encoder_name, ids, vectors, **kwargs):  # type: ignore[override]
        self.uploaded.extend(str(i) for i in ids)
        return super().upload_vectors(collection, encoder_name, ids, vectors, **kwargs)


def main() -> None:
    out = Path(os.environ["HARDNEG_OUT"])
    rank = int(os.environ["RANK"])
    pairs = Dataset.from_dict(json.loads((out / "pairs.json").read_text()))
    corpus = training.Corpus(json.loads((out / "corpus.json").read_text()))
    torch.manual_seed(0)
    model = SentenceTransformer(os.environ["HARDNEG_MODEL_DIR"], device="cpu")
    model.max_seq_length = 64
    miner = RecordingMiner(os.environ["HARDNEG_ADDR"], timeout=120.0)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=6,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=1,
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    # The trainer's arguments set up torch.distributed; from here every rank takes part.
    assert args.world_size == 2, args.world_size
    samplers = []
    make = training.topic_batches(model, cluster_size=4)

    def topic_sampler(*a, **kw):
        samplers.append(make(*a, **kw))
        return samplers[-1]

    args.batch_sampler = topic_sampler
    training.index_corpus(miner, "ddp", corpus, model)
    mined = []
    collator = training.MiningCollator(
        miner, "ddp", corpus, model, num_negatives=1, preset="denoised", seed=5, on_batch=mined.append,
    )
    refresh = training.RefreshCallback(collator, every_n_steps=2)
    RecordingMiner.uploaded = []  # index_corpus above made generation 1 by ingest, not upload
    trainer = training.MiningTrainer(
        model=model, args=args, train_dataset=pairs, loss=MultipleNegativesRankingLoss(model),
        data_collator=collator, callbacks=[refresh],
    )
    trainer.train()
    after = [b.response.generation for b in mined if b.request.HasField("min_generation")]
    (out / f"rank{rank}.json").write_text(json.dumps({
        "anchors": [row["anchor"] for b in mined for row in b.rows],
        "uploaded": RecordingMiner.uploaded,
        "history": [[s, g] for s, g, _ in refresh.history],
        "generations_after_refresh": after,
        "final_generation": miner.get("ddp").generation,
        "topics": samplers[0]._topics,
    }))


if __name__ == "__main__":
    main()
