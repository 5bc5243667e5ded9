#!/usr/bin/env python3
"""Bi-encoders of real architectures' widths for speed runs, with fewer layers: weights drawn by
transformers' own initialization from a fixed seed, the WordPiece tokenizer of a BERT model
directory, saved as sentence-transformers saves them. Random weights cost what trained ones
cost: for speed, not for retrieval quality.

- `modernbert`: ModernBERT-base's width (hidden 768, 12 heads, GeGLU MLP of 1152, sliding
  window 128 with every third layer global, rotary bases 160000 and 10000), mean pooling,
  Normalize.
- `qwen3`: Qwen3-Embedding-0.6B's width (hidden 1024, 16 query heads on 8 key/value heads of
  128, SwiGLU MLP of 3072, head norms, rotary base 1000000), last-token pooling, Normalize.

    bench/.venv/bin/python bench/make_model.py /tmp/modernbert-base-6 --arch modernbert --layers 6
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
    p.add_argument("--arch", choices=["modernbert", "qwen3"], default="modernbert")
    p.add_argument("--layers", type=int, default=6, help="transformer layers (ModernBERT-base has 22, Qwen3-Embedding-0.6B 28)")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2", help="a BERT model directory whose tokenizer to use")
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()

    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.tokenizer))
    if args.arch == "modernbert":
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
        body_class, pooling = transformers.ModernBertModel, "mean"
    else:
        config = transformers.Qwen3Config(
            vocab_size=tokenizer.vocab_size,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=args.layers,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        body_class, pooling = transformers.Qwen3Model, "lasttoken"
    torch.manual_seed(args.seed)
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as body, contextlib.redirect_stderr(io.StringIO()):
        body_class(config).eval().save_pretrained(body, safe_serialization=True)
        tokenizer.save_pretrained(body)
        word = Transformer(body, max_seq_length=args.max_seq_length)
        model = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), pooling), Normalize()], device="cpu")
        shutil.rmtree(args.dst, ignore_errors=True)
        model.save(str(args.dst))
    print(f"wrote {args.dst}: {args.arch}, {args.layers} layers of hidden {config.hidden_size}, {sum(t.numel() for t in model.parameters()) / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
