"""Continuous batching: one thread owns the fast path's model and serves many sequences.

Every user of the model (a chat answer, an API completion, a voice turn, the router's
choice, a JSON tool call, a primed system prompt) is a `Sequence` submitted here. Each
step of the loop runs

- a chunk of one waiting prompt (at most `prefill_chunk` tokens: a long prompt does not
  stall the others for seconds), and
- one token for every running sequence that has one to run, in one batched C call
  (`FastLM.step`: each weight row is read once for the whole batch).

New sequences join at a step boundary when a slot is free; a finished, cancelled or
abandoned one leaves at the next. A free slot keeps its tokens' KV cache (the
conversation so far) until another sequence needs the room (least recently used), and a
new sequence starts from the longest prefix any slot holds (copied when it is another
slot's), so a chat's next turn, or any chat after the primed system prompt, runs only
its new tokens. Waiting sequences are served by priority (voice and the page before
the API), then in arrival order; beyond `max_waiting` a submit is refused (QueueFull:
the API's 429).

Two kinds of sequence: a sampled one (an answer: the loop samples, stops and streams
tokens), and a driven one (`open`: constrained decoding, whose caller masks the logits
and pushes each token itself). nano-vllm's scheduler and llama.cpp's server slots are
the models for this shape.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from engine.queueing import QueueFull

log = logging.getLogger(__name__)
INTERACTIVE, API = 0, 1  # priorities: the page and voice before API traffic
MIN_REUSE = 16  # a shorter common prefix is not worth a copy
POLL_S = 0.02  # how often an idle loop looks for cancelled sequences


@dataclass
class _Slot:
    index: int
    ids: list = field(default_factory=list)  # the tokens whose KV the slot holds
    owner: "Sequence | None" = None
    used: float = 0.0


class Sequence:
    """One use of the model. Sampled (`sample` given): tokens come out of `tokens()` until it
    finishes (`finish`: stop, length, cancelled, error). Driven (`sample` None): `logits()`
    after the prompt and after each `push(token)`; `rewind(n)` forgets positions; `close()`."""

    def __init__(self, sched: "Scheduler", prompt: list[int], sample: Callable | None, max_new: int,
                 stop: set, cancel, priority: int) -> None:
        self.sched, self.prompt, self.sample = sched, list(prompt), sample
        self.max_new, self.stop, self.cancel, self.priority = max_new, stop, cancel, priority
        self.order = next(sched._arrivals)
        self.slot: _Slot | None = None
        self.fed = 0  # prompt tokens now in the slot's cache
        self.reused = 0  # of them, taken from a kept prefix
        self.next: int | None = None  # the token to run at the next step
        self.generated = 0
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.out: queue.SimpleQueue = queue.SimpleQueue()

    # ---- the caller's side -------------------------------------------------------------
    def tokens(self):
        """A sampled sequence's tokens as they come; raises what the model raised."""
        while True:
            item = self.out.get()
            if item is None:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def logits(self):
        """A driven sequence's next logits ([1, vocab]), once the model has them."""
        item = self.out.get()
        if item is None:
            raise self.error or RuntimeError(f"the sequence ended ({self.finish})")
        return item

    def push(self, token: int) -> None:
        with self.sched._cond:
            self.next = token
            self.sched._cond.notify_all()

    def rewind(self, length: int) -> None:
        """Forget the slot's positions from `length` on (called between a `logits()` and the next
        `push`, when the loop is not running this sequence)."""
        with self.sched._cond:  # (the loop reads the slots' tokens when it places a sequence)
            self.sched.fast.crop(length, self.slot.index)
            del self.slot.ids[length:]

    def close(self) -> None:
        """The caller is done (or gone): the slot is free at the next step."""
        with self.sched._cond:
            if self.finish is None:
                self.sched._end(self, "stop" if self.sample is None else "cancelled")
            self.sched._cond.notify_all()


