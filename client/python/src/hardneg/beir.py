"""Readers for BEIR-format collections (``corpus.jsonl``, ``queries.jsonl``,
``qrels/test.tsv``), the inputs of ``hardneg ingest`` / ``hardneg mine``."""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, Iterator, List, Optional, Tuple

Judgments = List[Tuple[str, float]]


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict]:
    """One dict per non-empty line; a bad line raises ``ValueError`` naming it."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: {e}") from None


def read_corpus(path: str | os.PathLike[str], skip_empty: bool = True) -> List[dict]:
    """Documents as ``{"id", "text", "title"}`` dicts, in file order, with the line's
    ``vector`` when it has one (for vectors-only collections). With ``skip_empty``,
    documents whose title and text are both blank are left out (the server refuses them)."""
    docs = []
    for row in read_jsonl(path):
        doc = {"id": str(row["_id"]), "text": row.get("text") or "", "title": row.get("title") or ""}
        if row.get("vector") is not None:
            doc["vector"] = row["vector"]
        if skip_empty and not (doc["text"].strip() or doc["title"].strip()):
            continue
        docs.append(doc)
    return docs


def read_queries(path: str | os.PathLike[str]) -> Dict[str, str]:
    """Query id -> text, in file order."""
    return {str(row["_id"]): row["text"] for row in read_jsonl(path)}


def read_qrels(path: str | os.PathLike[str]) -> Dict[str, Judgments]:
    """Query id -> [(document id, score)] in file order (the header line is skipped)."""
    qrels: Dict[str, Judgments] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for number, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (number == 1 and row[0] == "query-id"):
                continue
            if len(row) < 3:
                raise ValueError(f"{path}:{number}: expected query-id, corpus-id, score")
            qrels.setdefault(row[0], []).append((row[1], float(row[2])))
    return qrels


def positive(judgments: Judgments, among: Optional[set] = None) -> Optional[str]:
    """A query's positive as ``hardneg mine`` picks it: its highest-scored judged-relevant
    document (score > 0; ties: first in the file), optionally only among ``among``."""
    best: Optional[Tuple[str, float]] = None
    for doc, score in judgments:
        if score > 0 and (among is None or doc in among) and (best is None or score > best[1]):
            best = (doc, score)
    return best[0] if best else None
