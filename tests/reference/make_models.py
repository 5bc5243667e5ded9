#!/usr/bin/env python3
"""Build tiny random sentence-transformers checkpoints and their reference outputs.

The fixtures under ``tests/fixtures/models/`` let the Rust encoder be checked against the real
sentence-transformers 6.2.0 / transformers 5.23.0 (pinned in ``bench/requirements.txt``) without any
download: every checkpoint is built here from a config (seeded random weights), with vocabularies built
deterministically from the small built-in text below, saved with ``SentenceTransformer.save()``, and
loaded back from disk to write ``expected.json``. Reruns produce byte-identical files.

Within a family, files that are byte-identical to the family's base case (``model.safetensors``,
``tokenizer.json``) are relative symlinks to the base case's copy (``--no-symlinks`` writes copies).

Run (from the repository root):

    bench/.venv/bin/python tests/reference/make_models.py          # regenerate everything, then --check
    bench/.venv/bin/python tests/reference/make_models.py --check  # only re-load and compare
    bench/.venv/bin/python tests/reference/make_models.py --only bert-mean-normalize ...

See ``tests/reference/README.md`` for what each case covers and the sentence-transformers facts
behind them.
"""

from __future__ import annotations

import os

# Before importing tokenizers / transformers: no network, no thread pools.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import collections
import hashlib
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors.torch
import tokenizers
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

import sentence_transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

warnings.filterwarnings("ignore")
logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "models"
MINILM = REPO / "models" / "all-MiniLM-L6-v2"
PINNED = {"sentence_transformers": "6.2.0", "transformers": "5.23.0"}
BATCH_SIZE = 32
# Files at least this big that are byte-identical to the family's base case become relative symlinks.
SYMLINK_MIN_BYTES = 2048

# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------

# Tokenizer training text (all tokenizers are trained on this and nothing else).
CORPUS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "A woman is playing the violin.",
    "The girl is carrying a baby.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital of Germany and its largest city.",
    "The river flows through the old town and into the sea.",
    "Dense retrievers learn from queries, positive passages and hard negatives.",
    "Random negatives are too easy; static hard negatives go stale as the model moves.",
    "The hardest candidates are often unlabeled positives, which poison training.",
    "A cross-encoder scores each query and passage pair together.",
    "The index is rebuilt in the background and swapped atomically.",
    "Search the collection, exclude known positives, filter by rank and score, then sample.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Scientists measured the temperature of the ocean every morning for ten years.",
    "The library opens at nine and closes at five on weekdays.",
    "She wrote a long letter to her brother who lives in another country.",
    "Machine learning models need data, compute and careful evaluation.",
    "The train to the airport leaves every twenty minutes from the central station.",
    "He cooked pasta with tomatoes, garlic, olive oil and fresh basil.",
    "Mountains, lakes and forests cover most of the northern region.",
    "The committee will publish its report on the budget next week.",
    "Children played football in the park until it got dark.",
    "Query: which city is the capital of France? Passage: Paris is the capital of France.",
    "Instruct: Given a query, retrieve passages that answer the query.",
    "Numbers like 1, 2, 3, 10, 42 and 2024 appear in many documents.",
]

LONG_IN_VOCAB = (
    "The quick brown fox jumps over the lazy dog near the river bank, and the river flows through the "
    "old town and into the sea. Scientists measured the temperature of the ocean every morning for ten "
    "years, while children played football in the park until it got dark. The library opens at nine and "
    "closes at five on weekdays. Dense retrievers learn from queries, positive passages and hard "
    "negatives; random negatives are too easy, and static hard negatives go stale as the model moves. "
    "The hardest candidates are often unlabeled positives, which poison training. A cross-encoder scores "
    "each query and passage pair together. The index is rebuilt in the background and swapped atomically. "
    "He cooked pasta with tomatoes, garlic, olive oil and fresh basil for the whole family."
)

SHORT_OUT_OF_VOCAB = "  Zürich 東京 🙂 naïve café\tcrème\nbrûlée  Ωmega!  "

# Starts with what the tiny vocabularies lack, so it survives truncation at 16-64 tokens.
LONG_OUT_OF_VOCAB = (
    "東京 と 北京 🙂🚀 Zürich's naïve café served crème brûlée at 23:59 — très magnifique! "
    "Ωmega-3 supercalifragilisticexpialidocious xylophones quizzically vexed jumbo wyverns in Москва and Αθήνα. "
    "Hyperparameter\tsweeps  (with    odd   spacing)\nand\r\nnewlines confuse naive whitespace splitters. "
    "Pneumonoultramicroscopicsilicovolcanoconiosis is a very long word, and so is "
    "Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch in Wales. "
    "The quick brown fox jumps over the lazy dog near the river bank, again and again, "
    "while the committee will publish its report on the budget next week. "
    "Mountains, lakes and forests cover most of the northern region; the train to the airport leaves "
    "every twenty minutes from the central station."
)

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "",
    SHORT_OUT_OF_VOCAB,
    LONG_IN_VOCAB,
    LONG_OUT_OF_VOCAB,
]

# MPNet and XLM-R count positions from the ids (as fairseq did): a "<pad>" the tokenizer finds inside a
# text takes the padding position and shifts the rest.
PAD_TEXTS = TEXTS + ["A man <pad> is eating food."]

MINILM_TEXTS = [
    "A man is eating food.",
    "A man is eating pasta.",
    "A man is riding a horse.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    " ".join([LONG_IN_VOCAB, LONG_OUT_OF_VOCAB, LONG_IN_VOCAB]),  # well over 256 WordPiece tokens
]

QWEN_QUERY_PROMPT = "Instruct: Given a query, retrieve passages\nQuery: "

# Qwen2Tokenizer's pre-tokenizer split (transformers/models/qwen2/tokenization_qwen2.py).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any, indent: int = 2, compact_numbers: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    if compact_numbers:  # one line per innermost list of numbers
        text = re.sub(
            r"\[\s+(-?[0-9][-0-9.eE+]*(?:,\s+-?[0-9][-0-9.eE+]*)*)\s+\]",
            lambda m: "[" + re.sub(r",\s+", ",", m.group(1)) + "]",
            text,
        )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def f32_list(array: np.ndarray) -> list:
    """Nested float lists; 9 significant digits round-trip float32 exactly."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 1:
        return [float(f"{x:.9g}") for x in array.tolist()]
    return [f32_list(row) for row in array]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic re-init with non-trivial norms and biases, so that a swapped gamma/beta, a missing
    bias or a wrong position offset changes the output visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim == 1:
                if name.endswith("bias"):
                    param.copy_(0.05 * noise)
                else:  # LayerNorm / RMSNorm scale
                    param.copy_(1.0 + 0.1 * noise)
            elif "embed" in name:
                param.copy_(0.5 * noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Tokenizers (trained locally; written the way the real models ship them on the Hub)
# --------------------------------------------------------------------------------------------------


def added_tokens_decoder(tok: Tokenizer, specials: list[str], lstrip: tuple[str, ...] = ()) -> dict:
    return {
        str(tok.token_to_id(s)): {
            "content": s,
            "lstrip": s in lstrip,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s in specials
    }


def build_bert_tokenizer(dst: Path, model_max_length: int, tokenizer_class: str = "BertTokenizer") -> int:
    """WordPiece like bert-base-uncased: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. DistilBERT ships the same
    files with tokenizer_class DistilBertTokenizer (whose model_input_names leave out token_type_ids)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = specials + wordpiece_vocab(normalizer, pre_tokenizer, size=240 - len(specials))
    tok = Tokenizer(
        models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=100)
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    write_json(
        dst / "tokenizer_config.json",
        {
            "added_tokens_decoder": added_tokens_decoder(tok, specials),
            "clean_up_tokenization_spaces": True,
            "cls_token": "[CLS]",
            "do_lower_case": True,
            "mask_token": "[MASK]",
            "model_max_length": model_max_length,
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "tokenizer_class": tokenizer_class,
            "unk_token": "[UNK]",
        },
    )
    return tok.get_vocab_size()


