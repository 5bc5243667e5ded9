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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", type=Path, help="BEIR collection folders (default: $HARDNEG_DATASETS/cranfield)")
    p.add_argument("--server", type=Path, help="hardneg-server binary (default: target/release, else target/debug)")
    p.add_argument("--cli", type=Path, help="hardneg CLI binary (default: the one beside --server)")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2", help="HF-style model directory")
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
    }


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
    # Same truncation and at most the same texts per model batch as sentence-transformers; the
    # token budget lets a batch of `batch_size` texts at full length through.
    env["HARDNEG__ENCODER__MAX_TOKENS"] = str(args.max_seq_length)
    env["HARDNEG__ENCODER__MAX_BATCH_TEXTS"] = str(args.batch_size)
    env["HARDNEG__ENCODER__TOKEN_BUDGET"] = str(args.batch_size * args.max_seq_length)
    env.pop("HARDNEG_AUTH_TOKEN", None)
    q, qrels = str(col["folder"] / "queries.jsonl"), str(col["folder"] / "qrels" / "test.tsv")
    common = ["--num-negatives", str(NUM_NEGATIVES), "--range-min", str(RANGE_MIN), "--range-max", str(RANGE_MAX), "--sampling", "top"]

    def cli(*argv):
        t = Timer(lambda: server_cpu(server.pid) + children_cpu())
        out = subprocess.run([str(args.cli), *argv], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"hardneg {' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()}")
        return t.lap(), out.stdout

    server_cmd = [str(args.server), "--listen", f"127.0.0.1:{port}", "--model-dir", str(args.model)]
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
        "encoder_config": {k: v for k, v in _config_section(config, "encoder").items() if k in ("max_tokens", "token_budget", "max_batch_texts", "device", "dtype")},
    }


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


def report(col: dict, st: dict, hn: dict, loads: dict) -> str:
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
    datasets = args.datasets or [DATASETS / "cranfield"]
    results = {}
    for folder in datasets:
        col = load_collection(folder.resolve())
        col["model"], col["batch_size"] = args.model.name, args.batch_size
        loads = {"before sentence-transformers": load_average()}
        st = run_sentence_transformers(col, args)
        loads["after sentence-transformers"] = load_average()
        hn = run_hardneg(col, args)
        loads["after hardneg"] = load_average()
        print(report(col, st, hn, loads), flush=True)
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
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
