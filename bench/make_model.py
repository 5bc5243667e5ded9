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
- `distilbert`: msmarco-distilbert-base-v4's width (dim 768, 12 heads, MLP of 3072, 6 layers
  by default as it has), mean pooling, no Normalize; the tokenizer as a `DistilBertTokenizer`.
- `mpnet`: all-mpnet-base-v2's width (hidden 768, 12 heads, MLP of 3072, 32 relative-position
  buckets, 514 positions), mean pooling, Normalize; the tokenizer rebuilt as an
  `MPNetTokenizer` over the same WordPiece vocabulary laid out as microsoft/mpnet-base's
  (`<s> <pad> </s> <unk>`, the BERT vocabulary, `<mask>`: 30527 tokens for BERT's 30522).
- `qwen2`: gte-Qwen2-1.5B-instruct's width (hidden 1536, 12 query heads on 2 key/value heads of
  128, q/k/v biases, SwiGLU MLP of 8960, rotary base 1000000, 131072 positions, no sliding
  window), last-token pooling, Normalize.
- `gemma3`: EmbeddingGemma-300m's width (hidden 768, 3 query heads on 1 key/value head of 256,
  GeGLU (tanh) MLP of 1152, bidirectional, sliding window 512 (+-256) with every sixth layer
  global, rotary bases 1000000 / 10000, `query_pre_attn_scalar` 256, 2048 positions), mean
  pooling, Dense 768 -> 3072 -> 768 (Identity, no bias), Normalize.

- `deberta-v2`: DeBERTa-v3-base's width (hidden 768, 12 heads, MLP of 3072, disentangled
  c2p/p2c attention over 256 log-bucketed relative positions with shared keys and a normed
  relative embedding, no absolute positions), as mixedbread-ai/mxbai-rerank-base-v1 has it; a
  cross-encoder only (`--sequence-classification`), with the Unigram tokenizer of
  tests/fixtures/cross_encoders/deberta-v3-rel (a DeBERTa checkpoint needs a
  `DebertaV2Tokenizer`).

The tokenizer is the BERT model's WordPiece for every other architecture (its vocabulary sizes
the embeddings): it decides the token counts, not the cost per token.

