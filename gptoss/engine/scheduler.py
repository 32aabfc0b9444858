"""In-flight batching: each step hands the runner {request: num_tokens} under a token budget.

Prefill, chunked prefill and decode are one thing at different sizes: a request is scheduled for as
many of its not-yet-computed tokens as the budget allows. Running requests go first (oldest first);
when the KV pool runs dry the newest running request is preempted (its blocks freed, recomputed
later), so nothing crashes and no request is lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import KVCacheManager
from .request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerOutput:
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)   # in batch order
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


class Scheduler:
    def __init__(self, pool: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # over the scheduler's life

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        # recompute later: the generated tokens stay and are prefilled again with the prompt
        self.running.remove(req)
        self.pool.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)
        if req.request_id in out.num_scheduled_tokens:
            del out.num_scheduled_tokens[req.request_id]
            out.requests.remove(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for req in list(self.running):
            if req not in self.running or budget == 0 or req.length_reached_with_pending:
                continue  # (the last: it finishes when its pending token is read back)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.pool.allocate(req, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.num_scheduled_tokens[req.request_id] = n
                out.requests.append(req)
                budget -= n
        # admit waiting requests while there is budget, room and memory; no jumping the queue
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            cached = self.pool.match_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.pool.allocate(req, n):
                self.pool.free(req)  # give the matched blocks back; try again next step
                req.num_computed_tokens = 0
                break
            self.pool.num_cache_queries += req.num_tokens
            self.pool.num_cache_hits += cached
            if not req.num_preemptions:
                req.num_cached_tokens = cached
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.num_scheduled_tokens[req.request_id] = n
            out.requests.append(req)
            budget -= n
        return out

    def finish(self, req: Request, reason: str, stop_reason=None) -> None:
        """Mark req finished, free its blocks at once and drop it from the queues."""
        if req.finished:
            return
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        self.pool.free(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:  # (a miss in deque.remove formats the request into its error)
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)