def build_mpnet_tokenizer(dst: Path, model_max_length: int) -> int:
    """WordPiece like sentence-transformers/all-mpnet-base-v2 (microsoft/mpnet-base's vocabulary):
    <s>=0 <pad>=1 </s>=2 <unk>=3, then BERT's [PAD] [UNK] [CLS] [SEP] [MASK] and pieces, <mask> last;
    unk_token [UNK]; lowercase; <s> $A </s> (RobertaProcessing); no token_type_ids; MPNetTokenizer."""
    head = ["<s>", "<pad>", "</s>", "<unk>"]
    bert_specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    pieces = wordpiece_vocab(normalizer, pre_tokenizer, size=240 - len(head) - len(bert_specials) - 1)
    vocab = head + bert_specials + pieces + ["<mask>"]
    tok = Tokenizer(
        models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=100)
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = head + ["[UNK]", "<mask>"]
    tok.add_special_tokens(
        [tokenizers.AddedToken(s, special=True, normalized=False, lstrip=(s == "<mask>")) for s in specials]
    )
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), trim_offsets=True, add_prefix_space=False
    )
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    write_json(
        dst / "tokenizer_config.json",
        {
            "added_tokens_decoder": added_tokens_decoder(tok, specials, lstrip=("<mask>",)),
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": True,
            "cls_token": "<s>",
            "do_lower_case": True,
            "eos_token": "</s>",
            "mask_token": "<mask>",
            "model_max_length": model_max_length,
            "pad_token": "<pad>",
            "sep_token": "</s>",
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "tokenizer_class": "MPNetTokenizer",
            "unk_token": "[UNK]",
        },
    )
    return tok.get_vocab_size()


def build_xlmr_tokenizer(dst: Path, model_max_length: int) -> int:
    """Unigram like xlm-roberta-base: <s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask>=last."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    # XLMRobertaTokenizer (transformers 5) hard-codes unk_id=3 and expects <mask> after the pieces.
    vocab = [(t, 0.0) for t in specials] + unigram_vocab(pre_tokenizer, size=225) + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(specials + ["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0 </s>:0",
        pair="<s>:0 $A:0 </s>:0 </s>:0 $B:0 </s>:0",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    write_json(
        dst / "tokenizer_config.json",
        {
            "added_tokens_decoder": added_tokens_decoder(tok, specials + ["<mask>"], lstrip=("<mask>",)),
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": True,
            "cls_token": "<s>",
            "eos_token": "</s>",
            "mask_token": "<mask>",
            "model_max_length": model_max_length,
            "pad_token": "<pad>",
            "sep_token": "</s>",
            "tokenizer_class": "XLMRobertaTokenizer",
            "unk_token": "<unk>",
        },
    )
    return tok.get_vocab_size()


def train_byte_level_bpe(pre_tokenizer, vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained here (tie-break: highest count, then smallest pair), so reruns are identical
    (the `tokenizers` trainers break ties by hash-map order)."""
    byte_chars = bytes_to_unicode()
    vocab = [byte_chars[b] for b in range(256)]
    words = collections.Counter(
        piece for line in CORPUS for piece, _ in pre_tokenizer.pre_tokenize_str(line)
    )
    splits = {w: list(w) for w in words}
    merges = []
    while len(vocab) < vocab_size:
        pairs: collections.Counter = collections.Counter()
        for w, n in words.items():
            parts = splits[w]
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        vocab.append(a + b)
        for w, parts in splits.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what pre_tokenizers.ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def corpus_words(normalizer, pre_tokenizer) -> collections.Counter:
    words: collections.Counter = collections.Counter()
    for line in CORPUS:
        text = normalizer.normalize_str(line) if normalizer is not None else line
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    return words


def by_count(counter: collections.Counter) -> list[str]:
    return [t for t, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


def wordpiece_vocab(normalizer, pre_tokenizer, size: int) -> list[str]:
    """Deterministic WordPiece vocabulary: every character (word-initial and ##), whole words by
    frequency, then frequent word-initial prefixes and ## continuations."""
    words = corpus_words(normalizer, pre_tokenizer)
    chars = sorted({c for w in words for c in w})
    vocab = chars + ["##" + c for c in chars]
    multi = [w for w in by_count(words) if len(w) > 1]
    vocab += multi[:100]
    prefixes: collections.Counter = collections.Counter()
    suffixes: collections.Counter = collections.Counter()
    for w, n in words.items():
        for k in (2, 3, 4):
            if len(w) > k:
                prefixes[w[:k]] += n
                suffixes["##" + w[-k:]] += n
    seen = set(vocab)
    quota = {"suffixes": (size - len(vocab)) // 2}
    for name, pool in (("suffixes", by_count(suffixes)), ("prefixes", by_count(prefixes))):
        limit = len(vocab) + quota[name] if name in quota else size
        for t in pool:
            if len(vocab) >= limit:
                break
            if t not in seen:
                vocab.append(t)
                seen.add(t)
    return vocab[:size]


def unigram_vocab(pre_tokenizer, size: int) -> list[tuple[str, float]]:
    """Deterministic Unigram pieces: every character, frequent whole words (with the ▁ prefix) and
    frequent substrings, scored by log relative frequency (rounded, so the file is stable)."""
    words = corpus_words(None, pre_tokenizer)
    counts: collections.Counter = collections.Counter()
    for w, n in words.items():
        for i in range(len(w)):
            for j in range(i + 1, len(w) + 1):
                counts[w[i:j]] += n
    chars = sorted({c for w in words for c in w})
    pieces = list(chars)
    seen = set(pieces)
    for t in by_count(collections.Counter({w: n for w, n in words.items() if len(w) > 1})) + by_count(counts):
        if len(pieces) >= size:
            break
        if t not in seen and len(t) > 1:
            pieces.append(t)
            seen.add(t)
    total = sum(counts[c] for c in chars)
    return [(p, round(math.log(counts[p] / total), 6)) for p in pieces]


def build_modernbert_tokenizer(dst: Path, model_max_length: int) -> dict[str, int]:
    """Byte-level BPE like answerdotai/ModernBERT-base: specials appended after the BPE vocab,
    [CLS] $A [SEP] template, no token_type_ids, tokenizer_class PreTrainedTokenizerFast."""
    tok = train_byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), 300)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok.add_special_tokens(
        [tokenizers.AddedToken(s, special=True, normalized=False, lstrip=(s == "[MASK]")) for s in specials]
    )
    ids = {s: tok.token_to_id(s) for s in specials}
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    write_json(
        dst / "tokenizer_config.json",
        {
            "added_tokens_decoder": added_tokens_decoder(tok, specials, lstrip=("[MASK]",)),
            "clean_up_tokenization_spaces": True,
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": model_max_length,
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": "[UNK]",
        },
    )
    ids["vocab_size"] = tok.get_vocab_size()
    return ids


