#!/usr/bin/env python3
"""sentence-transformers `mine_hard_negatives` and hardneg, side by side, on one BEIR collection.

Both sides use the same model directory, the same documents (title + " " + text, empty documents
skipped, as `hardneg ingest` does), the same queries and positives (those of `hardneg eval`: every
query with a judged-relevant document; its positive is its highest-scored judged document, ties
broken by file order), the same maximum sequence length and the same encoding batch size, and the
same mining settings: 5 negatives, rank window [0, 30), top sampling, with and without
relative_margin 0.05. Every negative list, from either tool, is scored with the `hardneg eval`
protocol: a leak is a returned negative that is one of the query's other judged-relevant documents.

The first thing the script does is make sure its virtual environment exists (default bench/.venv,
or $HARDNEG_BENCH_VENV) with the pinned packages of bench/requirements.txt; it then runs itself
inside it. `--setup-only` stops after that step.

    python3 bench/compare_st.py --setup-only
    python3 bench/compare_st.py --server target/release/hardneg-server \\
        ../shared/datasets/cranfield ../shared/datasets/cisi

Then the models' speed side by side, in the same run: sentence-transformers' `encode` on the
corpus and on the queries (32 per call) against hardneg's ingest and `Mine`'s `encode_seconds`,
and sentence-transformers' `CrossEncoder` against hardneg's reranker on the same (query,
document) pairs (the model's body under a one-label head drawn from a fixed seed), with the
processor's `lscpu` name and vector flags and the CPU kernels the server logged. MKL's runtime
library, where scripts/fetch-mkl put it (lib/mkl), goes on the server's loader path, as
scripts/run and the Docker image have it, so that the server races it against OpenBLAS.

Prints a table per collection and writes all numbers as JSON (--json).
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "bench" / "requirements.txt"
VENV = Path(os.environ.get("HARDNEG_BENCH_VENV", ROOT / "bench" / ".venv")).resolve()
VENV_PYTHON = VENV / "bin" / "python"
DATASETS = Path(os.environ.get("HARDNEG_DATASETS", ROOT.parent / "shared" / "datasets"))
CLIENT = ROOT / "client" / "python"
PROTO = ROOT / "proto" / "hardneg" / "v1" / "hardneg.proto"

NUM_NEGATIVES = 5
RANGE_MIN = 0
RANGE_MAX = 30
RELATIVE_MARGIN = 0.05


def ensure_venv() -> None:
    """Creates the venv and installs the pinned requirements unless they are already there."""
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    marker = VENV / ".requirements.sha256"
    if marker.exists() and marker.read_text().strip() == wanted and VENV_PYTHON.exists():
        return
    print(f"setting up {VENV} from {REQUIREMENTS.relative_to(ROOT)} (torch pulls CUDA wheels: a few minutes)", flush=True)
    if not VENV_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)], check=True)
    marker.write_text(wanted + "\n")


def client_fingerprint() -> str:
    """Hash of what the installed client is built from: its sources and the proto."""
    h = hashlib.sha256()
    files = [CLIENT / "setup.py", CLIENT / "pyproject.toml", PROTO]
    files += sorted(p for p in (CLIENT / "src").rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def ensure_client() -> None:
    """Installs the hardneg client from this checkout into the venv unless the same sources are
    there already (its runtime dependencies are pinned in bench/requirements.txt)."""
    wanted = client_fingerprint()
    marker = VENV / ".hardneg-client.sha256"
    if marker.exists() and marker.read_text().strip() == wanted:
        return
    print(f"installing the hardneg client from {CLIENT.relative_to(ROOT)} into {VENV}", flush=True)
    subprocess.run(
        [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(CLIENT)],
        check=True,
    )
    marker.write_text(wanted + "\n")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", type=Path, help="BEIR collection folders (default: $HARDNEG_DATASETS/cranfield)")
    p.add_argument("--server", type=Path, help="hardneg-server binary (default: target/release, else target/debug)")
    p.add_argument("--cli", type=Path, help="hardneg CLI binary (default: the one beside --server)")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2", help="HF-style model directory")
    p.add_argument("--cross-encoder-body", type=Path, help="BERT-family model directory under the cross-encoder's seeded head (default: --model)")
    p.add_argument("--max-seq-length", type=int, default=256, help="truncation length on both sides")
    p.add_argument("--batch-size", type=int, default=32, help="texts per encoder batch on both sides")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "compare_st.json", help="where to write the numbers")
    p.add_argument("--setup-only", action="store_true", help="create the venv and exit")
    return p.parse_args()


# ---------------------------------------------------------------- the collection, as hardneg eval sees it


def read_jsonl(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_collection(folder: Path) -> dict:
    """Documents as `hardneg ingest` sends them, queries and positives as `hardneg eval` picks them."""
    docs = []
    for d in read_jsonl(folder / "corpus.jsonl"):
        title, text = d.get("title", "") or "", d.get("text", "") or ""
        if not title.strip() and not text.strip():
            continue  # `hardneg ingest` skips these
        # The server's encoded text: trimmed title, a space, the text as given.
        docs.append((d["_id"], f"{title.strip()} {text}" if title.strip() else text))
    judgments: dict[str, list[tuple[str, float]]] = {}
    with open(folder / "qrels" / "test.tsv", encoding="utf-8") as f:
        for n, line in enumerate(f):
            fields = [x.strip() for x in line.rstrip("\n").split("\t")]
            if not line.strip() or (n == 0 and fields[0] == "query-id"):
                continue
            q, doc, score = fields
            judgments.setdefault(q, []).append((doc, float(score)))
    queries = []
    for q in read_jsonl(folder / "queries.jsonl"):
        best = None
        for doc, score in judgments.get(q["_id"], []):
            if score > 0 and (best is None or score > best[1]):
                best = (doc, score)
        if best is None:
            continue  # no judged-relevant document: eval skips the query
        relevant = {doc for doc, score in judgments[q["_id"]] if score > 0}
        queries.append({"id": q["_id"], "text": q["text"], "positive": best[0], "hidden": relevant - {best[0]}})
    text_of = dict(docs)
    missing = [q["id"] for q in queries if q["positive"] not in text_of]
    if missing:
        sys.exit(f"{folder}: the positives of queries {missing} are not in the collection")
    return {"name": folder.name, "folder": folder, "docs": docs, "text_of": text_of, "queries": queries}


def score_negatives(queries: list, mined: dict, num_negatives: int) -> dict:
    """The `hardneg eval` numbers for `mined`: query id -> (positive score, [(doc ids, score)]).

    A negative is a set of document ids because sentence-transformers returns texts, and a text
    may belong to several documents; it leaks when any of them is a hidden relevant document."""
    returned = leaked = with_leak = full = ratio_n = 0
    ratio_sum = score_sum = 0.0
    for q in queries:
        positive_score, negatives = mined.get(q["id"], (None, []))
        leaks = sum(1 for ids, _ in negatives if ids & q["hidden"])
        returned += len(negatives)
        leaked += leaks
        with_leak += leaks > 0
        full += len(negatives) >= num_negatives
        for _, score in negatives:
            score_sum += score
            if positive_score is not None and positive_score > 0:
                ratio_sum += score / positive_score
                ratio_n += 1
    return {
        "queries": len(queries),
        "negatives": returned,
        "leak_rate": leaked / returned if returned else 0.0,
        "queries_with_leak": with_leak,
        "yield": full / max(len(queries), 1),
        "mean_neg_score": score_sum / returned if returned else 0.0,
        "mean_neg_over_pos": ratio_sum / ratio_n if ratio_n else 0.0,
    }


def agreement(a: dict, b: dict) -> float:
    """Share of the negatives in `a` that `b` also returned for the same query."""
    shared = total = 0
    for qid, (_, negs) in a.items():
        other = set().union(*(ids for ids, _ in b.get(qid, (None, []))[1]))
        total += len(negs)
        shared += sum(1 for ids, _ in negs if ids & other)
    return shared / total if total else 0.0


def positive_score_difference(st: dict, hn: dict) -> dict:
    """How far the two encoders' query-positive cosine similarities are apart, over the queries
    both report one for: the check that both sides embed the same texts the same way."""
    a, b = st["runs"]["plain"]["mined"], hn["runs"]["plain"]["mined"]
    diffs = [abs(a[q][0] - b[q][0]) for q in a if q in b and b[q][0] is not None]
    return {"queries": len(diffs), "max": max(diffs, default=0.0), "mean": sum(diffs) / max(len(diffs), 1)}


# ---------------------------------------------------------------- sentence-transformers


def run_sentence_transformers(col: dict, args: argparse.Namespace) -> dict:
    t = Timer(time.process_time)
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    imports = t.lap()
    with contextlib.redirect_stderr(io.StringIO()):  # a weight-loading progress bar
        model = SentenceTransformer(str(args.model), device="cpu")
    model.max_seq_length = args.max_seq_length
    model_load = t.lap()
    # Tokens the encoder sees (special tokens included, truncated as both sides truncate).
    count = lambda texts: sum(len(x) for x in model.tokenizer(texts, truncation=True, max_length=args.max_seq_length)["input_ids"])
    tokens = {"corpus": count([text for _, text in col["docs"]]), "queries": count([q["text"] for q in col["queries"]])}

    ids_of: dict[str, set] = {}
    for doc_id, text in col["docs"]:
        ids_of.setdefault(text, set()).add(doc_id)
    corpus = [text for _, text in col["docs"]]
    pairs = Dataset.from_dict(
        {"query": [q["text"] for q in col["queries"]], "positive": [col["text_of"][q["positive"]] for q in col["queries"]]}
    )
    qid_of = {q["text"]: q["id"] for q in col["queries"]}
    if len(qid_of) != len(col["queries"]):
        sys.exit(f"{col['name']}: two queries share a text; sentence-transformers would merge them")

    def mine(relative_margin, cache_folder):
        t = Timer(time.process_time)
        # mine_hard_negatives always draws progress bars on stderr: kept only for a failure.
        bars = io.StringIO()
        try:
            with contextlib.redirect_stderr(bars):
                out = mine_hard_negatives(
                    pairs,
                    model,
                    corpus=corpus,
                    range_min=RANGE_MIN,
                    range_max=RANGE_MAX,
                    relative_margin=relative_margin,
                    num_negatives=NUM_NEGATIVES,
                    sampling_strategy="top",
                    output_format="labeled-list",
                    output_scores=True,
                    batch_size=args.batch_size,
                    cache_folder=cache_folder,
                    verbose=False,
                )
        except Exception:
            sys.stderr.write(bars.getvalue())
            raise
        took = t.lap()
        mined = {}
        for row in out:
            # labeled-list rows: the positive first, then the negatives, best first; queries
            # left without a negative have no row.
            texts, scores = row["positive"], row["scores"]
            mined[qid_of[row["query"]]] = (scores[0], [(ids_of[t], s) for t, s in zip(texts[1:], scores[1:])])
        return took, mined

    runs = {}
    for key, margin in (("plain", None), ("relative_margin", RELATIVE_MARGIN)):
        with tempfile.TemporaryDirectory() as cache:
            cold, mined = mine(margin, cache)
            # Warm: the corpus's embeddings come from the cache, the queries are encoded again.
            for f in Path(cache).glob("query_embeddings_*.npy"):
                f.unlink()
            warm, mined_warm = mine(margin, cache)
        if {k: [sorted(i) for i, _ in v[1]] for k, v in mined.items()} != {k: [sorted(i) for i, _ in v[1]] for k, v in mined_warm.items()}:
            print(f"warning: {key}: the cached run returned other negatives", file=sys.stderr)
        runs[key] = {"cold": cold, "warm": warm, "mined": mined, "metrics": score_negatives(col["queries"], mined, NUM_NEGATIVES)}
    import sentence_transformers
    import transformers

    return {
        "tokens": tokens,
        "imports": imports,
        "model_load": model_load,
        "runs": runs,
        "versions": {"sentence-transformers": sentence_transformers.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "max_seq_length": model.max_seq_length,
        "speed": encode_speed(model, corpus, [q["text"] for q in col["queries"]], tokens, args.batch_size),
    }


def encode_speed(model, corpus: list, queries: list, tokens: dict, batch_size: int) -> dict:
    """`encode` alone, batch `batch_size` (a warm-up first): the corpus in one call, the
    queries one call per `batch_size` of them, as a trainer sends them batch by batch (and as
    hardneg gets them, one Mine request each)."""
    model.encode(corpus[:batch_size], batch_size=batch_size)
    started = time.perf_counter()
    model.encode(corpus, batch_size=batch_size)
    out = {"documents": {"seconds": time.perf_counter() - started, "tokens": tokens["corpus"], "texts": len(corpus)}}
    started = time.perf_counter()
    for i in range(0, len(queries), batch_size):
        model.encode(queries[i : i + batch_size], batch_size=batch_size)
    out["queries"] = {"seconds": time.perf_counter() - started, "tokens": tokens["queries"], "texts": len(queries)}
    return out


# ---------------------------------------------------------------- hardneg

SAME_RULES = ["--exclude-batch-positives", "false", "--adaptive-depth", "false"]
HARDNEG_SETTINGS = {
    # key: (tool label, extra flags); every one runs with the window and sampling above.
    "plain_same_rules": ("hardneg, sentence-transformers' rules", SAME_RULES),
    "plain": ("hardneg, defaults", []),
    "relative_margin_same_rules": ("hardneg, sentence-transformers' rules", ["--relative-margin", str(RELATIVE_MARGIN), *SAME_RULES]),
    "relative_margin_fixed": ("hardneg, adaptive depth off", ["--relative-margin", str(RELATIVE_MARGIN), "--adaptive-depth", "false"]),
    "relative_margin": ("hardneg, defaults (adaptive depth on)", ["--relative-margin", str(RELATIVE_MARGIN)]),
    "denoised": ("hardneg, defaults", ["--preset", "denoised"]),
}
# Rows of the table: (setting, sentence-transformers run or None, hardneg runs).
GROUPS = [
    ("top-5 of [0, 30)", "plain", ["plain_same_rules", "plain"]),
    ("relative_margin 0.05", "relative_margin", ["relative_margin_same_rules", "relative_margin_fixed", "relative_margin"]),
    ("--preset denoised (hardneg only)", None, ["denoised"]),
]


class Timer:
    """Wall-clock and CPU seconds since the last lap; `cpu` reads a CPU-seconds counter."""

    def __init__(self, cpu):
        self.cpu = cpu
        self.wall0, self.cpu0 = time.perf_counter(), cpu()

    def lap(self) -> dict:
        wall, cpu = time.perf_counter(), self.cpu()
        out = {"wall_s": wall - self.wall0, "cpu_s": cpu - self.cpu0}
        self.wall0, self.cpu0 = wall, cpu
        return out


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds of the child processes that have ended (the CLI calls)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_hardneg(col: dict, args: argparse.Namespace) -> dict:
    port = free_port()
    addr = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HARDNEG_ADDR=addr)
    env.pop("HARDNEG_TOKEN", None)
    # MKL's runtime library where scripts/fetch-mkl put it, on the loader's path as scripts/run
    # and the Docker image have it: the server races it against OpenBLAS.
    mkl = ROOT / "lib" / "mkl"
    if (mkl / "libmkl_rt.so.3").is_file():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(mkl), env.get("LD_LIBRARY_PATH", "")) if p)
    # Same truncation and at most the same texts per model batch as sentence-transformers; the
    # token budget lets a batch of `batch_size` texts at full length through.
    env["HARDNEG__ENCODER__MAX_TOKENS"] = str(args.max_seq_length)
    env["HARDNEG__ENCODER__MAX_BATCH_TEXTS"] = str(args.batch_size)
    env["HARDNEG__ENCODER__TOKEN_BUDGET"] = str(args.batch_size * args.max_seq_length)
    env.pop("HARDNEG_AUTH_TOKEN", None)
    # The cross-encoder: same truncation and batch as sentence-transformers' CrossEncoder.
    env["HARDNEG__RERANKER__MAX_TOKENS"] = str(args.max_seq_length)
    env["HARDNEG__RERANKER__MAX_BATCH_TEXTS"] = str(args.batch_size)
    env["HARDNEG__RERANKER__TOKEN_BUDGET"] = str(args.batch_size * args.max_seq_length)
    q, qrels = str(col["folder"] / "queries.jsonl"), str(col["folder"] / "qrels" / "test.tsv")
    common = ["--num-negatives", str(NUM_NEGATIVES), "--range-min", str(RANGE_MIN), "--range-max", str(RANGE_MAX), "--sampling", "top"]

    def cli(*argv):
        t = Timer(lambda: server_cpu(server.pid) + children_cpu())
        out = subprocess.run([str(args.cli), *argv], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"hardneg {' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()}")
        return t.lap(), out.stdout

    server_cmd = [str(args.server), "--listen", f"127.0.0.1:{port}", "--model-dir", str(args.model), "--reranker-dir", str(args.cross_encoder)]
    config = subprocess.run([*server_cmd, "--data-dir", "unused", "--print-config"], env=env, capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as data, open(Path(data).parent / f"hardneg-compare-{port}.log", "w") as log:
        started, cpu_before = time.perf_counter(), children_cpu()
        server = subprocess.Popen([*server_cmd, "--data-dir", str(Path(data) / "data")], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while subprocess.run([str(args.cli), "health"], env=env, capture_output=True).returncode != 0:
                if server.poll() is not None:
                    raise RuntimeError(f"hardneg-server exited with {server.returncode}; see {log.name}")
                if time.perf_counter() - started > 300:
                    raise RuntimeError(f"hardneg-server not serving after 300 s; see {log.name}")
                time.sleep(0.1)
            start = {"wall_s": time.perf_counter() - started, "cpu_s": server_cpu(server.pid) + children_cpu() - cpu_before}
            create, _ = cli("create", "--collection", col["name"])
            ingest, ingest_out = cli("ingest", "--collection", col["name"], "--corpus", str(col["folder"] / "corpus.jsonl"))
            runs = {}
            for key, (label, extra) in HARDNEG_SETTINGS.items():
                flags = ["--collection", col["name"], "--queries", q, "--qrels", qrels, *common, *extra]
                warm, eval_out = cli("eval", *flags)
                _, mine_out = cli("mine", *flags)
                mined = {}
                for line in mine_out.splitlines():
                    r = json.loads(line)
                    mined[r["query_id"]] = (r.get("positive_score"), [({n["id"]}, n["score"]) for n in r["negatives"]])
                runs[key] = {
                    "label": label,
                    "flags": common + extra,
                    "warm": warm,
                    "eval": json.loads(eval_out.strip().splitlines()[-1]),
                    "mined": mined,
                    "metrics": score_negatives(col["queries"], mined, NUM_NEGATIVES),
                }
            speed = hardneg_speed(col, args, addr)
            kernels = next((line.split("CPU kernels: ", 1)[1].strip() for line in Path(log.name).read_text().splitlines() if "CPU kernels: " in line), "not logged")
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    Path(log.name).unlink()  # kept only when the server failed
    # The metrics computed here from `hardneg mine` must be those `hardneg eval` printed.
    for key, r in runs.items():
        e, m = r["eval"], r["metrics"]
        for field in ("queries", "negatives", "queries_with_leak"):
            if e[field] != m[field]:
                raise RuntimeError(f"{key}: {field}: eval {e[field]} vs recomputed {m[field]}")
        for field in ("leak_rate", "yield", "mean_neg_over_pos"):
            if abs(e[field] - m[field]) > 1e-4:
                raise RuntimeError(f"{key}: {field}: eval {e[field]} vs recomputed {m[field]}")
    return {
        "server": str(args.server),
        "start": start,
        "create": create,
        "ingest": ingest,
        "ingest_output": json.loads(ingest_out.strip().splitlines()[-1]),
        "runs": runs,
        "encoder_config": {k: v for k, v in _config_section(config, "encoder").items() if k in ("max_tokens", "token_budget", "max_batch_texts", "device", "dtype", "cpu_kernels")},
        "cpu_kernels": kernels,
        "speed": speed,
    }


# ---------------------------------------------------------------- model speed, side by side

CE_QUERIES = 16  # queries whose reranked candidates are the cross-encoder's pairs
CE_QUERIES_PER_REQUEST = 8
CE_CANDIDATES = 32  # pairs per query: 512 in all


def make_cross_encoder(body: Path, dst: Path, seed: int = 42) -> None:
    """A cross-encoder checkpoint for speed: `body` (the bi-encoder's BERT) under a one-label
    classification head drawn from `seed`; it costs what a MiniLM-L6 cross-encoder costs."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" report
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        model = AutoModelForSequenceClassification.from_pretrained(str(body), num_labels=1)
    model.save_pretrained(str(dst), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(body)).save_pretrained(str(dst))


def hardneg_speed(col: dict, args: argparse.Namespace, addr: str) -> dict:
    """Query encoding (Mine's `encode_seconds` over all queries, 32 texts per request) and the
    cross-encoder (`rerank_seconds`, `rerank_candidates` pairs per query, every one returned
    with its text and probability, so sentence-transformers can score the same pairs)."""
    import hardneg

    miner = hardneg.Miner(addr.removeprefix("http://"))
    queries = col["queries"]
    encode_s = 0.0
    miner.mine(col["name"], [{"text": q["text"]} for q in queries[: args.batch_size]], num_negatives=1)  # warm-up
    for i in range(0, len(queries), args.batch_size):
        chunk = queries[i : i + args.batch_size]
        encode_s += miner.mine(col["name"], [{"text": q["text"]} for q in chunk], num_negatives=1).timings.encode_seconds
    pairs, probabilities, rerank_s = [], [], 0.0
    ce_queries = queries[:CE_QUERIES]
    options = dict(num_negatives=CE_CANDIDATES, range_max=2 * CE_CANDIDATES, sampling="top", rerank=True, rerank_candidates=CE_CANDIDATES,
                   adaptive_depth=False, exclude_batch_positives=False, return_text=True)
    miner.mine(col["name"], [{"text": q["text"]} for q in ce_queries[:1]], **{**options, "rerank_candidates": 4, "num_negatives": 4})  # warm-up
    for i in range(0, len(ce_queries), CE_QUERIES_PER_REQUEST):
        chunk = ce_queries[i : i + CE_QUERIES_PER_REQUEST]
        reply = miner.mine(col["name"], [{"text": q["text"], "positive_ids": [q["positive"]]} for q in chunk], **options)
        rerank_s += reply.timings.rerank_seconds
        for q, result in zip(chunk, reply.results):
            for n in result.negatives:
                pairs.append((q["text"], n.text))
                probabilities.append(n.ce_score)
    miner.close()
    return {"queries": {"seconds": encode_s, "texts": len(queries)}, "cross_encoder": {"seconds": rerank_s, "pairs": pairs, "probabilities": probabilities}}


def st_cross_encoder_speed(args: argparse.Namespace, pairs: list) -> dict:
    """sentence-transformers' CrossEncoder on the same pairs, same truncation and batch."""
    import numpy as np
    from sentence_transformers import CrossEncoder

    with contextlib.redirect_stderr(io.StringIO()):
        model = CrossEncoder(str(args.cross_encoder), max_length=args.max_seq_length, device="cpu")
        model.predict(pairs[: args.batch_size], batch_size=args.batch_size, show_progress_bar=False)  # warm-up
        started = time.perf_counter()
        scores = model.predict(pairs, batch_size=args.batch_size, show_progress_bar=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(x) for x in model.tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=args.max_seq_length)["input_ids"])
    return {"seconds": seconds, "probabilities": np.asarray(scores, dtype=np.float64).ravel().tolist(), "tokens": tokens}


