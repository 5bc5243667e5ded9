#!/usr/bin/env python3
"""Build tiny random cross-encoders and what sentence-transformers' ``CrossEncoder`` makes of them.

The fixtures under ``tests/fixtures/cross_encoders/`` let the Rust cross-encoder (server/src/encode/cross.rs)
be checked against the real sentence-transformers 6.2.0 / transformers 5.23.0 (pinned in
``bench/requirements.txt``) for the families it serves beyond BERT: ModernBERT
(``ModernBertForSequenceClassification``), DeBERTa-v2/v3 (``DebertaV2ForSequenceClassification``) and Qwen3
(``Qwen3ForSequenceClassification``). Each case is a sequence-classification model built here from a config
(seeded random weights) with a tokenizer built deterministically from make_models.py's text, loaded with
``CrossEncoder(hub_dir)``, saved with ``CrossEncoder.save()``, and loaded back from disk to write
``expected.json``: the (query, document) pairs, their token ids as the CrossEncoder tokenizes them, the raw
logits, ``predict()``'s scores (its default activation) and the probability hardneg reports. No network is
needed; reruns give byte-identical files on one machine.

Run (from the repository root):

    bench/.venv/bin/python tests/reference/make_cross_encoders.py          # regenerate everything, then --check
    bench/.venv/bin/python tests/reference/make_cross_encoders.py --check  # only re-load and compare
    bench/.venv/bin/python tests/reference/make_cross_encoders.py --only deberta-v3-rel ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_models as mm  # noqa: E402  (sets the offline environment before transformers loads)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402

from sentence_transformers import CrossEncoder  # noqa: E402

OUT = mm.REPO / "tests" / "fixtures" / "cross_encoders"
BATCH_SIZE = 32

# (query, document) pairs: short ones, empty sides, odd characters, a long document and a long query
# (past every case's max length, so longest-first truncation cuts one side or both), and texts holding
# the special tokens of the tokenizers (kept as real tokens).
PAIRS: list[tuple[str, str]] = [
    ("What is the capital of France?", "Paris is the capital and most populous city of France."),
    ("What is the capital of France?", "Berlin is the capital of Germany and its largest city."),
    ("A man is eating food.", "A man is eating a piece of bread."),
    ("The girl is carrying a baby.", "A monkey is playing drums."),
    ("", "A man is riding a horse."),
    ("A woman is playing the violin.", ""),
    (mm.SHORT_OUT_OF_VOCAB, "Two men pushed carts through the woods."),
    ("Which river flows through the old town?", mm.LONG_IN_VOCAB),
    (mm.LONG_OUT_OF_VOCAB, "The river flows through the old town and into the sea."),
    (mm.LONG_IN_VOCAB, mm.LONG_OUT_OF_VOCAB),
    ("cross-encoder [SEP] scores", "each query and passage pair together [MASK]"),
    ("A man is eating food.", "He cooked pasta <|endoftext|>"),
]


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def build_deberta_tokenizer(dst: Path, model_max_length: int, do_lower_case: bool, split_by_punct: bool) -> dict:
    """Unigram laid out like microsoft/deberta-v3-base's: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, pieces, [MASK] last;
    tokenizer_class DebertaV2Tokenizer. The tokenizer.json's normalizer is what transformers 4's converter wrote
    (minus the precompiled charsmap, which needs sentencepiece): transformers 5 rebuilds the normalizer and
    pre-tokenizer from tokenizer_config.json (do_lower_case, split_by_punct, add_prefix_space) and the pair
    template from cls/sep, keeping only the vocabulary from tokenizer.json."""
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    vocab = [(t, 0.0) for t in specials] + mm.unigram_vocab(metaspace, size=220) + [("[MASK]", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(specials + ["[MASK]"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
    )
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    mm.write_json(
        dst / "tokenizer_config.json",
        {
            "added_tokens_decoder": mm.added_tokens_decoder(tok, specials + ["[MASK]"]),
            "bos_token": "[CLS]",
            "clean_up_tokenization_spaces": False,
            "cls_token": "[CLS]",
            "do_lower_case": do_lower_case,
            "eos_token": "[SEP]",
            "mask_token": "[MASK]",
            "model_max_length": model_max_length,
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "split_by_punct": split_by_punct,
            "tokenizer_class": "DebertaV2Tokenizer",
            "unk_token": "[UNK]",
            "vocab_type": "spm",
        },
    )
    return {"vocab_size": tok.get_vocab_size(), "[PAD]": 0}


def build_qwen_reranker_tokenizer(dst: Path, model_max_length: int, padding_side: str, append_eot: bool) -> dict:
    """make_models.py's Qwen tokenizer; with ``append_eot`` False its tokenizer.json post-processor is a plain
    ByteLevel one (as Qwen3 base / reranker checkpoints ship it: a pair is the two texts back to back)."""
    ids = mm.build_qwen_tokenizer(dst, model_max_length=model_max_length)
    if not append_eot:
        tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        tok.save(str(dst / "tokenizer.json"))
    config = mm.read_json(dst / "tokenizer_config.json")
    config["padding_side"] = padding_side
    mm.write_json(dst / "tokenizer_config.json", config)
    return ids


# --------------------------------------------------------------------------------------------------
# Models ("hub" directories: config.json + model.safetensors + tokenizer files)
# --------------------------------------------------------------------------------------------------


def save_model(model: transformers.PreTrainedModel, dst: Path, seed: int) -> None:
    mm.randomize_(model, seed)
    model.eval()
    model.save_pretrained(str(dst), safe_serialization=True)


def make_modernbert(dst: Path, num_labels: int, pooling: str, activation: str, bias: bool, seed: int) -> None:
    ids = mm.build_modernbert_tokenizer(dst, model_max_length=40)
    config = transformers.ModernBertConfig(
        vocab_size=ids["vocab_size"],
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_activation="gelu",
        max_position_embeddings=64,
        local_attention=8,
        global_attn_every_n_layers=2,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        norm_eps=1e-5,
        norm_bias=False,
        pad_token_id=ids["[PAD]"],
        bos_token_id=ids["[CLS]"],
        cls_token_id=ids["[CLS]"],
        eos_token_id=ids["[SEP]"],
        sep_token_id=ids["[SEP]"],
        num_labels=num_labels,
        classifier_pooling=pooling,
        classifier_activation=activation,
        classifier_bias=bias,
    )
    save_model(transformers.ModernBertForSequenceClassification(config), dst, seed)


def make_deberta(dst: Path, num_labels: int, seed: int, **overrides) -> None:
    tok = overrides.pop("tokenizer", {})
    ids = build_deberta_tokenizer(dst, model_max_length=40, do_lower_case=tok.get("do_lower_case", False), split_by_punct=tok.get("split_by_punct", False))
    settings = dict(
        vocab_size=ids["vocab_size"],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=64,
        layer_norm_eps=1e-7,
        pad_token_id=0,
        num_labels=num_labels,
        pooler_hidden_act="gelu",
    )
    settings.update(overrides)
    config = transformers.DebertaV2Config(**settings)
    save_model(transformers.DebertaV2ForSequenceClassification(config), dst, seed)


def make_qwen3(dst: Path, padding_side: str, append_eot: bool, seed: int) -> None:
    ids = build_qwen_reranker_tokenizer(dst, model_max_length=48, padding_side=padding_side, append_eot=append_eot)
    config = transformers.Qwen3Config(
        vocab_size=ids["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        hidden_act="silu",
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        use_sliding_window=False,
        num_labels=1,
    )
    save_model(transformers.Qwen3ForSequenceClassification(config), dst, seed)


# DeBERTa-v3 (microsoft/deberta-v3-base, mixedbread-ai/mxbai-rerank-*-v1): relative attention with log buckets,
# c2p and p2c through the shared query/key projections, a layer norm on the relative embeddings, no absolute
# positions, no token types. Buckets of 8 over a max length of 40 put most distances in the log range.
DEBERTA_V3 = dict(
    relative_attention=True,
    max_relative_positions=-1,
    position_buckets=8,
    pos_att_type=["p2c", "c2p"],
    share_att_key=True,
    norm_rel_ebd="layer_norm",
    position_biased_input=False,
    type_vocab_size=0,
)

# The other branches: separate positional projections, c2p alone, no buckets (plain distances clamped at
# max_relative_positions), absolute positions added to the input, token types, a lower-casing tokenizer that
# splits punctuation.
DEBERTA_V2_VARIANT = dict(
    relative_attention=True,
    max_relative_positions=16,
    position_buckets=-1,
    pos_att_type="c2p",
    share_att_key=False,
    position_biased_input=True,
    type_vocab_size=2,
    tokenizer={"do_lower_case": True, "split_by_punct": True},
)

CASES: list[dict] = [
    dict(
        name="modernbert-cls",
        family="modernbert",
        description="ModernBertForSequenceClassification, classifier_pooling cls, gelu head, 1 label "
        "(gte-reranker-modernbert-base's layout); [CLS] q [SEP] d [SEP]",
        make=lambda d: make_modernbert(d, num_labels=1, pooling="cls", activation="gelu", bias=False, seed=311),
    ),
    dict(
        name="modernbert-mean-2labels",
        family="modernbert",
        description="ModernBertForSequenceClassification, classifier_pooling mean over the mask, silu head with a "
        "bias, 2 labels (predict() returns both logits; hardneg's probability is softmax label 1)",
        make=lambda d: make_modernbert(d, num_labels=2, pooling="mean", activation="silu", bias=True, seed=312),
    ),
    dict(
        name="deberta-v3-rel",
        family="deberta-v2",
        description="DebertaV2ForSequenceClassification as DeBERTa-v3 / mxbai-rerank-v1: relative attention, "
        "position_buckets 8 (log buckets), c2p+p2c with share_att_key, norm_rel_ebd layer_norm, "
        "position_biased_input false, type_vocab_size 0, ContextPooler gelu, 1 label",
        make=lambda d: make_deberta(d, num_labels=1, seed=321, **DEBERTA_V3),
        # A checkpoint from the Hub keeps the tokenizer files transformers 4 wrote; save() would replace them
        # with transformers 5's rebuild, so they are put back: the CrossEncoder still tokenizes with the rebuild.
        hand_edit=("tokenizer.json", "tokenizer_config.json"),
    ),
    dict(
        name="deberta-v2-c2p-abs",
        family="deberta-v2",
        description="DebertaV2ForSequenceClassification: c2p only with pos_key_proj (share_att_key false), no "
        "buckets (max_relative_positions 16), absolute positions added, token types, lower-casing and "
        "punctuation-splitting tokenizer, 2 labels",
        make=lambda d: make_deberta(d, num_labels=2, seed=322, **DEBERTA_V2_VARIANT),
    ),
    dict(
        name="qwen3-left-eot",
        family="qwen3",
        description="Qwen3ForSequenceClassification, score read at the last token that is not pad_token_id: the "
        "tokenizer appends <|endoftext|> (= pad) after each side and pads on the left, so the score comes from "
        "the token before the last <|endoftext|>",
        make=lambda d: make_qwen3(d, padding_side="left", append_eot=True, seed=331),
    ),
    dict(
        name="qwen3-right-prompt",
        family="qwen3",
        description="Qwen3ForSequenceClassification, right padding, a ByteLevel post-processor (the pair is the "
        "two texts back to back), and a default prompt saved in config_sentence_transformers.json, which "
        "predict() prepends to the query",
        make=lambda d: make_qwen3(d, padding_side="right", append_eot=False, seed=332),
        prompts={"query": mm.QWEN_QUERY_PROMPT},
        default_prompt_name="query",
    ),
]


# --------------------------------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------------------------------


def log_buckets(rel: list[int], bucket_size: int, max_position: int) -> list[int]:
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    return [int(x) for x in make_log_bucket_position(torch.tensor(rel, dtype=torch.long), bucket_size, max_position).tolist()]


def probability(logits: np.ndarray) -> np.ndarray:
    """hardneg's relevance probability: sigmoid of the one logit, else softmax label 1 (float64)."""
    x = logits.astype(np.float64)
    if x.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-x[:, 0]))
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e[:, 1] / e.sum(axis=1)


