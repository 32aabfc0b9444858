"""The asyncio front of the engine (used by the server): requests stream, and can be cancelled.

The engine steps in one background thread. Coroutines add and abort requests under a lock, between
steps; each request's outputs reach its coroutine through an asyncio queue. Cancelling the consuming
coroutine (a client that disconnects) aborts the request and frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from typing import AsyncIterator

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine
from .request import Request

log = logging.getLogger("gptoss")


class EngineDeadError(RuntimeError):
    pass


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_queued_requests: int | None = None):
        self.engine = engine
        engine.driven_by_async = True  # the engine thread is its only driver from now on
        self.max_queued_requests = max_queued_requests
        self._lock = threading.Condition()
        # Python's lock is not fair: the engine thread, re-taking it right after each step, could keep
        # an abort or a new request out for many steps. Callers count themselves here and the engine
        # thread steps aside between steps while any are waiting.
        self._callers = 0
        self._callers_lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list[Request]]] = {}
        self._ids = itertools.count()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="gptoss-engine", daemon=True)
        self._thread.start()

    # --- state for health and metrics -------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @contextlib.contextmanager
    def _turn(self):
        """The engine, between two steps, for a caller thread."""
        with self._callers_lock:
            self._callers += 1
        try:
            with self._lock:
                yield
                self._lock.notify_all()
        finally:
            with self._callers_lock:
                self._callers -= 1

    def stats(self) -> dict:
        with self._turn():
            s = self.engine.scheduler
            return {"num_requests_running": len(s.running), "num_requests_waiting": len(s.waiting),
                    "kv_cache_usage_perc": self.engine.pool.usage,
                    "prefix_cache_hits": self.engine.pool.num_cache_hits,
                    "prefix_cache_queries": self.engine.pool.num_cache_queries}

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    # --- requests ------------------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's RequestOutput each time it grows; the last one has finished=True."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.error!r})")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = request_id or f"req-{next(self._ids)}"
        with self._turn():
            # a request queues its n samples at once: all of them must fit
            waiting, limit = self.num_waiting(), self.max_queued_requests
            if limit is not None and waiting + params.n > limit:
                raise QueueFullError(f"{waiting} sequences are already waiting and this request adds {params.n} "
                                     f"(max_queued_requests={limit})")
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use")
            reqs = self.engine.add_request(prompt_token_ids, params, rid)  # raises on bad input
            self._streams[rid] = (loop, queue, reqs)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if prompt is not None:
                    item.prompt = prompt
                yield item
                if item.finished:
                    return
        finally:
            self.abort(rid)  # no-op if it finished; frees the blocks if the consumer went away

    def abort(self, request_id: str) -> None:
        with self._turn():
            entry = self._streams.pop(request_id, None)
            if entry is not None:
                self.engine.abort([r.request_id for r in entry[2] if not r.finished])

    def shutdown(self) -> None:
        with self._turn():
            self._stop = True
        self._thread.join(timeout=10)
        self.engine.driven_by_async = False

    # --- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and (self._callers or not self.engine.has_unfinished()):
                    self._lock.wait(0.002 if self._callers else None)
                if self._stop:
                    return
                try:
                    stepped = self.engine.step()
                except BaseException as e:  # a broken engine fails every request instead of hanging them
                    log.exception("engine step failed")
                    self.error = e
                    for loop, queue, _ in self._streams.values():
                        loop.call_soon_threadsafe(queue.put_nowait, EngineDeadError(f"engine failed: {e!r}"))
                    self._streams.clear()
                    return
                touched = {r.parent_id for r in stepped}
                for rid in touched:
                    entry = self._streams.get(rid)
                    if entry is None:
                        continue
                    loop, queue, reqs = entry
                    out = self.engine.request_output(reqs, None, shared=True)  # one a token: no copies
                    if out.finished:
                        del self._streams[rid]
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, out)
                    except RuntimeError:  # the consumer's event loop is closed: drop the request
                        self.engine.abort([r.request_id for r in reqs if not r.finished])


class QueueFullError(RuntimeError):
    pass
