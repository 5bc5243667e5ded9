"""Starts the real ``hardneg-server`` binary for the tests.

Paths, each overridable by an environment variable:
- ``HARDNEG_SERVER_BIN``: the server binary (default ``target/debug/hardneg-server``, built by
  ``cargo build --workspace --bins``);
- ``HARDNEG_MODEL_DIR``: the bi-encoder (default ``models/all-MiniLM-L6-v2``, fetched by
  ``scripts/fetch-models``); its parent directory is the server's ``encoder.models_root``, so
  the model's own directory name works as a re-encode checkpoint;
- ``HARDNEG_DATASETS``: the BEIR collections (default ``../shared/datasets``).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import pytest

import hardneg

ROOT = Path(__file__).resolve().parents[3]
#: Cranfield documents ingested by the shared collection (encoding runs at ~20 documents/s on
#: two cores, so the suite uses a subset).
DOCS = 150


def server_bin() -> Path:
    path = Path(os.environ.get("HARDNEG_SERVER_BIN", ROOT / "target/debug/hardneg-server"))
    if not path.is_file():
        pytest.exit(f"{path} is missing: run `cargo build --workspace --bins` (or set HARDNEG_SERVER_BIN)", returncode=2)
    return path


def model_dir() -> Path:
    path = Path(os.environ.get("HARDNEG_MODEL_DIR", ROOT / "models/all-MiniLM-L6-v2")).resolve()
    if not (path / "model.safetensors").is_file():
        pytest.exit(f"{path} has no model.safetensors: run scripts/fetch-models (or set HARDNEG_MODEL_DIR)", returncode=2)
    return path


def dataset(name: str) -> Path:
    path = Path(os.environ.get("HARDNEG_DATASETS", ROOT.parent / "shared/datasets")) / name
    if not (path / "corpus.jsonl").is_file():
        pytest.exit(f"{path} has no corpus.jsonl (set HARDNEG_DATASETS)", returncode=2)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``hardneg-server`` process on 127.0.0.1 with its own data dir; SERVING once started."""

    def __init__(self, data_dir: Path, env: Optional[Dict[str, str]] = None, tls_roots: Optional[Path] = None) -> None:
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log = data_dir.with_suffix(f".{self.port}.log")
        model = model_dir()
        full_env = dict(os.environ)
        full_env.pop("HARDNEG_AUTH_TOKEN", None)
        full_env["HARDNEG__ENCODER__MODELS_ROOT"] = str(model.parent)
        full_env.update(env or {})
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(server_bin()), "--listen", self.addr, "--data-dir", str(data_dir), "--model-dir", str(model)],
                cwd=ROOT,
                env=full_env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        probe = hardneg.Miner(self.addr, root_certificates=tls_roots)
        deadline = time.monotonic() + 120
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"hardneg-server exited with {self.process.returncode} during startup:\n{self.log_text()}")
                try:
                    if probe.health(timeout=1.0) == "SERVING":
                        return
                except hardneg.HardnegError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"hardneg-server not SERVING within 120 s:\n{self.log_text()}")
                time.sleep(0.1)
        finally:
            probe.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def miner(self, token: Optional[str] = None, **kwargs: object) -> hardneg.Miner:
        return hardneg.Miner(self.addr, token, **kwargs)  # type: ignore[arg-type]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, limit: float = 30.0) -> int:
        """SIGTERM, then the exit status (killed after ``limit`` seconds)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(limit)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the suite, with no auth."""
    srv = Server(tmp_path_factory.mktemp("server") / "data")
    yield srv
    code = srv.stop()
    assert code == 0, f"hardneg-server exited with {code}:\n{srv.log_text()}"


@pytest.fixture()
def miner(server: Server) -> Iterator[hardneg.Miner]:
    with server.miner(timeout=120.0) as m:
        yield m


@pytest.fixture(scope="session")
def corpus() -> List[dict]:
    """The first DOCS non-empty Cranfield documents."""
    return hardneg.beir.read_corpus(dataset("cranfield") / "corpus.jsonl")[:DOCS]


@pytest.fixture(scope="session")
def texts(corpus: List[dict]) -> Dict[str, str]:
    """Document id -> the text the server encodes and returns (title + text)."""
    return {d["id"]: f"{d['title']} {d['text']}" if d["title"].strip() else d["text"] for d in corpus}


@pytest.fixture(scope="session")
def judged(corpus: List[dict]) -> List[dict]:
    """Cranfield queries whose positive (highest-scored judgment) is among the ingested
    documents, as ``{"id", "text", "positive"}``."""
    d = dataset("cranfield")
    queries = hardneg.beir.read_queries(d / "queries.jsonl")
    qrels = hardneg.beir.read_qrels(d / "qrels/test.tsv")
    ids = {doc["id"] for doc in corpus}
    out = []
    for qid, text in queries.items():
        positive = hardneg.beir.positive(qrels.get(qid, []), among=ids)
        if positive is not None:
            out.append({"id": qid, "text": text, "positive": positive})
    return out


class Ingested(NamedTuple):
    info: hardneg.pb.CollectionInfo
    reply: hardneg.pb.UpsertResponse
    progress: List[Tuple[int, Optional[int]]]


@pytest.fixture(scope="session")
def cranfield(server: Server, corpus: List[dict]) -> Ingested:
    """The collection ``cran`` holding DOCS Cranfield documents, with what ingest reported."""
    calls: List[Tuple[int, Optional[int]]] = []
    with server.miner() as m:
        info = m.create("cran")
        reply = m.ingest("cran", corpus, batch_size=64, progress=lambda done, total: calls.append((done, total)))
    return Ingested(info, reply, calls)