def lscpu() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    return {"model": fields.get("Model name", "?").strip(), "vector_flags": [f for f in wanted if f in flags]}


def speed_report(col: dict, st: dict, hn: dict, ce_st: dict) -> list:
    """The table of model speed, sentence-transformers and hardneg, same inputs, one run."""
    s, h = st["speed"], hn["speed"]
    doc_tokens, q_tokens = s["documents"]["tokens"], s["queries"]["tokens"]
    rows = [
        ("bi-encoder, documents (tokens/s)", doc_tokens / s["documents"]["seconds"], doc_tokens / hn["ingest"]["wall_s"], "ST encode vs hardneg ingest (encode + index + store)"),
        ("bi-encoder, queries (tokens/s)", q_tokens / s["queries"]["seconds"], q_tokens / h["queries"]["seconds"], f"{s['queries']['texts']} queries, {col['batch_size']} per call; hardneg: Mine encode_seconds"),
        ("cross-encoder (pairs/s)", len(h["cross_encoder"]["pairs"]) / ce_st["seconds"], len(h["cross_encoder"]["pairs"]) / h["cross_encoder"]["seconds"],
         f"{len(h['cross_encoder']['pairs'])} pairs, {ce_st['tokens'] / max(1, len(h['cross_encoder']['pairs'])):.0f} tokens each; hardneg: Mine rerank_seconds"),
    ]
    diff = max((abs(a - b) for a, b in zip(h["cross_encoder"]["probabilities"], ce_st["probabilities"])), default=float("nan"))
    cpu = lscpu()
    lines = [f"model speed, one run: {cpu['model']} ({' '.join(cpu['vector_flags'])}); hardneg {hn.get('cpu_kernels', '?')}"]
    head = f"{'':<34} {'sentence-transformers':>22} {'hardneg':>10} {'ratio':>6}  notes"
    lines += [head, "-" * len(head)]
    for name, a, b, note in rows:
        lines.append(f"{name:<34} {a:22.1f} {b:10.1f} {b / a:5.2f}x  {note}")
    lines.append(f"cross-encoder probabilities, hardneg vs sentence-transformers on the same pairs: max |diff| {diff:.2e}")
    return lines


