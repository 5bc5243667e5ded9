#!/usr/bin/env python3
"""A ModernBERT bi-encoder for speed runs: ModernBERT-base's width (hidden 768, 12 heads,
GeGLU MLP of 1152, sliding window 128 with every third layer global, rotary bases 160000 and
10000) with fewer layers, weights drawn by transformers' own initialization from a fixed seed,
the WordPiece tokenizer of a BERT model directory, mean pooling and Normalize, saved as
sentence-transformers saves it. Random weights cost what trained ones cost: for speed, not for
retrieval quality.

    bench/.venv/bin/python bench/make_modernbert.py /tmp/modernbert-base-6 --layers 6
    python3 bench/compare_st.py --model /tmp/modernbert-base-6 \\
        --cross-encoder-body models/all-MiniLM-L6-v2 ../shared/datasets/cranfield
"""
import argparse
import contextlib
import io
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dst", type=Path, help="directory to write the model to")
    p.add_argument("--layers", type=int, default=6, help="transformer layers (ModernBERT-base has 22)")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2", help="a BERT model directory whose tokenizer to use")
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()

    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.tokenizer))
    config = transformers.ModernBertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=768,
        intermediate_size=1152,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        hidden_activation="gelu",
        max_position_embeddings=8192,
        local_attention=128,
        global_attn_every_n_layers=3,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        cls_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(args.seed)
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as body, contextlib.redirect_stderr(io.StringIO()):
        transformers.ModernBertModel(config).eval().save_pretrained(body, safe_serialization=True)
        tokenizer.save_pretrained(body)
        word = Transformer(body, max_seq_length=args.max_seq_length)
        model = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean"), Normalize()], device="cpu")
        shutil.rmtree(args.dst, ignore_errors=True)
        model.save(str(args.dst))
    print(f"wrote {args.dst}: ModernBERT, {args.layers} layers of hidden 768, {sum(t.numel() for t in model.parameters()) / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