def reference_outputs(case_dir: Path) -> dict:
    model = CrossEncoder(str(case_dir), device="cpu")
    tr = model[0]
    pairs = [list(p) for p in PAIRS]
    prompt = model._resolve_prompt(None, None)
    feats = model.preprocess(pairs, prompt=prompt)
    ids, mask = feats["input_ids"], feats["attention_mask"]
    rows = [[int(t) for t, m in zip(row, mrow) if int(m) == 1] for row, mrow in zip(ids, mask)]
    types = None
    if "token_type_ids" in feats:
        types = [[int(t) for t, m in zip(row, mrow) if int(m) == 1] for row, mrow in zip(feats["token_type_ids"], mask)]
    logits = model.predict(pairs, batch_size=BATCH_SIZE, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    logits = np.asarray(logits, dtype=np.float32).reshape(len(pairs), -1)
    predicted = np.asarray(model.predict(pairs, batch_size=BATCH_SIZE), dtype=np.float32)
    alone = np.concatenate(
        [np.asarray(model.predict([p], batch_size=1, activation_fn=torch.nn.Identity()), dtype=np.float32).reshape(1, -1) for p in pairs]
    )
    tok = Tokenizer.from_file(str(case_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=model.max_length, strategy="longest_first", direction="right")
    plain = [enc.ids for enc in tok.encode_batch([((prompt or "") + q, d) for q, d in pairs], add_special_tokens=True)]
    config = model.model.config
    return {
        "pairs": pairs,
        "batch_size": BATCH_SIZE,
        "architecture": type(model.model).__name__,
        "model_type": config.model_type,
        "num_labels": model.num_labels,
        "max_length": model.max_length,
        "padding_side": tr.tokenizer.padding_side,
        "pad_token_id": config.pad_token_id,
        "tokenizer_class": type(tr.tokenizer).__name__,
        "modalities": sorted(tr.modality_config),
        "prompts": model.prompts,
        "default_prompt_name": model.default_prompt_name,
        "prompt": prompt,
        "activation_fn": mm.sentence_transformers.util.fullname(model.activation_fn),
        "input_ids": rows,
        "token_type_ids": types,
        "tokenizer_json_reproduces_input_ids": plain == rows,
        "logits": mm.f32_list(logits),
        "predict": mm.f32_list(predicted) if predicted.ndim == 1 else [mm.f32_list(r) for r in predicted],
        "probability": [float(f"{x:.9g}") for x in probability(logits)],
        "checks": {"one_at_a_time_vs_batched_max_abs": float(np.abs(alone - logits).max())},
    }


def generate(only: set[str] | None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hardneg-crossenc-"))
    try:
        for spec in CASES:
            if only is not None and spec["name"] not in only:
                continue
            hub = work / spec["name"]
            spec["make"](hub)
            model = CrossEncoder(str(hub), device="cpu", prompts=spec.get("prompts"), default_prompt_name=spec.get("default_prompt_name"))
            case_dir = OUT / spec["name"]
            if case_dir.exists():
                shutil.rmtree(case_dir)
            model.save(str(case_dir), create_model_card=False)
            expected = {"name": spec["name"], "family": spec["family"], "description": spec["description"], "versions": mm.versions()}
            if spec.get("hand_edit"):
                for name in spec["hand_edit"]:
                    shutil.copyfile(hub / name, case_dir / name)
                expected["hand_edited_after_save"] = f"{', '.join(spec['hand_edit'])} as written before CrossEncoder.save()"
            expected.update(reference_outputs(case_dir))
            if spec["family"] == "deberta-v2":
                cfg = model.model.config
                span = 1024
                rel = list(range(-span, span + 1))
                expected["log_buckets"] = {
                    "relative_positions": [-span, span],
                    "deberta_v3_base": {"position_buckets": 256, "max_relative_positions": 512, "buckets": log_buckets(rel, 256, 512)},
                }
                if getattr(cfg, "position_buckets", -1) > 0:
                    expected["log_buckets"]["this_model"] = {
                        "position_buckets": cfg.position_buckets,
                        "max_relative_positions": cfg.max_relative_positions if cfg.max_relative_positions > 0 else cfg.max_position_embeddings,
                        "buckets": log_buckets(rel, cfg.position_buckets, cfg.max_relative_positions if cfg.max_relative_positions > 0 else cfg.max_position_embeddings),
                    }
            mm.write_json(case_dir / "expected.json", expected, compact_numbers=True)
            print(f"{spec['name']}: {len(PAIRS)} pairs, max length {expected['max_length']}, labels {expected['num_labels']}, "
                  f"tokenizer.json alone reproduces ids: {expected['tokenizer_json_reproduces_input_ids']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check() -> int:
    """Reload every fixture and compare with its expected.json (ids exactly, logits within 1e-6)."""
    problems = 0
    for case_dir in sorted(p for p in OUT.iterdir() if (p / "expected.json").exists()):
        expected = mm.read_json(case_dir / "expected.json")
        got = reference_outputs(case_dir)
        diff = float(np.abs(np.asarray(got["logits"]) - np.asarray(expected["logits"])).max())
        ok = got["input_ids"] == expected["input_ids"] and diff < 1e-6
        problems += not ok
        print(f"{case_dir.name}: {'ok' if ok else 'DIFFERS'} (max |logit difference| {diff:.2e})")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only reload the fixtures and compare")
    parser.add_argument("--only", nargs="+", help="regenerate only these cases")
    args = parser.parse_args()
    if not args.check:
        generate(set(args.only) if args.only else None)
    return check()


if __name__ == "__main__":
    sys.exit(main())
