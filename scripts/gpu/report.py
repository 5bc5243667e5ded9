#!/usr/bin/env python3
"""Joins the parts of a scripts/gpu-check run into one JSON report with the figures the
GPU goals are judged by: correctness per dtype, bi-encoder tokens/s beside PyTorch on the
same input, cross-encoder pairs/s, Mine latency, and every throughput as a fraction of the
GPU's bf16 dense peak. Usage: report.py WORKDIR OUT.json PEAK_TFLOPS"""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"missing": os.path.basename(path)}
    except json.JSONDecodeError as e:
        return {"unreadable": f"{os.path.basename(path)}: {e}"}


def flops_per_token(config, length):
    """Forward FLOPs per token of a BERT encoder: 2 x the layer weights (QKV, output,
    FFN in and out) plus the attention products (QK^T and PV, 2 x 2 x length x hidden)."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return 2 * n * (4 * h * h + 2 * h * i) + 4 * n * length * h


def main():
    work, out_path, peak_tflops = sys.argv[1], sys.argv[2], float(sys.argv[3])
    peak = peak_tflops * 1e12
    enc = load(os.path.join(work, "encoders.json"))
    torch = load(os.path.join(work, "pytorch.json"))
    meta = load(os.path.join(work, "meta.json"))
    service = load(os.path.join(work, "service.json"))
    config = enc.get("model", {}).get("config")

    def frac(tokens_per_s, length):
        return tokens_per_s * flops_per_token(config, length) / peak if config else None

    torch_fwd = {}
    for d in torch.get("dtypes", []):
        for r in d["forward"]:
            torch_fwd[(d["dtype"], r["batch"], r["length"])] = r["tokens_per_s"]

    bi, ce, correctness = [], [], {}
    for d in enc.get("dtypes", []):
        correctness[d["dtype"]] = d["correctness"]
        for r in d["bi_encoder"]:
            t = torch_fwd.get((d["dtype"], r["batch"], r["length"]))
            bi.append({
                "dtype": d["dtype"], "batch": r["batch"], "length": r["length"],
                "tokens_per_s": round(r["tokens_per_s"]),
                "median_pass_ms": round(r["median_pass_ms"], 3),
                "fraction_of_bf16_peak": frac(r["tokens_per_s"], r["length"]),
                "pytorch_tokens_per_s": round(t) if t else None,
                "ratio_to_pytorch": r["tokens_per_s"] / t if t else None,
            })
        for r in d["cross_encoder"]:
            ce.append({
                "dtype": d["dtype"], "batch": r["batch"], "length": r["length"],
                "pairs_per_s": round(r["pairs_per_s"], 1),
                "median_pass_ms": round(r["median_pass_ms"], 3),
                "fraction_of_bf16_peak": frac(r["tokens_per_s"], r["length"]),
            })

    mine = service.get("mine", {})
    goals = {}
    key = next((b for b in bi if b["dtype"] == "bf16" and b["batch"] == 256 and b["length"] == 128), None)
    if key:
        goals["bf16_b256_l128_fraction_of_peak"] = key["fraction_of_bf16_peak"]
        goals["bf16_b256_l128_at_least_30_percent"] = (key["fraction_of_bf16_peak"] or 0) >= 0.30
    compared = [b for b in bi if b["ratio_to_pytorch"] is not None]
    if compared:
        best = {}
        for b in compared:
            best.setdefault((b["batch"], b["length"]), []).append(b)
        # Ours at its best dtype against PyTorch at its best, per shape.
        goals["bi_encoder_vs_pytorch_best_dtype"] = [
            {"batch": k[0], "length": k[1],
             "ours_tokens_per_s": max(x["tokens_per_s"] for x in v),
             "pytorch_tokens_per_s": max(x["pytorch_tokens_per_s"] for x in v),
             "ratio": max(x["tokens_per_s"] for x in v) / max(x["pytorch_tokens_per_s"] for x in v)}
            for k, v in sorted(best.items())
        ]
        goals["bi_encoder_at_least_pytorch_everywhere"] = all(g["ratio"] >= 1.0 for g in goals["bi_encoder_vs_pytorch_best_dtype"])
    else:
        goals["bi_encoder_vs_pytorch"] = torch.get("skipped") or "no PyTorch figures"
    for name, m in mine.items():
        if isinstance(m, dict) and "p50_ms" in m:
            goals[f"mine_{name}_p50_ms"] = m["p50_ms"]
            goals[f"mine_{name}_p99_ms"] = m["p99_ms"]
            goals[f"mine_{name}_p99_under_100ms"] = m["p99_ms"] < 100
    goals["correctness_pass"] = bool(correctness) and all(c["pass"] for c in correctness.values())

    report = {
        "meta": meta,
        "peak_bf16_tflops": peak_tflops,
        "flops_per_token": {str(l): flops_per_token(config, l) for l in sorted({b["length"] for b in bi + ce})} if config else None,
        "goals": goals,
        "correctness": correctness,
        "bi_encoder": bi,
        "cross_encoder": ce,
        "pytorch": {k: v for k, v in torch.items() if k != "dtypes"} | {
            "encode_end_to_end": [{"dtype": d["dtype"], **d["encode"]} for d in torch.get("dtypes", [])]},
        "service": service,
        "encoders_raw": {k: v for k, v in enc.items() if k != "dtypes"},
    }
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
