"""Continuous-batching decode engine over the KV arena (no Ray, no transport).

A step runs in three phases so the forward pass can leave the event loop:

1. ``plan_step``    (owner thread): snapshot the running sequences into a batch;
2. ``run_step``     (any thread):   one forward over the batch, arena writes only;
3. ``finish_step``  (owner thread): sample, append tokens, retire finished sequences.

Sequences join (``add``) and leave (``abort`` or finishing) only between steps;
a slot whose sequence is aborted during ``run_step`` is freed in ``finish_step``,
so the forward pass never writes into a slot that a new request already owns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from disagg.kv.arena import DecodeKVArena
from disagg.outputs import FinishReason
from disagg.sampling import RequestSampler, SamplingParams, is_stop_token

logger = logging.getLogger(__name__)


@dataclass
class Sequence:
    request_id: str
    slot: int
    num_prompt_tokens: int
    params: SamplingParams
    sampler: RequestSampler
    output_ids: list[int] = field(default_factory=list)  # first token (from prefill) included
    aborted: bool = False

    @property
    def num_cached_tokens(self) -> int:
        """Positions already in the arena: prompt plus every output token but the last."""
        return self.num_prompt_tokens + len(self.output_ids) - 1


class StepPlan(NamedTuple):
    lo: int
    sequences: list[Sequence | None]  # one entry per slot in [lo, lo + len); None marks a hole


class TokenEvent(NamedTuple):
    request_id: str
    token_id: int
    finish_reason: FinishReason | None


class DecodeEngine:
    """Holds running sequences and advances them one token per step."""

    def __init__(self, runner, arena: DecodeKVArena, max_batch: int) -> None:
        self.runner = runner
        self.arena = arena
        self.max_batch = max_batch
        self._running: dict[int, Sequence] = {}  # slot -> sequence
        self._by_request: dict[str, Sequence] = {}
        self._stepping = False
        self._deferred_free: list[int] = []
        self.num_steps = 0
        self.num_tokens = 0

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._running)

    def add(self, request_id: str, slot: int, num_prompt_tokens: int, first_token: int,
            params: SamplingParams, sampler: RequestSampler) -> None:
        """Join a sequence whose prompt KV is already in ``slot``; it runs from the next step."""
        if self.arena.owner(slot) != request_id:
            raise RuntimeError(f"decode engine: slot {slot} is not reserved for request {request_id}")
        sequence = Sequence(request_id, slot, num_prompt_tokens, params, sampler, [first_token])
        self._running[slot] = sequence
        self._by_request[request_id] = sequence

    def abort(self, request_id: str) -> bool:
        """Remove a running sequence and free its slot (after the current step). Return whether it ran."""
        sequence = self._by_request.pop(request_id, None)
        if sequence is None:
            return False
        sequence.aborted = True
        del self._running[sequence.slot]
        self._free(sequence.slot)
        return True

    def plan_step(self) -> StepPlan | None:
        """Snapshot up to ``max_batch`` running sequences; None when idle. Marks the engine as stepping."""
        if not self._running:
            return None
        slots = sorted(self._running)
        lo, hi = slots[0], slots[-1] + 1
        self._stepping = True
        return StepPlan(lo, [self._running.get(slot) if slot in slots else None for slot in range(lo, hi)])

    def run_step(self, plan: StepPlan) -> torch.Tensor:
        """Forward one token for every sequence in the plan; return ``[batch, vocab]`` logits."""
        input_ids = [s.output_ids[-1] if s else 0 for s in plan.sequences]
        positions = [s.num_cached_tokens if s else 0 for s in plan.sequences]
        active = [s is not None for s in plan.sequences]
        return self.runner.decode_step(self.arena, plan.lo, input_ids, positions, active)

    def finish_step(self, plan: StepPlan, logits: torch.Tensor) -> list[TokenEvent]:
        """Sample each sequence's next token and retire finished ones; return one event per token."""
        events = []
        for row, sequence in enumerate(plan.sequences):
            if sequence is None or sequence.aborted:
                continue
            token_id = sequence.sampler.sample(logits[row], output_index=len(sequence.output_ids))
            sequence.output_ids.append(token_id)
            reason = self._finish_reason(sequence, token_id)
            events.append(TokenEvent(sequence.request_id, token_id, reason))
            if reason is not None:
                self.abort(sequence.request_id)

        self._stepping = False
        for slot in self._deferred_free:
            self.arena.free(slot)
        self._deferred_free.clear()
        self.num_steps += 1
        self.num_tokens += len(events)
        return events

    def abandon_step(self, plan: StepPlan) -> None:
        """End a step whose forward failed: no tokens are sampled; the caller aborts its sequences."""
        self._stepping = False
        for slot in self._deferred_free:
            self.arena.free(slot)
        self._deferred_free.clear()

    def _finish_reason(self, sequence: Sequence, token_id: int) -> FinishReason | None:
        if is_stop_token(token_id, sequence.params, self.runner.eos_token_ids):
            return FinishReason.STOP
        if len(sequence.output_ids) >= sequence.params.max_tokens:
            return FinishReason.LENGTH
        if sequence.num_cached_tokens + 1 >= self.arena.slot_tokens:
            # NOTE: the driver rejects prompt + max_tokens > max_seq_len, so this
            # only guards against a broken invariant.
            return FinishReason.LENGTH
        return None

    def _free(self, slot: int) -> None:
        if self._stepping:
            self._deferred_free.append(slot)
        else:
            self.arena.free(slot)