class Scheduler:
    def __init__(self, fast, max_waiting: int = 16, prefill_chunk: int = 64, name: str = "llm") -> None:
        self.fast, self.max_waiting, self.prefill_chunk = fast, max_waiting, max(1, prefill_chunk)
        self.slots = [_Slot(i) for i in range(fast.slots)]
        self.queued: list[Sequence] = []
        self.running: list[Sequence] = []
        self._arrivals = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self.steps = 0  # batched steps run, and tokens in them (the status panel's mean batch)
        self.stepped_tokens = 0
        self._thread = threading.Thread(target=self._loop, name=f"{name}-scheduler", daemon=True)
        self._thread.start()

    # ---- what the rest of the engine sees (the same questions as engine.queueing.FairLock) --
    @property
    def capacity(self) -> int:
        return len(self.slots)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        with self._cond:
            return len(self.queued)

    @property
    def busy(self) -> bool:
        """Every slot is taken (a new request waits)."""
        with self._cond:
            return len(self.running) >= len(self.slots)

    @property
    def active(self) -> int:
        with self._cond:
            return len(self.running) + len(self.queued)

    def locked(self) -> bool:
        """Some sequence is running or waiting."""
        return self.active > 0

    def full(self) -> bool:
        with self._cond:
            return self._full()

    def _full(self) -> bool:
        return bool(self.max_waiting) and len(self.running) >= len(self.slots) and \
            len(self.queued) >= self.max_waiting

    def submit(self, prompt: list[int], sample: Callable | None, max_new: int = 0, stop: set = frozenset(),
               cancel=None, priority: int = INTERACTIVE) -> Sequence:
        """Queue a sequence; QueueFull when every slot is taken and `max_waiting` wait already."""
        if not prompt:
            raise ValueError("an empty prompt")
        if len(prompt) + max_new > self.fast.capacity:
            raise ValueError(f"the context holds {self.fast.capacity} tokens")
        seq = Sequence(self, prompt, sample, max_new, set(stop), cancel, priority)
        with self._cond:
            if self._closed:
                raise RuntimeError("the model is closed")
            if self._full():
                raise QueueFull(f"{len(self.queued)} requests are already waiting for the model")
            self.queued.append(seq)
            self._cond.notify_all()
        return seq

    def open(self, prompt: list[int], priority: int = INTERACTIVE) -> Sequence:
        """A driven sequence (constrained decoding): the caller reads logits and pushes tokens."""
        return self.submit(prompt, None, priority=priority)

    def forget(self) -> None:
        """Drop every free slot's kept cache (a benchmark's cold prompt)."""
        with self._cond:
            for slot in self.slots:
                if slot.owner is None:
                    slot.ids = []
                    self.fast.crop(0, slot.index)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for seq in self.queued + self.running:
                self._end(seq, "cancelled", RuntimeError("the model was closed"))
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # ---- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                self._drop_cancelled()
                try:
                    self._admit()
                except Exception as exc:  # (a slot that could not be set up: its sequence ends, the loop goes on)
                    log.exception("placing a sequence failed")
                    for seq in [s for s in self.running if s.fed < len(s.prompt)]:
                        self._end(seq, "error", exc)
                prefill = next((s for s in self.running if s.fed < len(s.prompt)), None)
                ready = [s for s in self.running if s.next is not None and s.fed == len(s.prompt)]
                if prefill is None and not ready:
                    self._cond.wait(POLL_S)
                    continue
                tokens = [s.next for s in ready]
                for s in ready:
                    s.next = None
            try:
                if prefill is not None:
                    self._prefill(prefill)
                if ready:
                    self._step(ready, tokens)
            except Exception as exc:  # a model failure ends the sequences it touched, not the loop
                with self._cond:
                    for s in ([prefill] if prefill is not None else []) + ready:
                        self._end(s, "error", exc)

    def _prefill(self, seq: Sequence) -> None:
        chunk = seq.prompt[seq.fed:seq.fed + self.prefill_chunk]
        logits = self.fast.forward(chunk, seq.slot.index)
        seq.fed += len(chunk)
        seq.slot.ids.extend(chunk)
        if seq.fed == len(seq.prompt):
            with self._cond:
                self._got(seq, logits)

    def _step(self, seqs: list[Sequence], tokens: list[int]) -> None:
        logits = self.fast.step([s.slot.index for s in seqs], tokens)
        self.steps += 1
        self.stepped_tokens += len(seqs)
        with self._cond:
            for i, (s, t) in enumerate(zip(seqs, tokens)):
                s.slot.ids.append(t)
                self._got(s, logits[i:i + 1])

    def _got(self, seq: Sequence, logits) -> None:
        """The model's logits for a sequence's last token: sample the next one, or hand them over."""
        if seq.finish is not None:  # closed while its step ran
            return
        if seq.sample is None:
            seq.out.put(logits)
            return
        token = seq.sample(logits)
        if token in seq.stop:
            return self._end(seq, "stop")
        seq.generated += 1
        seq.out.put(token)
        if seq.generated >= seq.max_new:
            return self._end(seq, "length")
        if seq.cancel is not None and seq.cancel.cancelled:
            return self._end(seq, "cancelled")
        seq.next = token

    def _end(self, seq: Sequence, finish: str, error: BaseException | None = None) -> None:
        if seq.finish is not None:
            return
        seq.finish, seq.error = finish, error
        if seq in self.queued:
            self.queued.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            slot = seq.slot
            if seq.fed < len(seq.prompt):  # a prompt cut off part-way: what it holds is still a prefix
                del slot.ids[self.fast.lengths[slot.index]:]
            slot.owner, slot.used = None, time.monotonic()
        seq.out.put(None)

    def _drop_cancelled(self) -> None:
        for seq in self.queued + self.running:
            if seq.cancel is not None and seq.cancel.cancelled:
                self._end(seq, "cancelled")

    def _admit(self) -> None:
        """Waiting sequences into free slots: by priority, then arrival."""
        self.queued.sort(key=lambda s: (s.priority, s.order))
        while self.queued:
            free = [slot for slot in self.slots if slot.owner is None]
            if not free:
                return
            seq = self.queued.pop(0)
            self._place(seq, free)
            self.running.append(seq)

    def _place(self, seq: Sequence, free: list[_Slot]) -> None:
        """A free slot for `seq`, its cache starting from the longest prefix any slot holds:
        its own (a free slot whose conversation this continues), else a copy of another's;
        failing both, the least recently used slot, emptied."""
        def common(slot: _Slot) -> int:
            n = 0
            for a, b in zip(slot.ids, seq.prompt):
                if a != b:
                    break
                n += 1
            return min(n, len(seq.prompt) - 1)  # at least one token runs, to give logits

        own = max(free, key=lambda s: (common(s), -s.used if common(s) < MIN_REUSE else 0))
        if common(own) < MIN_REUSE:
            own = min(free, key=lambda s: s.used)
        best = max(self.slots, key=common)
        keep = common(own)
        if keep < MIN_REUSE:
            keep = 0
        if common(best) >= MIN_REUSE and common(best) > keep:
            keep = common(best)
            self.fast.copy_prefix(best.index, own.index, keep)
            own.ids = list(best.ids[:keep])
        else:
            self.fast.crop(keep, own.index)
            del own.ids[keep:]
        own.owner, own.used = seq, time.monotonic()
        seq.slot, seq.fed, seq.reused = own, keep, keep