`--sequence-classification` saves a one-label `*ForSequenceClassification` checkpoint
(transformers' layout, no sentence-transformers files) instead of a bi-encoder: a cross-encoder
of that body for `compare_st.py --cross-encoder-body` (modernbert, qwen3, deberta-v2).

    bench/.venv/bin/python bench/make_model.py /tmp/modernbert-base-6 --arch modernbert --layers 6
    python3 bench/compare_st.py --model /tmp/modernbert-base-6 \\
        --cross-encoder-body models/all-MiniLM-L6-v2 ../shared/datasets/cranfield
    bench/.venv/bin/python bench/make_model.py /tmp/deberta-ce --arch deberta-v2 --sequence-classification
    python3 bench/compare_st.py --model models/all-MiniLM-L6-v2 --cross-encoder-body /tmp/deberta-ce \\
        ../shared/datasets/cranfield
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
    p.add_argument("--arch", choices=["modernbert", "qwen3", "distilbert", "mpnet", "qwen2", "gemma3", "deberta-v2"], default="modernbert")
    p.add_argument("--sequence-classification", action="store_true", help="save a one-label cross-encoder of the body instead of a bi-encoder")
    p.add_argument(
        "--layers",
        type=int,
        default=6,
        help="transformer layers (ModernBERT-base has 22, Qwen3-Embedding-0.6B 28, msmarco-distilbert-base-v4 6, "
        "all-mpnet-base-v2 12, gte-Qwen2-1.5B-instruct 28, EmbeddingGemma-300m 24)",
    )
    p.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2", help="a BERT model directory whose tokenizer to use")
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()

    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    if args.arch == "deberta-v2":
        args.tokenizer = ROOT / "tests" / "fixtures" / "cross_encoders" / "deberta-v3-rel"
        if not args.sequence_classification:
            p.error("--arch deberta-v2 makes a cross-encoder: add --sequence-classification")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.tokenizer))
    normalize = True
    dense: list[int] = []  # Dense output widths after pooling (Identity, no bias)
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
    elif args.arch == "qwen3":
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
    elif args.arch == "distilbert":
        tokenizer = transformers.DistilBertTokenizer.from_pretrained(str(args.tokenizer))
        config = transformers.DistilBertConfig(
            vocab_size=tokenizer.vocab_size,
            dim=768,
            n_layers=args.layers,
            n_heads=12,
            hidden_dim=3072,
            activation="gelu",
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        body_class, pooling, normalize = transformers.DistilBertModel, "mean", False
    elif args.arch == "mpnet":
        words = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
        vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + words + ["<mask>"])}
        tokenizer = transformers.MPNetTokenizer(vocab=vocab, do_lower_case=True)
        config = transformers.MPNetConfig(
            vocab_size=len(vocab),
            hidden_size=768,
            num_hidden_layers=args.layers,
            num_attention_heads=12,
            intermediate_size=3072,
            hidden_act="gelu",
            max_position_embeddings=514,
            relative_attention_num_buckets=32,
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        body_class, pooling = transformers.MPNetModel, "mean"
    elif args.arch == "qwen2":
        config = transformers.Qwen2Config(
            vocab_size=tokenizer.vocab_size,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=args.layers,
            num_attention_heads=12,
            num_key_value_heads=2,
            hidden_act="silu",
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            use_sliding_window=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        body_class, pooling = transformers.Qwen2Model, "lasttoken"
    elif args.arch == "deberta-v2":
        config = transformers.DebertaV2Config(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=args.layers,
            num_attention_heads=12,
            hidden_act="gelu",
            max_position_embeddings=512,
            relative_attention=True,
            position_buckets=256,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_biased_input=False,
            type_vocab_size=0,
            pad_token_id=tokenizer.pad_token_id,
        )
        body_class, pooling = transformers.DebertaV2Model, "mean"
    else:
        config = transformers.Gemma3TextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=768,
            intermediate_size=1152,
            num_hidden_layers=args.layers,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=256,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            query_pre_attn_scalar=256,
            sliding_window=512,
            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(args.layers)],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            use_bidirectional_attention=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        body_class, pooling, dense = transformers.Gemma3TextModel, "mean", [3072, 768]
    torch.manual_seed(args.seed)
    transformers.logging.disable_progress_bar()
    if args.sequence_classification:
        config.num_labels = 1
        model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
        shutil.rmtree(args.dst, ignore_errors=True)
        model.save_pretrained(str(args.dst), safe_serialization=True)
        tokenizer.save_pretrained(str(args.dst))
        print(f"wrote {args.dst}: {type(model).__name__}, {args.layers} layers of hidden {config.hidden_size}, {sum(t.numel() for t in model.parameters()) / 1e6:.0f}M parameters")
        return
    with tempfile.TemporaryDirectory() as body, contextlib.redirect_stderr(io.StringIO()):
        body_class(config).eval().save_pretrained(body, safe_serialization=True)
        tokenizer.save_pretrained(body)
        word = Transformer(body, max_seq_length=args.max_seq_length)
        modules = [word, Pooling(word.get_embedding_dimension(), pooling)]
        for width in dense:
            modules.append(Dense(modules[-1].get_embedding_dimension(), width, bias=False, activation_function=torch.nn.Identity()))
        modules += [Normalize()] if normalize else []
        model = SentenceTransformer(modules=modules, device="cpu")
        shutil.rmtree(args.dst, ignore_errors=True)
        model.save(str(args.dst))
    print(f"wrote {args.dst}: {args.arch}, {args.layers} layers of hidden {config.hidden_size}, {sum(t.numel() for t in model.parameters()) / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
