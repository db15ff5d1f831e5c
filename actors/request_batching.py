"""Batching the concurrent calls an actor receives into one model call: callers submit items from their own
threads and block on their results; one thread takes whatever is queued (waiting up to `wait_s` for more, up to
`max_items`) and hands the batch to the model in one call. The reward actors batch GRPO groups this way (one
shared SAM2 pass), and the evaluation's policy stage batches videos (one vLLM generate call).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any


class RequestBatcher:
    """`submit(item)` returns `process(batch)`'s result for that item; `process` takes a list of items and
    returns one result per item, in order. An exception of `process` is raised in every caller of its batch.
    `item_weight(item)` counts an item towards `max_items` (1 each by default; at least one item a batch)."""

    def __init__(
        self,
        process: Callable[[list[Any]], Sequence[Any]],
        max_items: int,
        wait_s: float,
        name: str,
        item_weight: Callable[[Any], int] | None = None,
    ):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.process, self.max_items, self.wait_s = process, max_items, wait_s
        self.item_weight = item_weight or (lambda _: 1)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, item: Any, timeout_s: float | None = None) -> Any:
        """Block until the batch holding `item` is processed; its result (TimeoutError after `timeout_s`)."""
        done: Future = Future()
        self._queue.put((item, done))
        return done.result(timeout=timeout_s)

    def _next_batch(self) -> list[tuple[Any, Future]]:
        batch = [self._queue.get()]
        weight = self.item_weight(batch[0][0])
        deadline = time.monotonic() + self.wait_s
        while weight < self.max_items:
            try:
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            batch.append(entry)
            weight += self.item_weight(entry[0])
        return batch

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                results = self.process([item for item, _ in batch])
            except BaseException as error:  # noqa: BLE001 - handed to the callers, the loop goes on
                for _, done in batch:
                    done.set_exception(error)
                continue
            for (_, done), result in zip(batch, results, strict=True):
                done.set_result(result)


def each_on_failure(process: Callable[[list[Any]], Sequence[Any]], items: list[Any]) -> list[Any]:
    """`process(items)`, one result per item; when the batch call fails, each item alone, so that a bad item
    fails only its own caller: its exception is returned in its place (the Serve deployments raise it in
    that request)."""
    try:
        return list(process(items))
    except Exception as error:  # returned in the item's place
        if len(items) == 1:
            return [error]
    results: list[Any] = []
    for item in items:
        try:
            results.extend(process([item]))
        except Exception as error:
            results.append(error)
    return results
