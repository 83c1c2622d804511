"""The read coalescer behind heartbeat authorisation: batching, freshness and failure isolation."""

from __future__ import annotations

import asyncio

import pytest

from nkudo.cp.batching import Coalescer


class Store:
    """A fake batched read that records every batch it was asked for."""

    def __init__(self, data: dict[str, int], *, delay: float = 0.01) -> None:
        self.data = data
        self.delay = delay
        self.batches: list[list[str]] = []
        self.fail_next = False

    async def fetch(self, keys: list[str]) -> dict[str, int]:
        self.batches.append(list(keys))
        snapshot = dict(self.data)  # what the database holds when the read starts
        await asyncio.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("database went away")
        return {k: snapshot[k] for k in keys if k in snapshot}


def test_concurrent_reads_share_one_fetch_and_unknown_keys_are_none() -> None:
    async def main() -> None:
        store = Store({"a": 1, "b": 2})
        c = Coalescer(store.fetch)
        first = asyncio.ensure_future(c.get("a"))
        await asyncio.sleep(0)  # the first read starts alone ...
        rest = await asyncio.gather(c.get("a"), c.get("b"), c.get("zz"))  # ... these queue up behind it
        assert await first == 1
        assert list(rest) == [1, 2, None]
        assert store.batches == [["a"], ["a", "b", "zz"]]

    asyncio.run(main())


def test_a_read_never_answers_from_state_older_than_the_request() -> None:
    """Why no cache: a change committed before a request arrives (an unenroll) is always seen by it."""

    async def main() -> None:
        store = Store({"a": 1})
        c = Coalescer(store.fetch)
        early = asyncio.ensure_future(c.get("a"))
        await asyncio.sleep(0.001)  # the first batch is in flight and has read a=1
        store.data["a"] = 2  # committed now, e.g. by another replica
        assert await c.get("a") == 2  # arrived after the change: answered by the next batch
        assert await early == 1

    asyncio.run(main())


def test_a_failed_fetch_fails_only_its_own_batch() -> None:
    async def main() -> None:
        store = Store({"a": 1, "b": 2})
        c = Coalescer(store.fetch)
        store.fail_next = True
        doomed = asyncio.ensure_future(c.get("a"))
        await asyncio.sleep(0)
        later = asyncio.ensure_future(c.get("b"))
        with pytest.raises(RuntimeError, match="went away"):
            await doomed
        assert await later == 2
        assert await c.get("a") == 1  # and the coalescer keeps working afterwards

    asyncio.run(main())


def test_batches_are_bounded_and_a_cancelled_waiter_is_skipped() -> None:
    async def main() -> None:
        store = Store({str(i): i for i in range(10)})
        c = Coalescer(store.fetch, max_batch=4)
        head = asyncio.ensure_future(c.get("0"))
        await asyncio.sleep(0)
        waiters = [asyncio.ensure_future(c.get(str(i))) for i in range(1, 10)]
        await asyncio.sleep(0)
        waiters[0].cancel()  # that client went away while waiting
        assert await head == 0
        assert await asyncio.gather(*waiters[1:]) == list(range(2, 10))
        assert all(len(b) <= 4 for b in store.batches)
        assert sorted(k for b in store.batches for k in b) == sorted(str(i) for i in range(10))

    asyncio.run(main())