def _config_section(text: str, section: str) -> dict:
    """One section of `hardneg-server --print-config` (Rust debug format: `key: value,` lines)."""
    out, inside = {}, False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(f"{section}: "):
            inside = True
        elif inside and line.startswith("}"):
            break
        elif inside and ": " in line:
            key, value = line.rstrip(",").split(": ", 1)
            out[key] = value.strip('"')
    return out


# ---------------------------------------------------------------- report


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def report(col: dict, st: dict, hn: dict, loads: dict, ce_st: dict = None) -> str:
    lines = []
    n_docs, n_q = len(col["docs"]), len(col["queries"])
    lines.append(f"== {col['name']}: {n_q} queries with a judged-relevant document, {n_docs} documents")
    lines.append(
        f"model {col['model']}, max_seq_length {st['max_seq_length']} (hardneg encoder.max_tokens "
        f"{hn['encoder_config'].get('max_tokens')}), encode batch {col['batch_size']} texts (hardneg max_batch_texts "
        f"{hn['encoder_config'].get('max_batch_texts')}, token_budget {hn['encoder_config'].get('token_budget')}), CPU, {os.cpu_count()} cores"
    )
    lines.append(
        f"sentence-transformers {st['versions']['sentence-transformers']}, transformers {st['versions']['transformers']}, "
        f"torch {st['versions']['torch']} ({st['torch_threads']} threads); hardneg server {hn['server']}"
    )
    d = positive_score_difference(st, hn)
    lines.append(f"query-positive cosine, sentence-transformers vs hardneg, over {d['queries']} queries: max |diff| {d['max']:.2e}, mean {d['mean']:.2e}")
    for k, v in loads.items():
        lines.append(f"load {k}: {v}")
    if ce_st is not None:
        lines += speed_report(col, st, hn, ce_st)
    fmt = lambda span: f"{span['wall_s']:.1f} s ({span['cpu_s']:.1f} CPU s)"
    tok = st["tokens"]
    lines.append(
        f"tokens at max_seq_length {st['max_seq_length']}: corpus {tok['corpus']} ({tok['corpus'] / n_docs:.0f} per document), "
        f"queries {tok['queries']}; encoding rate, corpus + queries over the whole call: sentence-transformers cold "
        f"{(tok['corpus'] + tok['queries']) / st['runs']['plain']['cold']['wall_s']:.0f} tokens/s; hardneg ingest "
        f"{tok['corpus'] / hn['ingest']['wall_s']:.0f} tokens/s (corpus only)"
    )
    lines.append(
        f"sentence-transformers: imports {fmt(st['imports'])}, model load {fmt(st['model_load'])}; "
        f"hardneg: server start to serving {fmt(hn['start'])}, create {fmt(hn['create'])}, "
        f"ingest (encode + index {hn['ingest_output']['doc_count']} docs) {fmt(hn['ingest'])}"
    )
    lines.append("")
    head = (
        f"{'setting':<34} {'tool':<38} {'cold s':>7} {'cpu s':>6} {'warm s':>7} {'cpu s':>6} "
        f"{'leak_rate':>9} {'q_w_leak':>8} {'yield':>6} {'neg/pos':>7} {'agree':>6}"
    )
    lines.append(head)
    lines.append("-" * len(head))
    add = lambda *spans: {k: sum(sp[k] for sp in spans) for k in ("wall_s", "cpu_s")}

    def row(setting, tool, cold, warm, m, agree):
        agree_txt = f"{agree:6.1%}" if agree is not None else f"{'':>6}"
        return (
            f"{setting:<34} {tool:<38} {cold['wall_s']:7.1f} {cold['cpu_s']:6.1f} {warm['wall_s']:7.2f} {warm['cpu_s']:6.2f} "
            f"{m['leak_rate']:9.1%} {m['queries_with_leak']:8d} {m['yield']:6.1%} {m['mean_neg_over_pos']:7.3f} {agree_txt}"
        )

    for setting, st_key, hn_keys in GROUPS:
        s = st["runs"][st_key] if st_key else None
        if s:
            lines.append(row(setting, "sentence-transformers", add(st["model_load"], s["cold"]), s["warm"], s["metrics"], None))
        for i, hk in enumerate(hn_keys):
            r = hn["runs"][hk]
            label = setting if (i == 0 and not s) else ""
            cold = add(hn["start"], hn["create"], hn["ingest"], r["warm"])
            lines.append(row(label, r["label"], cold, r["warm"], r["metrics"], agreement(s["mined"], r["mined"]) if s else None))
    lines.append("")
    lines.append(
        "cold: sentence-transformers: model load + one mine_hard_negatives call (encodes corpus and queries; imports excluded); "
        "hardneg: server start + create + ingest + one `hardneg eval`."
    )
    lines.append(
        "warm: sentence-transformers: the same call with the corpus's embeddings cached (cache_folder), queries encoded again; "
        "hardneg: `hardneg eval` against the ingested collection (the server encodes the queries)."
    )
    lines.append(
        "cpu s: CPU seconds, all threads (sentence-transformers: its process; hardneg: server + CLI processes); on 2 cores an "
        "idle machine gives wall ~ cpu / 2, a busy one a longer wall for about the same CPU."
    )
    lines.append(
        "agree: share of sentence-transformers' negatives that hardneg also returned for the same query. "
        "sentence-transformers' rules: --exclude-batch-positives false --adaptive-depth false. "
        "All metrics: the `hardneg eval` protocol (hardneg's rows equal `hardneg eval`'s own output)."
    )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    ensure_venv()
    if args.setup_only:
        out = subprocess.run([str(VENV_PYTHON), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
        wanted = {line.split("==")[0].lower() for line in REQUIREMENTS.read_text().splitlines() if "==" in line}
        print("\n".join(l for l in out.splitlines() if l.split("==")[0].lower() in wanted))
        return
    if Path(sys.prefix).resolve() != VENV:
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])
    # Nothing may reach for the Hugging Face Hub: the model is a local directory.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.server is None:
        args.server = next((p for p in (ROOT / "target/release/hardneg-server", ROOT / "target/debug/hardneg-server") if p.exists()), None)
        if args.server is None:
            sys.exit("no hardneg-server binary: build one (cargo build --release -p hardneg-server -p hardneg-client) or pass --server")
    args.server = args.server.resolve()
    args.cli = (args.cli or args.server.parent / "hardneg").resolve()
    args.model = args.model.resolve()
    ensure_client()
    datasets = args.datasets or [DATASETS / "cranfield"]
    cross_dir = tempfile.TemporaryDirectory(prefix="hardneg-cross-encoder-")
    args.cross_encoder = Path(cross_dir.name)
    make_cross_encoder((args.cross_encoder_body or args.model).resolve(), args.cross_encoder)
    results = {}
    for folder in datasets:
        col = load_collection(folder.resolve())
        col["model"], col["batch_size"] = args.model.name, args.batch_size
        loads = {"before sentence-transformers": load_average()}
        st = run_sentence_transformers(col, args)
        loads["after sentence-transformers"] = load_average()
        hn = run_hardneg(col, args)
        loads["after hardneg"] = load_average()
        ce_st = st_cross_encoder_speed(args, hn["speed"]["cross_encoder"]["pairs"])
        loads["after the cross-encoders"] = load_average()
        print(report(col, st, hn, loads, ce_st), flush=True)
        print(flush=True)
        strip = lambda runs: {k: {kk: vv for kk, vv in v.items() if kk != "mined"} for k, v in runs.items()}
        results[col["name"]] = {
            "documents": len(col["docs"]),
            "queries": len(col["queries"]),
            "model": str(args.model),
            "max_seq_length": args.max_seq_length,
            "batch_size": args.batch_size,
            "settings": {"num_negatives": NUM_NEGATIVES, "range_min": RANGE_MIN, "range_max": RANGE_MAX, "sampling": "top", "relative_margin": RELATIVE_MARGIN},
            "load_average": loads,
            "sentence_transformers": {**{k: v for k, v in st.items() if k != "runs"}, "runs": strip(st["runs"])},
            "hardneg": {**{k: v for k, v in hn.items() if k != "runs"}, "runs": strip(hn["runs"])},
            "agreement_with_sentence_transformers": {
                hk: agreement(st["runs"][st_key]["mined"], hn["runs"][hk]["mined"]) for _, st_key, hks in GROUPS if st_key for hk in hks
            },
            "positive_score_difference": positive_score_difference(st, hn),
            "model_speed": {
                "lscpu": lscpu(),
                "cpu_kernels": hn["cpu_kernels"],
                "sentence_transformers": {**st["speed"], "cross_encoder": {k: v for k, v in ce_st.items() if k != "probabilities"}},
                "hardneg": {
                    "documents": {"seconds": hn["ingest"]["wall_s"], "tokens": st["speed"]["documents"]["tokens"]},
                    "queries": hn["speed"]["queries"],
                    "cross_encoder": {"seconds": hn["speed"]["cross_encoder"]["seconds"], "pairs": len(hn["speed"]["cross_encoder"]["pairs"])},
                },
                "cross_encoder_max_probability_diff": max(
                    (abs(a - b) for a, b in zip(hn["speed"]["cross_encoder"]["probabilities"], ce_st["probabilities"])), default=None
                ),
            },
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
