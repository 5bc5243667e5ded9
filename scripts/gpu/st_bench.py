#!/usr/bin/env python3
"""PyTorch + sentence-transformers baseline for scripts/gpu-check.

Times the same model on the same token ids as hardneg-gpu-bench (its --inputs-out file):
the full SentenceTransformer module stack (BERT, pooling, normalization) on fixed-length
rows, per dtype and batch size, output copied back to the host as f32 like ours. Also
times `SentenceTransformer.encode` end to end (its own tokenization and length sorting)
on corpus texts, for reference. Writes one JSON document; when torch or
sentence-transformers cannot be imported it writes why and exits 0.
"""
import argparse
import json
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtypes", default="f32,bf16,f16")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--min-passes", type=int, default=3)
    p.add_argument("--encode-texts", type=int, default=2048)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    try:
        import torch
        import sentence_transformers
        from sentence_transformers import SentenceTransformer
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        json.dump({"skipped": f"torch/sentence-transformers not importable: {type(e).__name__}: {e}",
                   "python": sys.executable}, open(a.out, "w"), indent=2)
        return
    device = "cpu" if a.device == "cpu" else a.device
    if device != "cpu" and not torch.cuda.is_available():
        json.dump({"skipped": "torch.cuda.is_available() is False", "torch": torch.__version__},
                  open(a.out, "w"), indent=2)
        return
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    inputs = json.load(open(a.inputs))
    texts = []
    with open(a.corpus) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                t = (d.get("title", "") + " " + d.get("text", "")).strip()
                if t:
                    texts.append(t)
    texts = (texts * (a.encode_texts // max(len(texts), 1) + 1))[: a.encode_texts]

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    out = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "sentence_transformers": sentence_transformers.__version__,
        "device_name": torch.cuda.get_device_name(device) if device != "cpu" else "cpu",
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "timing": "SentenceTransformer forward (BERT + pooling + normalize) on the same fixed-length token ids, "
                  "output .float().cpu(); two warm-up passes; torch.inference_mode",
        "dtypes": [],
    }
    for name in a.dtypes.split(","):
        model = SentenceTransformer(a.model, device=device)
        model.eval()
        model.to(dtypes[name])
        rows = []
        for length, ids in inputs.items():
            for b in [int(x) for x in a.batches.split(",")]:
                batch = torch.tensor(ids[:b], dtype=torch.long, device=device)
                feats = {"input_ids": batch, "attention_mask": torch.ones_like(batch),
                         "token_type_ids": torch.zeros_like(batch)}
                with torch.inference_mode():
                    for _ in range(2):
                        model(feats)["sentence_embedding"].float().cpu()
                    sync()
                    times = []
                    started = time.perf_counter()
                    while len(times) < a.min_passes or time.perf_counter() - started < a.min_seconds:
                        t = time.perf_counter()
                        model(feats)["sentence_embedding"].float().cpu()
                        times.append(time.perf_counter() - t)
                    elapsed = time.perf_counter() - started
                times.sort()
                n_tokens = batch.numel() * len(times)
                rows.append({"batch": batch.shape[0], "length": int(length), "passes": len(times),
                             "seconds": elapsed, "median_pass_ms": times[len(times) // 2] * 1e3,
                             "tokens_per_s": n_tokens / elapsed})
                print(f"st-bench: {name} b={batch.shape[0]} len={length}: {rows[-1]['tokens_per_s']:.0f} tokens/s",
                      file=sys.stderr)
        # End to end, as a trainer would call it: tokenization, length sorting, its batching.
        model.max_seq_length = max(int(k) for k in inputs)
        encode_batch = max(int(x) for x in a.batches.split(","))
        model.encode(texts[:encode_batch], batch_size=encode_batch)
        sync()
        started = time.perf_counter()
        model.encode(texts, batch_size=encode_batch, convert_to_numpy=True)
        sync()
        elapsed = time.perf_counter() - started
        tok = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
        out["dtypes"].append({
            "dtype": name,
            "forward": rows,
            "encode": {"texts": len(texts), "batch": encode_batch, "max_seq_length": model.max_seq_length,
                       "seconds": elapsed, "texts_per_s": len(texts) / elapsed,
                       "tokens_per_s": sum(len(t) for t in tok) / elapsed},
        })
        del model
        if device != "cpu":
            torch.cuda.empty_cache()
    json.dump(out, open(a.out, "w"), indent=2)


if __name__ == "__main__":
    main()
