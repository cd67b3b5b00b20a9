"""The serving engine: one worker thread owns the Pipeline and runs requests in decoder batches.

    submit(Job) ─► waiting (bounded: QueueFullError past queue_limit) ─► worker thread:
        take the oldest job, gather compatible ones for up to batch_wait_ms (at most max_batch)
        ─► runtime.rows.run (every row's images) ─► Generator(pipe, Sampling, B).append_tokens(ids)
        ─► generate_next_token() until every row is done; each row ends on eos, its own
           max_tokens, a stop string, or its client going away (the row is marked done)
    events to each job's sink, from the worker thread: ("start", prompt tokens), ("delta", text)
    (streaming jobs), ("end", Finish) or ("error", exception)

ONNX Runtime sessions are not to be used from several threads at once, so only the worker
touches them. A batch shares one Sampling: greedy jobs always batch together; sampled ones only
with the same temperature and top_p, each row drawing from its own seeded generator, so a
row's answer does not depend on what it was batched with (RowRngs).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime import contract as C
from runtime import rows
from runtime.generate import Pipeline, Sampling
from runtime.generator import Generator

Event = tuple[str, Any]


class QueueFullError(RuntimeError):
    """More requests wait than --queue-limit allows; the client should retry later."""


@dataclass(eq=False)  # a job is itself (identity), not its fields: removal from the queue
class Job:
    """One request: prompt ids with their images, limits, sampling, where events go."""

    ids: list[int]
    media: list  # the request's images, preprocessed: runtime.rows Items in prompt order
    max_tokens: int
    sink: Callable[[Event], None]  # called from the worker thread
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stream: bool = False
    cancelled: bool = False  # set by the client side; the worker stops feeding the row
    submitted: float = field(default_factory=time.monotonic)

    def key(self) -> tuple:
        """Jobs with equal keys can share a decoder batch (one Sampling)."""
        return ("greedy",) if self.temperature <= 0 else ("sample", self.temperature, self.top_p)


@dataclass(frozen=True)
class Finish:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) | "length" (max_tokens)
    prompt_tokens: int  # image tokens included
    completion_tokens: int


@dataclass
class EngineStats:
    requests: int = 0  # jobs that started decoding
    batches: int = 0  # decoder batches run (one Generator each)
    largest_batch: int = 0
    cancelled: int = 0  # rows whose client went away
    failed: int = 0  # jobs answered with an error
    split: int = 0  # batches that failed together and were rerun one job at a time
    tokens: int = 0  # tokens generated


class RowRngs:
    """One seeded generator per row in place of Generator.rng: `pick` draws `rng.choice` once per
    row, rows in order, so call i goes to row i mod B and each row's draws equal a batch-1 run
    with its seed."""

    def __init__(self, seeds: list[int]) -> None:
        self.rngs = [np.random.default_rng(s) for s in seeds]
        self.calls = 0

    def choice(self, *args, **kwargs):
        rng = self.rngs[self.calls % len(self.rngs)]
        self.calls += 1
        return rng.choice(*args, **kwargs)


class TextStream:
    """One row's answer text as its tokens arrive: the whole answer decoded each time (as
    runtime.run.StreamPrinter, holding back a trailing "\\ufffd", an unfinished UTF-8 sequence),
    cut before the first stop string, never showing a tail that may still become one."""

    def __init__(self, pipe: Pipeline, stop: tuple[str, ...], stream: bool = True) -> None:
        self.tokenizer, self.eos = pipe.tokenizer, set(pipe.text[C.T_EOS])
        self.stop, self.ids, self.text, self.shown = stop, [], "", 0
        self.stopped = False
        self.lazy = not stream and not stop  # nothing to show or watch: decode once, at the end

    def push(self, token: int) -> str:
        """Add a generated token; returns the text that may now be shown."""
        if token in self.eos:
            return ""
        self.ids.append(token)
        if self.lazy:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = text[: min(cuts)], True
            return self._show(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):
            return ""
        hold = max(
            (n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0
        )
        return self._show(len(text) - hold)

    def finish(self) -> str:
        """The text not shown yet, at the end of the answer."""
        if self.lazy:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        delta = self.text[self.shown : upto]
        self.shown = max(self.shown, upto)
        return delta


class Engine:
    """Batches submitted jobs onto one Pipeline in a worker thread of its own."""

    def __init__(
        self, pipe: Pipeline, max_batch: int = 8, queue_limit: int = 64, batch_wait_ms: float = 10
    ) -> None:
        if max_batch < 1 or queue_limit < 1 or batch_wait_ms < 0:
            raise ValueError("max_batch and queue_limit must be >= 1, batch_wait_ms >= 0")
        if pipe.static_batch not in (None, 1) and not pipe.qwen:
            raise ValueError(
                f"{pipe.bundle.name}'s vision graph has a static batch of {pipe.static_batch}; "
                "serve a bundle exported without --batch (or with --batch 1)"
            )
        self.pipe, self.max_batch, self.queue_limit = pipe, max_batch, queue_limit
        self.wait_s = batch_wait_ms / 1e3
        self.stats = EngineStats()
        self.running = 0  # rows in the batch being decoded
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = self._paused = False
        self._thread = threading.Thread(target=self._loop, name="svdprune-serve", daemon=True)
        self._thread.start()

    # --- client side (any thread) ---------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.queue_limit:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are waiting (--queue-limit "
                    f"{self.queue_limit}); retry shortly"
                )
            self._waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The job's client went away: drop it if waiting; the worker ends its row if running."""
        job.cancelled = True
        with self._cv, contextlib.suppress(ValueError):
            self._waiting.remove(job)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def alive(self) -> bool:
        return self._thread.is_alive()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No new batch starts inside (the running one finishes): drains, tests of the queue."""
        with self._cv:
            self._paused = True
        try:
            yield
        finally:
            with self._cv:
                self._paused = False
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # --- worker thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch: list[Job] = []
            try:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
            except Exception as e:  # the worker outlives any request
                traceback.print_exc(file=sys.stderr)
                for job in batch:
                    job.sink(("error", e))

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the compatible ones that arrive within batch_wait_ms of it."""
        with self._cv:
            while not self._closed and (self._paused or not self._waiting):
                self._cv.wait()
            if self._closed:
                return None
            first = self._waiting.popleft()
            batch, deadline = [first], first.submitted + self.wait_s
            while len(batch) < self.max_batch:
                for job in [j for j in self._waiting if j.key() == first.key()]:
                    if len(batch) < self.max_batch:
                        self._waiting.remove(job)
                        batch.append(job)
                left = deadline - time.monotonic()
                if len(batch) == self.max_batch or left <= 0:
                    break
                self._cv.wait(left)
        return batch

    def _run(self, batch: list[Job]) -> None:
        batch = [j for j in batch if not j.cancelled]
        if not batch:
            return
        try:
            gen = self._prefill(batch)
        except Exception as e:
            if len(batch) > 1:  # one bad row (a prompt too long for the context...) must not
                self.stats.split += 1  # fail the others: each alone gets its own answer
                for job in batch:
                    self._run([job])
                return
            self.stats.failed += 1
            batch[0].sink(("error", e))
            return
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for job in batch:
            job.sink(("start", len(job.ids)))
        self.running = len(batch)
        try:
            self._decode(gen, batch)
        finally:
            self.running = 0

    def _prefill(self, batch: list[Job]) -> Generator:
        pipe, first = self.pipe, batch[0]
        image = rows.run(pipe, [j.media for j in batch])  # one vision batch (static: chunks)
        top = max(j.max_tokens for j in batch)
        s = Sampling(top, first.temperature, 0, first.top_p, first.seed)
        gen = Generator(pipe, s, len(batch))
        if first.temperature > 0:
            gen.rng = RowRngs([j.seed for j in batch])
        gen.append_tokens([j.ids for j in batch], image=image)
        return gen

    def _decode(self, gen: Generator, batch: list[Job]) -> None:
        texts = [TextStream(self.pipe, j.stop, j.stream) for j in batch]
        finished = [False] * len(batch)
        try:
            while not gen.is_done():
                for b, job in enumerate(batch):
                    if job.cancelled and not finished[b]:  # its client is gone: free the row
                        gen.done[b], finished[b] = True, True
                        self.stats.cancelled += 1
                if gen.is_done():
                    break
                live = np.nonzero(~gen.done)[0]
                tokens = gen.generate_next_token()
                self.stats.tokens += len(live)
                for b in live:
                    job, text = batch[b], texts[b]
                    delta = text.push(int(tokens[b]))
                    if delta and job.stream:
                        job.sink(("delta", delta))
                    eos, n = bool(gen.done[b]), len(gen.new_tokens[b])
                    if eos or text.stopped or n >= job.max_tokens:
                        gen.done[b], finished[b] = True, True  # the row's own limit
                        rest = text.finish()
                        if rest and job.stream:
                            job.sink(("delta", rest))
                        reason = "stop" if eos or text.stopped else "length"
                        job.sink(("end", Finish(text.text, reason, len(job.ids), n)))
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            for b, job in enumerate(batch):
                if not finished[b] and not job.cancelled:
                    self.stats.failed += 1
                    job.sink(("error", e))
