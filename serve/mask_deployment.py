"""The mask deployment of the Serve app: a frozen SAM2 (`reward.propagator`, `reward.sam2`) behind the
`MaskPropagator` seam, turning a located answer into a mask of every frame of its video.

`propagate` batches: answers that arrive together (`serve.masks.max_batch_size`, `batch_wait_timeout_s`) go to
one `propagate_answers` call, where SAM2's batched propagator encodes each video once and tracks the objects of
all of them in shared `track_step` calls. `propagate_frames` streams one video's masks frame by frame as SAM2
tracks them. The model is used by one thread at a time (a lock); masks travel back bit-packed (1 bit a pixel).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import numpy as np
from ray import serve

from actors.request_batching import each_on_failure
from veason_ray.config import VeasonConfig
from veason_ray.inference import LocatedAnswer, propagate_answers

_DONE = object()


def bitpack_masks(masks: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Bool masks of any shape as (bits packed along the last axis, the shape)."""
    return np.packbits(masks, axis=-1), tuple(masks.shape)


def unbitpack_masks(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The bool masks `bitpack_masks` packed."""
    return np.unpackbits(packed, axis=-1, count=shape[-1]).astype(bool).reshape(shape)


@serve.deployment(name="masks")
class MaskDeployment:
    def __init__(self, cfg: VeasonConfig):
        from veason_ray.models.propagator_choice import mask_propagator_for

        self.propagator = mask_propagator_for(cfg, batched=True)
        self._model = threading.Lock()
        self._propagate_batch_async.set_max_batch_size(cfg.serve.masks.max_batch_size)
        self._propagate_batch_async.set_batch_wait_timeout_s(cfg.serve.masks.batch_wait_timeout_s)

    def ready(self) -> bool:
        return True

    def _propagate_batch(self, items: list[tuple[np.ndarray, LocatedAnswer]]) -> list[tuple | Exception]:
        """One `propagate_answers` call for the batch (each item alone if it fails), masks bit-packed."""
        results = each_on_failure(self._propagate, items)
        return [r if isinstance(r, Exception) else bitpack_masks(r) for r in results]

    def _propagate(self, items: list[tuple[np.ndarray, LocatedAnswer]]) -> list[np.ndarray]:
        videos = {i: frames for i, (frames, _) in enumerate(items)}
        answers = [(i, answer) for i, (_, answer) in enumerate(items)]
        with self._model:
            return propagate_answers(videos, answers, self.propagator)

    async def propagate(self, frames: np.ndarray, answer: LocatedAnswer) -> tuple:
        """(L, H, W) masks of every frame of `frames` (L, H, W, 3) uint8 for a located answer, bit-packed
        (`unbitpack_masks`), batched with the requests that arrive with it; an unusable answer gets empty
        masks."""
        result = await self._propagate_batch_async((frames, answer))
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _propagate_batch_async(self, items: list[tuple[np.ndarray, LocatedAnswer]]) -> list:
        return await asyncio.to_thread(self._propagate_batch, items)

    async def propagate_frames(self, frames: np.ndarray, answer: LocatedAnswer) -> AsyncIterator[tuple]:
        """(frame index, bit-packed (H, W) mask) for every frame of one video as SAM2 tracks it, in
        propagation order; an unusable answer's empty masks come in the same order (keyframe 0)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=8)
        stop = threading.Event()

        def produce() -> None:
            try:
                with self._model:
                    keyframe = answer.keyframe if answer.usable else 0
                    boxes = answer.boxes if answer.usable else np.zeros((0, 4), np.float32)
                    for position, mask in self.propagator.propagate_frames(frames, keyframe, boxes):
                        if stop.is_set():
                            return
                        item = (position, *bitpack_masks(mask))
                        asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()
            except BaseException as error:  # handed to the caller, raised there
                asyncio.run_coroutine_threadsafe(queue.put(error), loop).result()
            finally:
                asyncio.run_coroutine_threadsafe(queue.put(_DONE), loop).result()

        worker = loop.run_in_executor(None, produce)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while not worker.done():  # let a producer blocked on a full queue finish
                while not queue.empty():
                    queue.get_nowait()
                await asyncio.sleep(0.01)
