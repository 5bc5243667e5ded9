#!/usr/bin/env python3
"""Reference cross-encoder scores for checking the Rust (candle) implementation.

Runs the forward pass of a Hugging Face ``BertForSequenceClassification``
checkpoint (config.json, tokenizer.json, model.safetensors) in plain numpy,
float64, one (query, document) pair at a time with no padding, and prints the
logits, scores (sigmoid for one label, softmax[1] for two) and token counts as
one JSON object on stdout. Dependencies: numpy and tokenizers (the Hugging Face
``tokenizers`` package); safetensors files are parsed by hand.

Usage:
    python3 tests/reference/cross_encoder.py MODEL_DIR PAIRS_JSON MAX_LENGTH

PAIRS_JSON is a JSON list of {"query": str, "document": str} objects. Output:
    {"logits": [[...], ...], "scores": [...], "lengths": [...]}
"""

import json
import math
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer

# ---------------------------------------------------------------------------
# safetensors


class SafeTensors:
    """Lazy reader for a .safetensors file; tensors decode to float64."""

    def __init__(self, path):
        with open(path, "rb") as f:
            data = f.read()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
        header.pop("__metadata__", None)
        self._header = header
        self._data = memoryview(data)[8 + header_len :]

    def __contains__(self, name):
        return name in self._header

    def names(self):
        return list(self._header)

    def get(self, name):
        info = self._header[name]
        dtype, shape = info["dtype"], info["shape"]
        start, end = info["data_offsets"]
        raw = self._data[start:end]
        if dtype == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        elif dtype == "F16":
            arr = np.frombuffer(raw, dtype="<f2")
        elif dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dtype == "F64":
            arr = np.frombuffer(raw, dtype="<f8")
        else:
            raise ValueError(f"tensor {name}: unsupported dtype {dtype}")
        return arr.astype(np.float64).reshape(shape)


class Weights:
    """Resolves HF BERT tensor names, with fallbacks for unprefixed body
    tensors and gamma/beta LayerNorm names."""

    def __init__(self, st):
        self.st = st
        self._cache = {}

    def _candidates(self, name):
        names = [name]
        if name.endswith("LayerNorm.weight"):
            names.append(name[: -len("weight")] + "gamma")
        elif name.endswith("LayerNorm.bias"):
            names.append(name[: -len("bias")] + "beta")
        out = list(names)
        for n in names:
            if n.startswith("bert."):
                out.append(n[len("bert.") :])
        return out

    def get(self, name):
        if name in self._cache:
            return self._cache[name]
        for cand in self._candidates(name):
            if cand in self.st:
                self._cache[name] = self.st.get(cand)
                return self._cache[name]
        raise KeyError(f"tensor not found: {name} (tried {self._candidates(name)})")


# ---------------------------------------------------------------------------
# model

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": lambda x: np.maximum(x, 0.0),
}


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def linear(x, w, prefix):
    return x @ w.get(prefix + ".weight").T + w.get(prefix + ".bias")


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def bert_encode(w, cfg, ids, type_ids):
    """Last hidden states, shape (len, hidden), for one unpadded sequence."""
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = hidden // heads
    eps = cfg.get("layer_norm_eps", 1e-12)
    act_name = cfg.get("hidden_act", "gelu")
    if act_name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act_name!r}")
    act = ACTIVATIONS[act_name]
    pos_type = cfg.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ValueError(f"unsupported position_embedding_type {pos_type!r}")

    ids = np.asarray(ids, dtype=np.int64)
    type_ids = np.asarray(type_ids, dtype=np.int64)
    n = len(ids)
    if n > cfg["max_position_embeddings"]:
        raise ValueError(f"sequence of {n} tokens exceeds max_position_embeddings")

    x = (
        w.get("bert.embeddings.word_embeddings.weight")[ids]
        + w.get("bert.embeddings.position_embeddings.weight")[np.arange(n)]
        + w.get("bert.embeddings.token_type_embeddings.weight")[type_ids]
    )
    x = layer_norm(
        x,
        w.get("bert.embeddings.LayerNorm.weight"),
        w.get("bert.embeddings.LayerNorm.bias"),
        eps,
    )

    scale = 1.0 / math.sqrt(head_dim)
    for i in range(cfg["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}"

        def split(t):  # (n, hidden) -> (heads, n, head_dim)
            return t.reshape(n, heads, head_dim).transpose(1, 0, 2)

        q = split(linear(x, w, p + ".attention.self.query"))
        k = split(linear(x, w, p + ".attention.self.key"))
        v = split(linear(x, w, p + ".attention.self.value"))
        probs = softmax((q @ k.transpose(0, 2, 1)) * scale, axis=-1)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
        attn = linear(ctx, w, p + ".attention.output.dense")
        x = layer_norm(
            attn + x,
            w.get(p + ".attention.output.LayerNorm.weight"),
            w.get(p + ".attention.output.LayerNorm.bias"),
            eps,
        )
        inter = act(linear(x, w, p + ".intermediate.dense"))
        out = linear(inter, w, p + ".output.dense")
        x = layer_norm(
            out + x,
            w.get(p + ".output.LayerNorm.weight"),
            w.get(p + ".output.LayerNorm.bias"),
            eps,
        )
    return x


def classify(w, cfg, ids, type_ids):
    """Logits, shape (num_labels,), for one unpadded sequence."""
    hs = bert_encode(w, cfg, ids, type_ids)
    pooled = np.tanh(linear(hs[0], w, "bert.pooler.dense"))
    return pooled @ w.get("classifier.weight").T + w.get("classifier.bias")


def num_labels(cfg, w):
    if "id2label" in cfg:
        return len(cfg["id2label"])
    if "num_labels" in cfg:
        return int(cfg["num_labels"])
    return int(w.get("classifier.weight").shape[0])


def score(logits):
    if len(logits) == 1:
        return float(1.0 / (1.0 + math.exp(-logits[0])))
    if len(logits) == 2:
        return float(softmax(logits)[1])
    raise ValueError(f"cannot score {len(logits)} labels (expected 1 or 2)")


# ---------------------------------------------------------------------------
# CLI


def load_model(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    w = Weights(SafeTensors(os.path.join(model_dir, "model.safetensors")))
    return cfg, w


def load_tokenizer(model_dir, max_length):
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    return tok


def main(argv):
    if len(argv) != 4:
        sys.stderr.write(__doc__)
        return 2
    model_dir, pairs_path, max_length = argv[1], argv[2], int(argv[3])
    cfg, w = load_model(model_dir)
    labels = num_labels(cfg, w)
    if w.get("classifier.weight").shape[0] != labels:
        raise ValueError(
            f"config gives {labels} labels but classifier has "
            f"{w.get('classifier.weight').shape[0]} rows"
        )
    tok = load_tokenizer(model_dir, max_length)
    with open(pairs_path) as f:
        pairs = json.load(f)

    all_logits, scores, lengths = [], [], []
    for pair in pairs:
        enc = tok.encode(pair["query"], pair["document"])
        logits = classify(w, cfg, enc.ids, enc.type_ids)
        all_logits.append([float(v) for v in logits])
        scores.append(score(logits))
        lengths.append(len(enc.ids))

    json.dump({"logits": all_logits, "scores": scores, "lengths": lengths}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
