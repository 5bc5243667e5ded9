"""mine_stream: answers in batch order, equal to unary Mine, with exactly `prefetch` batches in
flight; errors, early exits and failing batch iterators."""
from __future__ import annotations

from typing import Iterator, List

import pytest

import hardneg
from hardneg import pb

from conftest import Ingested


def ids(response: pb.MineResponse) -> List[List[str]]:
    return [[n.id for n in r.negatives] for r in response.results]


def requests(judged: List[dict], n: int, size: int = 4) -> List[pb.MineRequest]:
    out = []
    for b in range(n):
        chunk = judged[(b * size) % len(judged):][:size]
        queries = [{"id": q["id"], "text": q["text"], "positive_ids": [q["positive"]]} for q in chunk]
        out.append(hardneg.batch("cran", queries, batch_id=100 + b, num_negatives=3, seed=b))
    return out


class Counting:
    """An iterator over batches that records how many were taken."""

    def __init__(self, batches: List[pb.MineRequest]) -> None:
        self.batches = batches
        self.taken = 0

    def __iter__(self) -> Iterator[pb.MineRequest]:
        for b in self.batches:
            self.taken += 1
            yield b


@pytest.mark.parametrize("prefetch", [1, 3])
def test_stream_answers_in_order_with_prefetch_batches_in_flight(
    miner: hardneg.Miner, cranfield: Ingested, judged: List[dict], prefetch: int
) -> None:
    batches = requests(judged, 7)
    unary = [miner.mine(b) for b in batches]
    source = Counting(batches)
    taken_at_each_response = []
    streamed = []
    for response in miner.mine_stream(source, prefetch=prefetch):
        taken_at_each_response.append(source.taken)
        streamed.append(response)
    assert [r.batch_id for r in streamed] == [100 + b for b in range(7)]
    assert [ids(r) for r in streamed] == [ids(u) for u in unary]
    # While the caller holds response i, batches i+1 .. i+prefetch are out (or all are).
    assert taken_at_each_response == [min(i + 1 + prefetch, 7) for i in range(7)]


def test_stream_with_batches_pairs_each_response_with_its_request(miner: hardneg.Miner, cranfield: Ingested, judged: List[dict]) -> None:
    batches = requests(judged, 3)
    pairs = list(miner.mine_stream(iter(batches), prefetch=2, with_batches=True))
    assert [req for req, _ in pairs] == batches
    for req, resp in pairs:
        assert resp.batch_id == req.batch_id
        assert [r.query_id for r in resp.results] == [q.id for q in req.queries]
    assert list(miner.mine_stream([], prefetch=2)) == []


def test_a_bad_batch_ends_the_stream_after_the_good_ones(miner: hardneg.Miner, cranfield: Ingested, judged: List[dict]) -> None:
    good = requests(judged, 2)
    bad = hardneg.batch("cran", [], batch_id=7, num_negatives=3)
    got = []
    with pytest.raises(hardneg.InvalidArgument) as e:
        for response in miner.mine_stream(good + [bad] + requests(judged, 1), prefetch=4):
            got.append(response.batch_id)
    assert got == [100, 101]
    assert "batch 7" in e.value.details and "queries" in e.value.details
    with pytest.raises(hardneg.NotFound):
        list(miner.mine_stream([hardneg.batch("nope", ["x"], num_negatives=1)]))
    with pytest.raises(ValueError, match="prefetch"):
        miner.mine_stream(good, prefetch=0)


def test_leaving_early_or_a_failing_iterator_cancels_the_call(miner: hardneg.Miner, cranfield: Ingested, judged: List[dict]) -> None:
    source = Counting(requests(judged, 6))
    stream = miner.mine_stream(source, prefetch=2)
    first = next(stream)
    assert first.batch_id == 100 and source.taken == 3
    stream.close()
    assert source.taken == 3, "nothing more is taken after the caller leaves"

    def failing() -> Iterator[pb.MineRequest]:
        yield from requests(judged, 1)
        raise RuntimeError("the trainer's data loader broke")

    with pytest.raises(RuntimeError, match="data loader"):
        list(miner.mine_stream(failing(), prefetch=1))
    with pytest.raises(TypeError, match="MineRequest"):
        list(miner.mine_stream([{"collection": "cran"}]))  # type: ignore[list-item]
    # The connection is still good.
    assert [r.batch_id for r in miner.mine_stream(requests(judged, 2), prefetch=2)] == [100, 101]
