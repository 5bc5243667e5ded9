"""sentence-transformers-style training rows from mined batches (no torch needed)."""
from __future__ import annotations

from typing import List, Literal, Mapping, Optional

from .v1 import hardneg_pb2 as pb


def document_text(doc: pb.Document) -> str:
    """The text the server encodes for a document: ``title + " " + text`` when it has a
    title, else its text (the same text a negative carries with ``return_text``)."""
    title = doc.title.strip() if doc.HasField("title") else ""
    return f"{doc.title} {doc.text}" if title else doc.text


def rows(
    batch: pb.MineRequest,
    response: pb.MineResponse,
    positives: Optional[Mapping[str, str]] = None,
    *,
    format: Literal["n-tuple", "triplet"] = "n-tuple",
    num_negatives: Optional[int] = None,
) -> List[dict]:
    """Training rows for ``batch`` and its ``response`` (mined with ``return_text=True``).

    ``format="n-tuple"`` gives one row per query: ``{"anchor", "positive", "negative_1",
    ..., "negative_n"}`` with ``n = num_negatives`` (default: the batch's
    ``options.num_negatives``); queries that got fewer negatives are left out, as
    sentence-transformers' ``mine_hard_negatives`` does. ``format="triplet"`` gives one
    ``{"anchor", "positive", "negative"}`` row per negative.

    The anchor is the query's text; the positive is its first ``positive_texts`` entry, else
    ``positives[positive_ids[0]]`` (``Miner.rows`` fetches those from the collection).
    Queries with no positive raise ``ValueError``, as do negatives without text.
    """
    if len(response.results) != len(batch.queries):
        raise ValueError(f"the response has {len(response.results)} results for {len(batch.queries)} queries")
    n = num_negatives if num_negatives is not None else batch.options.num_negatives
    out: List[dict] = []
    for i, (q, result) in enumerate(zip(batch.queries, response.results)):
        if q.positive_texts:
            positive = q.positive_texts[0]
        elif q.positive_ids and positives is not None and q.positive_ids[0] in positives:
            positive = positives[q.positive_ids[0]]
        elif q.positive_ids:
            raise ValueError(f"queries[{i}]: no text for positive {q.positive_ids[0]!r}: pass it in positives")
        else:
            raise ValueError(f"queries[{i}] has no positive")
        if not q.text:
            raise ValueError(f"queries[{i}] has no text to use as the anchor")
        negatives = [neg.text for neg in result.negatives]
        if any(not t for t in negatives):
            raise ValueError(f"queries[{i}]: negatives without text: mine with return_text=True")
        if format == "triplet":
            out.extend({"anchor": q.text, "positive": positive, "negative": t} for t in negatives)
        elif format == "n-tuple":
            if len(negatives) < n:
                continue
            row = {"anchor": q.text, "positive": positive}
            row.update({f"negative_{j + 1}": t for j, t in enumerate(negatives[:n])})
            out.append(row)
        else:
            raise ValueError(f"format must be 'n-tuple' or 'triplet', got {format!r}")
    return out
