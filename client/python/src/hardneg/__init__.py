"""Python client for hardneg, online hard-negative mining over gRPC.

>>> import hardneg
>>> with hardneg.Miner("127.0.0.1:50051") as miner:
...     miner.create("cranfield")
...     miner.ingest("cranfield", hardneg.beir.read_corpus("cranfield/corpus.jsonl"))
...     batches = (hardneg.batch("cranfield", qs, batch_id=i, num_negatives=5, return_text=True)
...                for i, qs in enumerate(query_batches))
...     for request, response in miner.mine_stream(batches, prefetch=2, with_batches=True):
...         train_step(miner.rows(request, response))

The generated messages are in ``hardneg.pb`` (``hardneg.v1.hardneg_pb2``).
"""
from . import beir
from ._client import Miner, batch, document, options, query
from .errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    HardnegError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .rows import document_text, rows
from .v1 import hardneg_pb2 as pb

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "HardnegError",
    "InvalidArgument",
    "Miner",
    "NotFound",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "batch",
    "beir",
    "document",
    "document_text",
    "options",
    "pb",
    "query",
    "rows",
]