def build_qwen_tokenizer(dst: Path, model_max_length: int) -> dict[str, int]:
    """Byte-level BPE like Qwen/Qwen3-Embedding-0.6B: NFC + Qwen split regex + ByteLevel(no regex);
    <|endoftext|> (pad) appended by a TemplateProcessing post-processor in tokenizer.json;
    tokenizer_config.json names <|im_end|> as eos_token, <|endoftext|> as pad_token, padding_side left."""
    tok = train_byte_level_bpe(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        ),
        330,
    )
    tok.normalizer = normalizers.NFC()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A:0 <|endoftext|>:0",
        pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", eot)],
    )
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    write_json(
        dst / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder(tok, specials),
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": "<|endoftext|>",
            "padding_side": "left",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    return {s: tok.token_to_id(s) for s in specials} | {"vocab_size": tok.get_vocab_size()}


def train_sentencepiece_bpe(vocab: list[str], normalize: Callable[[str], str], vocab_size: int) -> tuple[list[str], list]:
    """BPE merges over SentencePiece-style pieces (each word with its leading "▁"), appended to `vocab` after
    every character of the normalized corpus; ties broken as in `train_byte_level_bpe`, so reruns are
    identical."""
    words: collections.Counter = collections.Counter()
    for line in CORPUS:
        text = normalize(line)
        words.update(p for p in re.split(r"(?=▁)", text) if p)
    vocab = list(vocab) + sorted({c for w in words for c in w} - set(vocab))
    splits = {w: list(w) for w in words}
    merges = []
    while len(vocab) < vocab_size:
        pairs: collections.Counter = collections.Counter()
        for w, n in words.items():
            parts = splits[w]
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        if a + b not in vocab:
            vocab.append(a + b)
        for w, parts in splits.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    return vocab, merges


def build_gemma_tokenizer(dst: Path, model_max_length: int) -> dict[str, int]:
    """BPE with byte fallback like google/embeddinggemma-300m (GemmaTokenizer): <pad>=0 <eos>=1 <bos>=2
    <unk>=3 <mask>=4, the byte pieces <0x00>..<0xFF>, then characters and merged pieces; spaces become "▁"
    (normalizer), the pre-tokenizer, decoder and BPE options are those GemmaTokenizer rebuilds; tokenizer.json's
    post-processor wraps each text in <bos> ... <eos>; padding_side left (the class default)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    head = specials + [f"<0x{b:02X}>" for b in range(256)]
    vocab, merges = train_sentencepiece_bpe(head, lambda t: t.replace(" ", "▁"), 420)
    tok = Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(vocab)},
            merges,
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0 <eos>:0",
        pair="<bos>:0 $A:0 <eos>:0 <bos>:1 $B:1 <eos>:1",
        special_tokens=[("<bos>", bos), ("<eos>", eos)],
    )
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    write_json(
        dst / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": True,
            "added_tokens_decoder": added_tokens_decoder(tok, specials),
            "bos_token": "<bos>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "<eos>",
            "mask_token": "<mask>",
            "model_max_length": model_max_length,
            "pad_token": "<pad>",
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "GemmaTokenizer",
            "unk_token": "<unk>",
        },
    )
    return {s: tok.token_to_id(s) for s in specials} | {"vocab_size": tok.get_vocab_size()}


# --------------------------------------------------------------------------------------------------
# Backbones ("hub" directories: config.json + model.safetensors + tokenizer files)
# --------------------------------------------------------------------------------------------------


def save_backbone(model: transformers.PreTrainedModel, dst: Path, seed: int) -> None:
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(str(dst), safe_serialization=True)


def make_bert_hub(dst: Path) -> None:
    vocab_size = build_bert_tokenizer(dst, model_max_length=32)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=48,
        type_vocab_size=2,
        pad_token_id=0,
        layer_norm_eps=1e-12,
    )
    save_backbone(transformers.BertModel(config), dst, seed=101)


def make_xlmr_hub(dst: Path) -> None:
    vocab_size = build_xlmr_tokenizer(dst, model_max_length=32)
    config = transformers.XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=34,  # 32 + padding_idx + 1, as xlm-roberta-base has 514 for 512
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )
    save_backbone(transformers.XLMRobertaModel(config), dst, seed=202)


def make_distilbert_hub(dst: Path) -> None:
    vocab_size = build_bert_tokenizer(dst, model_max_length=40, tokenizer_class="DistilBertTokenizer")
    config = transformers.DistilBertConfig(
        vocab_size=vocab_size,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        activation="gelu",
        max_position_embeddings=48,
        sinusoidal_pos_embds=False,
        pad_token_id=0,
    )
    save_backbone(transformers.DistilBertModel(config), dst, seed=505)


def make_mpnet_hub(dst: Path) -> None:
    vocab_size = build_mpnet_tokenizer(dst, model_max_length=128)
    config = transformers.MPNetConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=130,  # 128 + padding_idx + 1, as all-mpnet-base-v2 has 514 for 512
        relative_attention_num_buckets=32,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    save_backbone(transformers.MPNetModel(config), dst, seed=606)


def make_modernbert_hub(dst: Path) -> None:
    ids = build_modernbert_tokenizer(dst, model_max_length=48)
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
    )
    assert config.layer_types == ["full_attention", "sliding_attention", "full_attention"], config.layer_types
    save_backbone(transformers.ModernBertModel(config), dst, seed=303)


def make_qwen3_hub(dst: Path) -> None:
    ids = build_qwen_tokenizer(dst, model_max_length=64)
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
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        use_sliding_window=False,
    )
    save_backbone(transformers.Qwen3Model(config), dst, seed=404)


def make_qwen2_hub(dst: Path, sliding: bool = False) -> None:
    ids = build_qwen_tokenizer(dst, model_max_length=64)
    config = transformers.Qwen2Config(
        vocab_size=ids["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        use_sliding_window=sliding,
        # Sliding: layer 0 global, layer 1 sees itself and the 7 tokens before it.
        sliding_window=8 if sliding else 131072,
        max_window_layers=1 if sliding else 21,
    )
    expected = ["full_attention", "sliding_attention"] if sliding else ["full_attention", "full_attention"]
    assert config.layer_types == expected, config.layer_types
    save_backbone(transformers.Qwen2Model(config), dst, seed=707 if sliding else 808)


def make_gemma3_hub(dst: Path) -> None:
    ids = build_gemma_tokenizer(dst, model_max_length=64)
    config = transformers.Gemma3TextConfig(
        vocab_size=ids["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # 4 x 16 = 64 query dims on a hidden size of 32, as EmbeddingGemma's 3 x 256 on 768
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=24,  # not head_dim, so a scale of head_dim ** -0.5 shows
        sliding_window=16,  # bidirectional: tokens at most 16 // 2 = 8 apart
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        use_bidirectional_attention=True,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        attention_bias=False,
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["<eos>"],
        bos_token_id=ids["<bos>"],
    )
    assert config.sliding_window == 9, config.sliding_window  # (16 // 2) + 1, exclusive
    save_backbone(transformers.Gemma3TextModel(config), dst, seed=909)


HUBS: dict[str, Callable[[Path], None]] = {
    "bert": make_bert_hub,
    "xlm-roberta": make_xlmr_hub,
    "distilbert": make_distilbert_hub,
    "mpnet": make_mpnet_hub,
    "modernbert": make_modernbert_hub,
    "qwen3": make_qwen3_hub,
    "qwen2": make_qwen2_hub,
    "qwen2-sliding": lambda dst: make_qwen2_hub(dst, sliding=True),
    "gemma3": make_gemma3_hub,
}

# --------------------------------------------------------------------------------------------------
# Post-save edits (files written by hand after SentenceTransformer.save())
# --------------------------------------------------------------------------------------------------


def edit_old_format(max_seq_length: int, modes: tuple[str, ...]) -> Callable[[Path], None]:
    """sentence-transformers <= 5 layout, as all-MiniLM-L6-v2 ships it."""

    def edit(d: Path) -> None:
        modules = read_json(d / "modules.json")
        for m in modules:
            m["type"] = "sentence_transformers.models." + m["type"].rsplit(".", 1)[1]
        write_json(d / "modules.json", modules)
        pooling = read_json(d / "1_Pooling" / "config.json")
        write_json(
            d / "1_Pooling" / "config.json",
            {
                "word_embedding_dimension": pooling["embedding_dimension"],
                "pooling_mode_cls_token": "cls" in modes,
                "pooling_mode_mean_tokens": "mean" in modes,
                "pooling_mode_max_tokens": "max" in modes,
                "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens" in modes,
                "pooling_mode_weightedmean_tokens": "weightedmean" in modes,
                "pooling_mode_lasttoken": "lasttoken" in modes,
                "include_prompt": True,
            },
            indent=4,
        )
        write_json(d / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
        write_json(
            d / "config_sentence_transformers.json",
            {"__version__": {"sentence_transformers": "2.0.0", "transformers": "4.6.1", "pytorch": "1.8.1"}},
        )
        # Old saves have no 2_Normalize/config.json (the folder is empty, so git drops it).
        shutil.rmtree(d / "2_Normalize", ignore_errors=True)

    return edit


def edit_sbert_max_seq_length(value: int) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = read_json(d / "sentence_bert_config.json")
        cfg["max_seq_length"] = value
        cfg["do_lower_case"] = False
        write_json(d / "sentence_bert_config.json", cfg, indent=4)

    return edit


def edit_drop_model_max_length(tokenizer_json_truncation: int | None) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = read_json(d / "tokenizer_config.json")
        cfg.pop("model_max_length", None)
        cfg.pop("max_length", None)
        write_json(d / "tokenizer_config.json", cfg)
        tj = read_json(d / "tokenizer.json")
        tj["truncation"] = (
            None
            if tokenizer_json_truncation is None
            else {"direction": "Right", "max_length": tokenizer_json_truncation, "strategy": "LongestFirst", "stride": 0}
        )
        write_json(d / "tokenizer.json", tj)

    return edit


def edit_bare(then: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """Leave what transformers alone would save: no modules.json and no module folders. The library's
    config_sentence_transformers.json and sentence_bert_config.json stay behind (max_seq_length set to 12),
    to show that without modules.json sentence-transformers reads neither."""
    def edit(d: Path) -> None:
        (d / "modules.json").unlink()
        for sub in d.iterdir():
            if sub.is_dir() and sub.name.split("_", 1)[0].isdigit():
                shutil.rmtree(sub)
        sbert = read_json(d / "sentence_bert_config.json")
        sbert["max_seq_length"] = 12
        write_json(d / "sentence_bert_config.json", sbert)
        if then is not None:
            then(d)
    return edit


def edit_prompts_without_document(d: Path) -> None:
    """config_sentence_transformers.json as an older release wrote it for an E5-style model:
    prompts {"query", "passage"} and no "document" key."""
    cfg = read_json(d / "config_sentence_transformers.json")
    cfg["prompts"] = {"query": "query: ", "passage": "passage: "}
    write_json(d / "config_sentence_transformers.json", cfg)


def edit_modernbert_hub_config(d: Path) -> None:
    """config.json in the transformers 4.x layout the Hub's ModernBERT checkpoints use."""
    c = read_json(d / "config.json")
    old = {
        "architectures": ["ModernBertModel"],
        "attention_bias": c["attention_bias"],
        "attention_dropout": 0.0,
        "bos_token_id": c["bos_token_id"],
        "classifier_activation": "gelu",
        "classifier_bias": False,
        "classifier_dropout": 0.0,
        "classifier_pooling": "mean",
        "cls_token_id": c["cls_token_id"],
        "decoder_bias": True,
        "deterministic_flash_attn": False,
        "embedding_dropout": 0.0,
        "eos_token_id": c["eos_token_id"],
        "global_attn_every_n_layers": 2,
        "global_rope_theta": c["rope_parameters"]["full_attention"]["rope_theta"],
        "gradient_checkpointing": False,
        "hidden_activation": c["hidden_activation"],
        "hidden_size": c["hidden_size"],
        "initializer_cutoff_factor": 2.0,
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "layer_norm_eps": c["norm_eps"],
        "local_attention": c["local_attention"],
        "local_rope_theta": c["rope_parameters"]["sliding_attention"]["rope_theta"],
        "max_position_embeddings": c["max_position_embeddings"],
        "mlp_bias": c["mlp_bias"],
        "mlp_dropout": 0.0,
        "model_type": "modernbert",
        "norm_bias": c["norm_bias"],
        "norm_eps": c["norm_eps"],
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "pad_token_id": c["pad_token_id"],
        "position_embedding_type": "absolute",
        "sep_token_id": c["sep_token_id"],
        "sparse_pred_ignore_index": -100,
        "sparse_prediction": False,
        "torch_dtype": "float32",
        "transformers_version": "4.48.0.dev0",
        "vocab_size": c["vocab_size"],
    }
    write_json(d / "config.json", old)


def edit_qwen3_hub_config(d: Path) -> None:
    """config.json in the transformers 4.x layout of Qwen/Qwen3-Embedding-0.6B (architectures names the
    causal LM, weights carry no "model." prefix)."""
    c = read_json(d / "config.json")
    old = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": c["attention_bias"],
        "attention_dropout": 0.0,
        "bos_token_id": c["bos_token_id"],
        "eos_token_id": c["eos_token_id"],
        "head_dim": c["head_dim"],
        "hidden_act": c["hidden_act"],
        "hidden_size": c["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "max_position_embeddings": c["max_position_embeddings"],
        "max_window_layers": c["num_hidden_layers"],
        "model_type": "qwen3",
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c["num_key_value_heads"],
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": c["rope_parameters"]["rope_theta"],
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.51.3",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": c["vocab_size"],
    }
    write_json(d / "config.json", old)


def edit_qwen2_hub_config(d: Path) -> None:
    """config.json in the transformers 4.x layout of Alibaba-NLP/gte-Qwen2-1.5B-instruct (architectures names the
    causal LM, rope_theta, a sliding_window that use_sliding_window false leaves unused)."""
    c = read_json(d / "config.json")
    old = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": c["bos_token_id"],
        "eos_token_id": c["eos_token_id"],
        "hidden_act": c["hidden_act"],
        "hidden_size": c["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "max_position_embeddings": c["max_position_embeddings"],
        "max_window_layers": 21,
        "model_type": "qwen2",
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c["num_key_value_heads"],
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_theta": c["rope_parameters"]["rope_theta"],
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": c["vocab_size"],
    }
    write_json(d / "config.json", old)


def edit_gemma3_hub_config(d: Path) -> None:
    """config.json in the transformers 4.x layout of google/embeddinggemma-300m (rope_theta and
    rope_local_base_freq instead of rope_parameters, _sliding_window_pattern, the softcapping keys null)."""
    c = read_json(d / "config.json")
    old = {
        "_sliding_window_pattern": 6,
        "architectures": ["Gemma3TextModel"],
        "attention_bias": c["attention_bias"],
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": c["bos_token_id"],
        "dtype": "float32",
        "eos_token_id": c["eos_token_id"],
        "final_logit_softcapping": None,
        "head_dim": c["head_dim"],
        "hidden_activation": c["hidden_activation"],
        "hidden_size": c["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "layer_types": c["layer_types"],
        "max_position_embeddings": c["max_position_embeddings"],
        "model_type": "gemma3_text",
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c["num_key_value_heads"],
        "pad_token_id": c["pad_token_id"],
        "query_pre_attn_scalar": c["query_pre_attn_scalar"],
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_local_base_freq": c["rope_parameters"]["sliding_attention"]["rope_theta"],
        "rope_scaling": None,
        "rope_theta": c["rope_parameters"]["full_attention"]["rope_theta"],
        "sliding_window": c["sliding_window"],
        "transformers_version": "4.57.0.dev0",
        "use_bidirectional_attention": True,
        "use_cache": True,
        "vocab_size": c["vocab_size"],
    }
    write_json(d / "config.json", old)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------

E5_PROMPTS = {"query": "query: ", "document": "passage: "}
GTE_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
# A few of google/embeddinggemma-300m's prompts (config_sentence_transformers.json).
EMBEDDINGGEMMA_PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "Clustering": "task: clustering | query: ",
    "STS": "task: sentence similarity | query: ",
}


def case(name: str, family: str, pooling: str | tuple[str, ...], description: str, **kw) -> dict:
    return {
        "name": name,
        "family": family,
        "pooling": pooling,
        "description": description,
        "normalize": kw.get("normalize", True),
        "dense": kw.get("dense"),
        "prompts": kw.get("prompts"),
        "default_prompt_name": kw.get("default_prompt_name"),
        "include_prompt": kw.get("include_prompt", True),
        "max_seq_length": kw.get("max_seq_length"),
        "similarity_fn_name": kw.get("similarity_fn_name"),
        "edit": kw.get("edit"),
        "edit_note": kw.get("edit_note"),
        "max_seq_length_source": kw.get("max_seq_length_source"),
        "texts": kw.get("texts", TEXTS),
        "padding_side": kw.get("padding_side"),
    }


TC = "tokenizer_config.json model_max_length"

CASES: list[dict] = [
    # ---- bert: every pooling mode, each + Normalize ------------------------------------------------
    case("bert-mean-normalize", "bert", "mean", "BERT, mean pooling, Normalize (family base: owns the weights).",
         max_seq_length_source=TC),
    case("bert-cls-normalize", "bert", "cls", "BERT, cls pooling, Normalize.", max_seq_length_source=TC),
    case("bert-max-normalize", "bert", "max", "BERT, max pooling, Normalize.", max_seq_length_source=TC),
    case("bert-mean_sqrt_len_tokens-normalize", "bert", "mean_sqrt_len_tokens",
         "BERT, mean_sqrt_len_tokens pooling, Normalize.", max_seq_length_source=TC),
    case("bert-weightedmean-normalize", "bert", "weightedmean", "BERT, weightedmean pooling, Normalize.",
         max_seq_length_source=TC),
    case("bert-bare-mean", "bert", "cls",
         "A folder sentence-transformers did not save (no modules.json) of a BertModel: the library builds "
         "Transformer + mean pooling, no Normalize, and reads neither the leftover config_sentence_transformers.json "
         "(E5 prompts) nor sentence_bert_config.json (max_seq_length 12).",
         prompts=E5_PROMPTS, edit=edit_bare(), edit_note="modules.json and the module folders removed; "
         "sentence_bert_config.json max_seq_length 12", max_seq_length_source=TC),
    case("bert-lasttoken-normalize", "bert", "lasttoken",
         "BERT, lasttoken pooling with right padding (last real token is [SEP]), Normalize.",
         max_seq_length_source=TC),
    case("bert-cls-mean-normalize", "bert", ("cls", "mean"),
         "BERT, two pooling modes concatenated in the order listed (pooling_mode is a JSON list), Normalize.",
         max_seq_length_source=TC),
    case("bert-mean", "bert", "mean", "BERT, mean pooling, no Normalize; similarity_fn_name 'dot'.",
         normalize=False, similarity_fn_name="dot", max_seq_length_source=TC),
    case("bert-mean-dense-normalize", "bert", "mean",
         "BERT, mean pooling, Dense 32->24 with Tanh and bias, Normalize.",
         dense={"out_features": 24, "activation": "tanh", "bias": True}, max_seq_length_source=TC),
    case("bert-mean-dense-identity-nobias", "bert", "mean",
         "BERT, mean pooling, Dense 32->16 with Identity activation and no bias, no Normalize.",
         dense={"out_features": 16, "activation": "identity", "bias": False}, normalize=False,
         max_seq_length_source=TC),
    # ---- bert: prompts ------------------------------------------------------------------------------
    case("bert-mean-prompts", "bert", "mean", "BERT, mean, Normalize, prompts query/document.",
         prompts=E5_PROMPTS, max_seq_length_source=TC),
    case("bert-mean-prompts-exclude", "bert", "mean",
         "BERT, mean, Normalize, prompts query/document, include_prompt=false.",
         prompts=E5_PROMPTS, include_prompt=False, max_seq_length_source=TC),
    case("bert-cls-prompts-exclude", "bert", "cls",
         "BERT, cls, Normalize, prompts, include_prompt=false: 'cls' becomes the first non-prompt token.",
         prompts=E5_PROMPTS, include_prompt=False, max_seq_length_source=TC),
    case("bert-weightedmean-prompts-exclude", "bert", "weightedmean",
         "BERT, weightedmean, Normalize, prompts, include_prompt=false: remaining tokens keep their "
         "original position weights.",
         prompts=E5_PROMPTS, include_prompt=False, max_seq_length_source=TC),
    case("bert-mean-default-prompt", "bert", "mean",
         "BERT, mean, Normalize, prompts {'classification'} with default_prompt_name 'classification': "
         "encode() uses it, encode_query/encode_document do not (their '' prompts win).",
         prompts={"classification": "classify: "}, default_prompt_name="classification",
         max_seq_length_source=TC),
    case("bert-mean-prompts-passage", "bert", "mean",
         "BERT, mean, Normalize; config_sentence_transformers.json hand-edited to prompts "
         "{'query','passage'} without 'document' (older E5-style save).",
         prompts=E5_PROMPTS, edit=edit_prompts_without_document,
         edit_note="config_sentence_transformers.json prompts replaced by {'query': 'query: ', 'passage': 'passage: '}",
         max_seq_length_source=TC),
    # ---- bert: max length sources -------------------------------------------------------------------
    case("bert-mean-maxlen16", "bert", "mean",
         "BERT, mean, Normalize, model.max_seq_length = 16 before save (ST 6 stores it as "
         "tokenizer_config.json model_max_length).",
         max_seq_length=16, max_seq_length_source=TC),
    case("bert-maxlen-sbert-config", "bert", "mean",
         "BERT, mean, Normalize; sentence_bert_config.json gets max_seq_length 20 (tokenizer_config says 32).",
         edit=edit_sbert_max_seq_length(20), edit_note="sentence_bert_config.json: added max_seq_length 20, do_lower_case false",
         max_seq_length_source="sentence_bert_config.json max_seq_length"),
    case("bert-maxlen-tokenizer-json", "bert", "mean",
         "BERT, mean, Normalize; no model_max_length in tokenizer_config.json, tokenizer.json truncation "
         "max_length 24, config.json max_position_embeddings 48.",
         edit=edit_drop_model_max_length(24),
         edit_note="tokenizer_config.json: model_max_length removed; tokenizer.json truncation set to 24",
         max_seq_length_source="config.json max_position_embeddings (tokenizer.json truncation is ignored)"),
    case("bert-maxlen-position-embeddings", "bert", "mean",
         "BERT, mean, Normalize; no max length anywhere but config.json max_position_embeddings 48.",
         edit=edit_drop_model_max_length(None),
         edit_note="tokenizer_config.json: model_max_length removed; tokenizer.json truncation null",
         max_seq_length_source="config.json max_position_embeddings"),
    # ---- bert: sentence-transformers <= 5 layout ----------------------------------------------------
    case("bert-old-format", "bert", "mean",
         "BERT, mean, Normalize in the sentence-transformers <= 5 layout: modules.json types "
         "sentence_transformers.models.*, pooling_mode_* booleans, sentence_bert_config.json "
         "{max_seq_length: 40, do_lower_case: false}, no 2_Normalize folder, old config_sentence_transformers.json.",
         edit=edit_old_format(40, ("mean",)), edit_note="old layout written by hand after save",
         max_seq_length_source="sentence_bert_config.json max_seq_length (larger than tokenizer_config's 32; not capped)"),
    case("bert-old-format-max-mean", "bert", ("max", "mean"),
         "BERT in the old layout with pooling_mode_max_tokens and pooling_mode_mean_tokens both true: "
         "[max, mean] concatenated (legacy key order cls, max, mean, mean_sqrt_len, weightedmean, lasttoken).",
         edit=edit_old_format(40, ("max", "mean")), edit_note="old layout written by hand after save",
         max_seq_length_source="sentence_bert_config.json max_seq_length"),
    # ---- xlm-roberta ---------------------------------------------------------------------------------
    case("xlm-roberta-mean-normalize", "xlm-roberta", "mean",
         "XLM-R (pad_token_id 1, positions counted on the ids from padding_idx + 1), Unigram tokenizer, mean, "
         "Normalize.", texts=PAD_TEXTS, max_seq_length_source=TC),
    case("xlm-roberta-cls", "xlm-roberta", "cls", "XLM-R, cls pooling, no Normalize.", normalize=False,
         texts=PAD_TEXTS, max_seq_length_source=TC),
    # ---- distilbert ----------------------------------------------------------------------------------
    case("distilbert-mean", "distilbert", "mean",
         "DistilBERT (no token types, positions from 0), WordPiece, mean, no Normalize, cosine: as "
         "sentence-transformers/msmarco-distilbert-base-v4.",
         normalize=False, max_seq_length_source=TC),
    case("distilbert-cls-normalize", "distilbert", "cls", "DistilBERT, cls pooling, Normalize.",
         max_seq_length_source=TC),
    # ---- mpnet ---------------------------------------------------------------------------------------
    case("mpnet-mean-normalize", "mpnet", "mean",
         "MPNet (relative attention bias in 32 buckets, positions from padding_idx + 1 counted on the ids), "
         "WordPiece with <s> </s>, mean, Normalize, max length 128 (every bucket reached): as "
         "all-mpnet-base-v2. A 10th text has a <pad> inside.",
         texts=PAD_TEXTS, max_seq_length_source=TC),
    case("mpnet-cls", "mpnet", "cls",
         "MPNet, cls pooling, no Normalize, similarity_fn_name 'dot': as multi-qa-mpnet-base-dot-v1.",
         normalize=False, similarity_fn_name="dot", texts=PAD_TEXTS, max_seq_length_source=TC),
    # ---- modernbert ----------------------------------------------------------------------------------
    case("modernbert-mean-normalize", "modernbert", "mean",
         "ModernBERT, 3 layers [global, local(window 8 = +-4), global], mean, Normalize; config.json as "
         "transformers 5 writes it (layer_types, rope_parameters).",
         max_seq_length_source=TC),
    case("modernbert-cls", "modernbert", "cls",
         "ModernBERT, cls, no Normalize; config.json rewritten in the transformers 4 Hub layout "
         "(global_attn_every_n_layers, global_rope_theta, local_rope_theta).",
         normalize=False, edit=edit_modernbert_hub_config, edit_note="config.json rewritten in 4.x layout",
         max_seq_length_source=TC),
    # ---- qwen3 ---------------------------------------------------------------------------------------
    case("qwen3-lasttoken-normalize", "qwen3", "lasttoken",
         "Qwen3 (causal, RoPE, GQA 4q/2kv heads, q/k RMSNorm), byte-level BPE appending <|endoftext|>, "
         "left padding, lasttoken, Normalize, Qwen3-Embedding style query prompt.",
         prompts={"query": QWEN_QUERY_PROMPT, "document": ""}, max_seq_length_source=TC),
    case("qwen3-bare-causallm", "qwen3", "lasttoken",
         "A folder sentence-transformers did not save (no modules.json) whose config.json names "
         "Qwen3ForCausalLM: the library builds Transformer + lasttoken pooling, no Normalize, and reads "
         "neither the leftover config_sentence_transformers.json (a query prompt) nor sentence_bert_config.json "
         "(max_seq_length 12).",
         prompts={"query": QWEN_QUERY_PROMPT, "document": ""}, edit=edit_bare(edit_qwen3_hub_config),
         edit_note="modules.json and the module folders removed; config.json in 4.x layout; "
                   "sentence_bert_config.json max_seq_length 12", max_seq_length_source=TC),
    case("qwen3-lasttoken-hubconfig", "qwen3", "lasttoken",
         "Same as qwen3-lasttoken-normalize but config.json in the transformers 4 layout of "
         "Qwen3-Embedding (architectures Qwen3ForCausalLM, rope_theta, rope_scaling null).",
         prompts={"query": QWEN_QUERY_PROMPT, "document": ""}, edit=edit_qwen3_hub_config,
         edit_note="config.json rewritten in 4.x layout", max_seq_length_source=TC),
    # ---- qwen2 ---------------------------------------------------------------------------------------
    case("qwen2-lasttoken-left", "qwen2", "lasttoken",
         "Qwen2 (causal, RoPE, GQA 4q/2kv heads, q/k/v biases, no head norms), byte-level BPE appending "
         "<|endoftext|>, left padding, lasttoken, Normalize, gte-Qwen2 style query prompt.",
         prompts={"query": GTE_QUERY_PROMPT, "document": ""}, max_seq_length_source=TC),
    case("qwen2-lasttoken-right-hubconfig", "qwen2", "lasttoken",
         "Same body with right padding (lasttoken reads each row's last real token, the appended "
         "<|endoftext|>), config.json in gte-Qwen2's transformers 4 layout (Qwen2ForCausalLM, rope_theta, "
         "sliding_window 131072 unused under use_sliding_window false).",
         prompts={"query": GTE_QUERY_PROMPT, "document": ""}, padding_side="right", edit=edit_qwen2_hub_config,
         edit_note="config.json rewritten in 4.x layout", max_seq_length_source=TC),
    case("qwen2-sliding-lasttoken", "qwen2-sliding", "lasttoken",
         "Qwen2 with use_sliding_window: layer 0 global, layer 1 (>= max_window_layers 1) causal within a "
         "window of 8 (itself and the 7 tokens before), left padding, lasttoken, Normalize.",
         max_seq_length_source=TC),
    # ---- gemma3 --------------------------------------------------------------------------------------
    case("gemma3-mean-dense-normalize", "gemma3", "mean",
         "Gemma3TextModel as EmbeddingGemma: bidirectional, layers [sliding (window 16: +-8), global, sliding], "
         "rope 1e6 global / 1e4 local, q/k norms, query_pre_attn_scalar 24, embeddings x sqrt(32), "
         "GeGLU (gelu_pytorch_tanh); BPE with byte fallback wrapping <bos> ... <eos>, left padding; mean, "
         "Dense 32->64 and 64->32 (Identity, no bias), Normalize; EmbeddingGemma's prompts.",
         dense=[{"out_features": 64, "activation": "identity", "bias": False},
                {"out_features": 32, "activation": "identity", "bias": False}],
         prompts=EMBEDDINGGEMMA_PROMPTS, max_seq_length_source=TC),
    case("gemma3-mean-hubconfig", "gemma3", "mean",
         "Same body, mean + Normalize, no Dense, no prompts; config.json in EmbeddingGemma's transformers 4 layout "
         "(rope_theta, rope_local_base_freq, _sliding_window_pattern, softcapping keys null).",
         edit=edit_gemma3_hub_config, edit_note="config.json rewritten in 4.x layout", max_seq_length_source=TC),
]

FAMILY_BASE = {
    "bert": "bert-mean-normalize",
    "xlm-roberta": "xlm-roberta-mean-normalize",
    "distilbert": "distilbert-mean",
    "mpnet": "mpnet-mean-normalize",
    "modernbert": "modernbert-mean-normalize",
    "qwen3": "qwen3-lasttoken-normalize",
    "qwen2": "qwen2-lasttoken-left",
    "qwen2-sliding": "qwen2-sliding-lasttoken",
    "gemma3": "gemma3-mean-dense-normalize",
}

# --------------------------------------------------------------------------------------------------
# Building and saving
# --------------------------------------------------------------------------------------------------


def build_case(spec: dict, hub: Path) -> SentenceTransformer:
    transformer = Transformer(str(hub))
    dim = transformer.get_embedding_dimension()
    modules: list[torch.nn.Module] = [
        transformer,
        Pooling(dim, pooling_mode=spec["pooling"], include_prompt=spec["include_prompt"]),
    ]
    # One Dense (a dict) or several in order (a list; the first seeded as a single one is).
    denses = spec["dense"] if isinstance(spec["dense"], list) else [spec["dense"]] if spec["dense"] else []
    for i, d in enumerate(denses):
        torch.manual_seed(7 + i)
        act = {"tanh": torch.nn.Tanh(), "identity": torch.nn.Identity()}[d["activation"]]
        in_features = modules[-1].get_embedding_dimension()
        dense = Dense(in_features, d["out_features"], bias=d["bias"], activation_function=act)
        gen = torch.Generator().manual_seed(77 + i)
        with torch.no_grad():
            dense.linear.weight.copy_(torch.randn(dense.linear.weight.shape, generator=gen) / math.sqrt(in_features))
            if d["bias"]:
                dense.linear.bias.copy_(0.1 * torch.randn(dense.linear.bias.shape, generator=gen))
        modules.append(dense)
    if spec["normalize"]:
        modules.append(Normalize())
    model = SentenceTransformer(
        modules=modules,
        device="cpu",
        prompts=spec["prompts"],
        default_prompt_name=spec["default_prompt_name"],
        similarity_fn_name=spec["similarity_fn_name"],
    )
    if spec["max_seq_length"] is not None:
        model.max_seq_length = spec["max_seq_length"]
    if spec["padding_side"] is not None:
        transformer.tokenizer.padding_side = spec["padding_side"]
    return model


def dedupe_with_symlinks(case_dir: Path, base_dir: Path) -> dict[str, str]:
    linked = {}
    for path in sorted(case_dir.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(case_dir)
        other = base_dir / rel
        if other.is_file() and not other.is_symlink() and path.stat().st_size >= SYMLINK_MIN_BYTES:
            if path.read_bytes() == other.read_bytes():
                target = os.path.relpath(other, path.parent)
                path.unlink()
                path.symlink_to(target)
                linked[str(rel)] = target
    return linked


# --------------------------------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------------------------------


def resolve_prompt(model: SentenceTransformer, kind: str) -> tuple[str | None, str | None]:
    """Mirror of SentenceTransformer.encode_query / encode_document / encode prompt selection."""
    prompt_name = None
    if kind == "query":
        if "query" in model.prompts:
            prompt_name = "query"
    elif kind == "document":
        for candidate in ("document", "passage", "corpus"):
            if candidate in model.prompts:
                prompt_name = candidate
                break
    prompt = model._resolve_prompt(None, prompt_name)
    if kind == "encode" and prompt_name is None and model.default_prompt_name is not None:
        prompt_name = model.default_prompt_name
    return prompt_name, prompt


def st_input_ids(model: SentenceTransformer, texts: list[str], prompt: str | None, task: str | None) -> dict:
    kwargs = {"task": task} if task else {}
    feats = model.preprocess(texts, prompt=prompt, **kwargs)
    ids = feats["input_ids"]
    mask = feats["attention_mask"]
    out = {
        "input_ids": [[int(t) for t, m in zip(row, mrow) if int(m) == 1] for row, mrow in zip(ids, mask)],
        "padded_length": int(ids.shape[1]),
    }
    if "prompt_length" in feats:
        out["prompt_length"] = int(feats["prompt_length"])
    return out


def tokenizer_json_ids(model_dir: Path, texts: list[str], max_len: int) -> list[list[int]]:
    """What the plain `tokenizers` library makes of the saved tokenizer.json (truncation at the max
    length ST reports, no padding)."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len, strategy="longest_first", direction="right")
    return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=True)]


def reference_outputs(model_dir: Path, texts: list[str], token_embeddings: bool = False) -> dict:
    """Load ``model_dir`` with SentenceTransformer and record what it does with ``texts``.

    An entry whose prompt equals an earlier entry's prompt gets ``"same_as"`` instead of repeating
    identical input_ids and embeddings (checked here to be bit-identical)."""
    model = SentenceTransformer(str(model_dir), device="cpu")
    tr = model[0]
    out: dict[str, Any] = {
        "model_type": tr.config.model_type,
        "architecture": type(tr.model).__name__,
        "modules": [f"{type(m).__module__}.{type(m).__name__}" for m in model],
        "embedding_dim": model.get_embedding_dimension(),
        "max_seq_length": model.max_seq_length,
        "padding_side": tr.tokenizer.padding_side,
        "tokenizer_class": type(tr.tokenizer).__name__,
        "similarity_fn_name": model.similarity_fn_name,
        "prompts": dict(model.prompts),
        "default_prompt_name": model.default_prompt_name,
    }
    pooling = next(m for m in model if isinstance(m, Pooling))
    out["pooling_mode"] = list(pooling.pooling_mode) if isinstance(pooling.pooling_mode, tuple) else pooling.pooling_mode
    out["include_prompt"] = pooling.include_prompt
    out["batch_size"] = BATCH_SIZE
    out["texts"] = texts
    calls = {
        "encode_document": (model.encode_document, "document", "document"),
        "encode_query": (model.encode_query, "query", "query"),
        "encode": (model.encode, "encode", None),
    }
    tj_ok = True
    full: dict[str, dict] = {}
    for key, (fn, kind, task) in calls.items():
        prompt_name, prompt = resolve_prompt(model, kind)
        emb = fn(texts, batch_size=BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False)
        tok = st_input_ids(model, texts, prompt, task)
        prompted = [(prompt or "") + t for t in texts]
        tj = tokenizer_json_ids(model_dir, prompted, model.max_seq_length)
        tj_ok &= tj == tok["input_ids"]
        entry = {
            "prompt_name": prompt_name,
            "prompt": prompt,
            "prompt_length": tok.get("prompt_length"),
            "padded_length": tok["padded_length"],
            "input_ids": tok["input_ids"],
            "embeddings": f32_list(emb),
        }
        same = next((k for k, v in full.items() if (v["prompt"] or "") == (prompt or "")), None)
        if same is not None:
            assert full[same]["input_ids"] == entry["input_ids"] and full[same]["embeddings"] == entry["embeddings"]
            out[key] = {"prompt_name": prompt_name, "prompt": prompt, "same_as": same}
        else:
            out[key] = entry
        full[key] = entry
    out["tokenizer_json_reproduces_input_ids"] = tj_ok
    if token_embeddings:
        out["token_embeddings_document_text0"] = f32_list(document_token_embeddings(model, texts[0]))
    return out


def document_token_embeddings(model: SentenceTransformer, text: str) -> np.ndarray:
    return model.encode_document(
        [text], output_value="token_embeddings", convert_to_numpy=False, show_progress_bar=False
    )[0].numpy()


def unprompted_token_embeddings(model: SentenceTransformer, text: str) -> np.ndarray:
    return model.encode(
        [text], prompt="", output_value="token_embeddings", convert_to_numpy=False, show_progress_bar=False
    )[0].numpy()


def resolved(expected: dict, key: str) -> dict:
    entry = expected[key]
    return expected[entry["same_as"]] if "same_as" in entry else entry


def compare_embeddings(expected: dict, got: dict) -> float:
    worst = 0.0
    for key in ("encode_query", "encode_document", "encode"):
        if key not in expected:
            continue
        e, g = resolved(expected, key), resolved(got, key)
        a = np.asarray(e["embeddings"], dtype=np.float64)
        b = np.asarray(g["embeddings"], dtype=np.float64)
        assert a.shape == b.shape, (key, a.shape, b.shape)
        assert e["input_ids"] == g["input_ids"], f"{key}: input_ids differ"
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


# --------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 re-saved with sentence-transformers 6
# --------------------------------------------------------------------------------------------------

MINILM_KEEP = [
    "modules.json",
    "1_Pooling/config.json",
    "2_Normalize/config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "tokenizer_config.json",
    "config.json",
    "special_tokens_map.json",
]


def make_minilm(dst: Path) -> dict:
    if not (MINILM / "model.safetensors").is_file():
        print(f"skip minilm-st6-resaved: {MINILM} not found (run the project's model fetch script)")
        return {}
    tmp = Path(tempfile.mkdtemp(prefix="minilm-st6-"))
    try:
        original = SentenceTransformer(str(MINILM), device="cpu")
        original.save(str(tmp))
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        kept = []
        for rel in MINILM_KEEP:
            if (tmp / rel).is_file():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp / rel, dst / rel)
                kept.append(rel)

        # Weights: same names, same values?
        a = safetensors.torch.load_file(str(MINILM / "model.safetensors"))
        b = safetensors.torch.load_file(str(tmp / "model.safetensors"))
        only_orig = sorted(set(a) - set(b))
        only_resaved = sorted(set(b) - set(a))
        common = sorted(set(a) & set(b))
        differing = [k for k in common if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
        with open(MINILM / "model.safetensors", "rb") as f:
            orig_meta = json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__")
        with open(tmp / "model.safetensors", "rb") as f:
            new_meta = json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__")

        # tokenizer.json: original vs re-saved
        tj_a, tj_b = read_json(MINILM / "tokenizer.json"), read_json(tmp / "tokenizer.json")
        tj_fields_differ = sorted(k for k in set(tj_a) | set(tj_b) if tj_a.get(k) != tj_b.get(k))

        # Reference outputs from the re-saved directory
        ref = reference_outputs(tmp, MINILM_TEXTS)
        resaved = SentenceTransformer(str(tmp), device="cpu")
        e = resaved.encode(MINILM_TEXTS[:3], convert_to_numpy=True)
        ref["cosine_checks"] = {
            "A man is eating food. | A man is eating pasta.": float(f"{float(e[0] @ e[1]):.6g}"),
            "A man is eating food. | A man is riding a horse.": float(f"{float(e[0] @ e[2]):.6g}"),
        }
        # Original directory gives the same vectors?
        orig_ref = original.encode_document(MINILM_TEXTS, batch_size=BATCH_SIZE, convert_to_numpy=True)
        ref["original_dir_matches_within_1e-6"] = bool(
            np.abs(orig_ref - np.asarray(resolved(ref, "encode_document")["embeddings"])).max() < 1e-6
        )
        # Rebuild: original model.safetensors + original tokenizer.json + the kept small files.
        rebuilt = Path(tempfile.mkdtemp(prefix="minilm-rebuilt-"))
        try:
            for rel in kept:
                (rebuilt / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(dst / rel, rebuilt / rel)
            shutil.copyfile(MINILM / "model.safetensors", rebuilt / "model.safetensors")
            shutil.copyfile(MINILM / "tokenizer.json", rebuilt / "tokenizer.json")
            rb = reference_outputs(rebuilt, MINILM_TEXTS)
            rebuild_diff = compare_embeddings(ref, rb)
        finally:
            shutil.rmtree(rebuilt, ignore_errors=True)

        # ref's flag was computed on the re-saved tokenizer.json (not kept); the original one is what a
        # rebuilt directory uses (its baked-in truncation 128 / padding Fixed(128) must be ignored).
        ref["tokenizer_json_reproduces_input_ids"] = tokenizer_json_ids(
            MINILM, MINILM_TEXTS, ref["max_seq_length"]
        ) == resolved(ref, "encode_document")["input_ids"]
        expected = {
            "case": "minilm-st6-resaved",
            "description": "all-MiniLM-L6-v2 loaded from models/all-MiniLM-L6-v2 with SentenceTransformer and "
            "saved again with .save(); only the small non-weight files are kept here.",
            "generated_by": "tests/reference/make_models.py",
            "versions": versions(),
            "files_written_by_save": written,
            "files_kept_here": kept,
            "rebuild": "copy models/all-MiniLM-L6-v2/model.safetensors and models/all-MiniLM-L6-v2/tokenizer.json "
            "next to these files; that directory loads and encodes exactly like the re-saved one",
            "rebuild_matches_within_1e-6": rebuild_diff < 1e-6,
            "weights": {
                "same_tensor_names": not only_orig and not only_resaved,
                "identical_values_of_common_tensors": not differing,
                "common_tensor_count": len(common),
                "only_in_original_note": "embeddings.position_ids is the int64 arange buffer that old transformers "
                "saved; transformers 5 treats it as non-persistent, neither loads nor saves it",
                "only_in_original": only_orig,
                "only_in_resaved": only_resaved,
                "differing_tensors": differing,
                "original_metadata": orig_meta,
                "resaved_metadata": new_meta,
                "original_bytes": (MINILM / "model.safetensors").stat().st_size,
                "resaved_bytes": (tmp / "model.safetensors").stat().st_size,
                "original_sha256": sha256(MINILM / "model.safetensors"),
                "resaved_sha256": sha256(tmp / "model.safetensors"),
            },
            "tokenizer_json": {
                "top_level_fields_that_differ": tj_fields_differ,
                "original": {"truncation": tj_a.get("truncation"), "padding": tj_a.get("padding")},
                "resaved": {"truncation": tj_b.get("truncation"), "padding": tj_b.get("padding")},
                "resaved_bytes": (tmp / "tokenizer.json").stat().st_size,
            },
            **ref,
        }
        write_json(dst / "expected.json", expected, compact_numbers=True)
        return expected
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def versions() -> dict:
    return {
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
    }


def generate(only: set[str] | None, link: bool) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hardneg-refmodels-"))
    try:
        hubs = {}
        for family, make in HUBS.items():
            hubs[family] = work / f"hub-{family}"
            make(hubs[family])

        selected = [c for c in CASES if only is None or c["name"] in only]
        # Bases first, so that the others can link to their files.
        selected.sort(key=lambda c: (FAMILY_BASE[c["family"]] != c["name"], CASES.index(c)))
        for spec in selected:
            d = OUT / spec["name"]
            if d.exists():
                shutil.rmtree(d)
            model = build_case(spec, hubs[spec["family"]])
            model.save(str(d), create_model_card=False)
            texts = spec["texts"]
            in_memory = {
                "encode_query": model.encode_query(texts, batch_size=BATCH_SIZE, convert_to_numpy=True),
                "encode_document": model.encode_document(texts, batch_size=BATCH_SIZE, convert_to_numpy=True),
            }
            if spec["edit"]:
                spec["edit"](d)
            linked = {}
            base = FAMILY_BASE[spec["family"]]
            if link and spec["name"] != base and (OUT / base).is_dir():
                linked = dedupe_with_symlinks(d, OUT / base)

            is_base = spec["name"] == base
            ref = reference_outputs(d, texts, token_embeddings=is_base)
            again = reference_outputs(d, texts, token_embeddings=is_base)
            reload_diff = compare_embeddings(ref, again)
            saved_vs_memory = None
            if not spec["edit"] and spec["max_seq_length"] is None:
                saved_vs_memory = max(
                    float(np.abs(in_memory[k] - np.asarray(resolved(ref, k)["embeddings"])).max()) for k in in_memory
                )
            same_body = None
            if not is_base and (OUT / base).is_dir():
                # The transformer body is the base case's: token embeddings must agree (long text too when
                # both truncate at the same length, which exercises ModernBERT's local attention).
                mine = SentenceTransformer(str(d), device="cpu")
                theirs = SentenceTransformer(str(OUT / base), device="cpu")
                probe = TEXTS[:1] + (TEXTS[7:8] if mine.max_seq_length == theirs.max_seq_length else [])
                same_body = max(
                    float(np.abs(unprompted_token_embeddings(mine, t) - unprompted_token_embeddings(theirs, t)).max())
                    for t in probe
                )
            for path in d.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    path.chmod(0o644)
            expected = {
                "case": spec["name"],
                "description": spec["description"],
                "generated_by": "tests/reference/make_models.py",
                "versions": versions(),
                "hand_edited_after_save": spec["edit_note"],
                "max_seq_length_source": spec["max_seq_length_source"],
                "family_base": base,
                "symlinked_files": linked,
                **ref,
                "checks": {
                    "reloading_twice_gives_identical_output": reload_diff == 0.0,
                    "saved_dir_matches_in_memory_model_within_1e-6": None
                    if saved_vs_memory is None
                    else saved_vs_memory < 1e-6,
                    "token_embeddings_match_family_base_within_1e-6": None if same_body is None else same_body < 1e-6,
                },
            }
            write_json(d / "expected.json", expected, compact_numbers=True)
            print(
                f"{spec['name']:40s} max_seq_length={ref['max_seq_length']:<3} dim={ref['embedding_dim']:<3} "
                f"tokenizer.json ids match={ref['tokenizer_json_reproduces_input_ids']} "
                f"reload diff={reload_diff:.2e} saved-vs-memory={saved_vs_memory} body-vs-base={same_body}"
            )
        if only is None or "minilm-st6-resaved" in only:
            m = make_minilm(OUT / "minilm-st6-resaved")
            if m:
                print(
                    f"{'minilm-st6-resaved':40s} max_seq_length={m['max_seq_length']} weights: same names="
                    f"{m['weights']['same_tensor_names']} (only in original: {m['weights']['only_in_original']}), "
                    f"common identical={m['weights']['identical_values_of_common_tensors']} "
                    f"rebuild ok={m['rebuild_matches_within_1e-6']} "
                    f"cos={m['cosine_checks']}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check() -> int:
    """Re-load every fixture with SentenceTransformer and compare with its expected.json."""
    failures = 0
    for d in sorted(p for p in OUT.iterdir() if (p / "expected.json").is_file()):
        expected = read_json(d / "expected.json")
        if d.name == "minilm-st6-resaved":
            if not (MINILM / "model.safetensors").is_file():
                print(f"{d.name:40s} skipped ({MINILM} missing)")
                continue
            rebuilt = Path(tempfile.mkdtemp(prefix="minilm-rebuilt-"))
            try:
                shutil.copytree(d, rebuilt, dirs_exist_ok=True)
                shutil.copyfile(MINILM / "model.safetensors", rebuilt / "model.safetensors")
                shutil.copyfile(MINILM / "tokenizer.json", rebuilt / "tokenizer.json")
                got = reference_outputs(rebuilt, expected["texts"])
            finally:
                shutil.rmtree(rebuilt, ignore_errors=True)
        else:
            got = reference_outputs(d, expected["texts"])
        try:
            diff = compare_embeddings(expected, got)
            ok = diff < 1e-5 and got["max_seq_length"] == expected["max_seq_length"]
        except AssertionError as e:
            diff, ok = float("nan"), False
            print(e)
        failures += not ok
        print(f"{d.name:40s} {'ok' if ok else 'FAIL'} max abs diff {diff:.2e}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only re-load the fixtures and compare")
    parser.add_argument("--only", nargs="*", help="regenerate only these cases")
    parser.add_argument("--no-symlinks", action="store_true", help="write real copies instead of symlinks")
    args = parser.parse_args()
    have = versions()
    for k, v in PINNED.items():
        if have[k] != v:
            print(f"warning: {k} {have[k]} is not the pinned {v} (bench/requirements.txt)", file=sys.stderr)
    if args.check:
        return 1 if check() else 0
    generate(set(args.only) if args.only else None, link=not args.no_symlinks)
    return 1 if check() else 0


if __name__ == "__main__":
    sys.exit(main())
