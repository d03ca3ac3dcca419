"""Micro-batching: the images of concurrent requests share model calls."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MODEL_BATCH = 256  # a model call takes queued requests until it has this many images
BATCH_WAIT_SECONDS = 0.001  # after the first image, how long a model call waits for more


class MicroBatcher:
    """Puts the images of concurrent requests into shared model calls, one call at a time, in a
    worker thread so the event loop keeps serving. While one call runs, new images queue up; the
    next call takes them all (up to about MODEL_BATCH). A lone request waits BATCH_WAIT_SECONDS."""

    def __init__(self, predict, on_batch=lambda size, seconds: None):
        self.predict, self.on_batch = predict, on_batch
        self.queue = asyncio.Queue()
        # One thread of its own: a hop to it costs less than to Starlette's shared pool, and model
        # calls never wait behind other work.
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="model")

    async def __call__(self, images):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((np.asarray(images, np.float32), future))
        return await future

    async def run(self):
        while True:
            waiting = [await self.queue.get()]
            # A short pause lets requests that arrive together share this call. (Not wait_for on
            # queue.get: on Python 3.11 a timeout can drop the item it raced with.)
            await asyncio.sleep(BATCH_WAIT_SECONDS)
            while not self.queue.empty() and sum(len(images) for images, _ in waiting) < MODEL_BATCH:
                waiting.append(self.queue.get_nowait())
            batch = np.concatenate([images for images, _ in waiting])
            start = time.perf_counter()
            try:
                results = await asyncio.get_running_loop().run_in_executor(self.thread, self.predict, batch)
            except Exception as e:  # every waiting request must hear of it, and the loop must go on
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.on_batch(len(batch), time.perf_counter() - start)
            offset = 0
            for images, future in waiting:
                if not future.done():  # done: the request was cancelled (its client went away)
                    future.set_result(tuple(rows[offset : offset + len(images)] for rows in results))
                offset += len(images)
