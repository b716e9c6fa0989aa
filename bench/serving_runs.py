"""Single measurements for ``bench_serving.py``: prompts, cluster runs and the in-process baseline.

Decode throughput counts only the tokens made by decode steps: every output
token but the first, which the prefill worker samples. Its time is the decode
window, as measured by the driver::

    one sequence:   first token ............ last token      window = tpot_s * (n - 1)
    8 sequences:    first token of the earliest ... last token of the latest

The concurrent window includes the ramp-up while later prompts are still in
prefill and the drain while the last ones finish, so the batched figure is a
lower bound on the steady-state rate.
"""

from __future__ import annotations

import importlib
import inspect
import threading
import time
import uuid
from dataclasses import dataclass
from typing import NamedTuple

import torch
from common import cpu_percent_between, cpu_seconds_by_process
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from disagg.kv.arena import DecodeKVArena
from disagg.model.runner import ModelRunner
from disagg.model.sources import resolve_model

# Modules whose docstrings make the prompt text: they ship with every Python
# install, so the prompts need no data file.
PROMPT_MODULES = ("json", "textwrap", "inspect", "collections", "argparse", "itertools", "difflib", "csv")

# The decode counters are sampled this often during a throughput run. Each
# sample is one stats() call to every worker.
POLL_INTERVAL_S = 0.2

# A steady rate measured over less time than this is not reported.
MIN_STEADY_S = 1.0


class Prompts(NamedTuple):
    short: list[list[int]]  # distinct short prompts for the decode batching test
    long: list[int]  # one long prompt for the latency test


@dataclass(frozen=True)
class DecodeRun:
    """One decode-throughput measurement over one or more sequences."""

    num_tokens: int  # decode tokens: output tokens after the first, summed over sequences
    window_s: float
    num_steps: int  # decode steps the worker ran, from its counters
    num_step_tokens: int  # tokens those steps made, from the worker's counters
    steady_tokens_per_s: float | None  # while all sequences ran at once, or None if they never did
    wall_s: float  # the whole run, prefill included
    cpu_percent: dict[str, float]  # CPU use of each process over wall_s, in % of one core

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.window_s

    @property
    def step_ms(self) -> float:
        return self.window_s / max(self.num_steps, 1) * 1e3

    @property
    def mean_batch(self) -> float:
        return self.num_step_tokens / max(self.num_steps, 1)


@dataclass(frozen=True)
class ModelStepRun:
    """Decode steps of the model alone in this process: no Ray, no decode engine, no streaming."""

    batch_size: int
    num_steps: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.num_steps / self.elapsed_s

    @property
    def step_ms(self) -> float:
        return self.elapsed_s / self.num_steps * 1e3


@dataclass(frozen=True)
class ClusterRun:
    """One end-to-end request through the cluster."""

    wall_s: float  # generate() call, submit to last token
    ttft_s: float
    tpot_s: float
    prefill_s: float
    transfer_s: float
    transfer_bytes: int
    token_ids: list[int]


@dataclass(frozen=True)
class BaselineRun:
    """One in-process ``model.generate`` of the same prompt."""

    wall_s: float
    ttft_s: float
    tpot_s: float
    token_ids: list[int]


def build_prompts(tokenizer, batch_size: int, short_tokens: int, long_tokens: int) -> Prompts:
    """Cut distinct token windows out of standard-library docstrings.

    Raises ``RuntimeError`` when the docstrings have too few tokens.
    """
    text = "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in PROMPT_MODULES)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    needed = max(batch_size * short_tokens, long_tokens)
    if len(token_ids) < needed:
        raise RuntimeError(
            f"prompt text has {len(token_ids)} tokens, the benchmark needs {needed}. "
            "Python started with -OO strips the docstrings it uses."
        )
    short = [token_ids[i * short_tokens:(i + 1) * short_tokens] for i in range(batch_size)]
    return Prompts(short, token_ids[:long_tokens])


def fresh_cache_salt() -> str:
    """Return a cache salt used by no other request, so that no request reuses another's cached KV."""
    return f"bench-{uuid.uuid4().hex}"


class _DecodeCounterPoller:
    """Background sampler of the decode worker's ``running``, ``steps`` and ``tokens`` counters.

    The steady rate counts only intervals between two samples that both saw
    ``num_running`` sequences running. When every sequence was submitted at
    once, the count only falls after it first reaches ``num_running``, so
    those intervals leave out exactly the ramp-up and the drain.
    """

    def __init__(self, cluster, num_running: int | None = None) -> None:
        self._cluster = cluster
        self._num_running = num_running
        self._samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="bench-decode-poller", daemon=True)

    def __enter__(self) -> _DecodeCounterPoller:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _poll(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        workers = self._cluster.stats()["decode"]["workers"]
        self._samples.append((time.perf_counter(), sum(w["running"] for w in workers),
                              sum(w["steps"] for w in workers), sum(w["tokens"] for w in workers)))

    @property
    def totals(self) -> tuple[int, int]:
        """Steps and tokens between the first and the last sample."""
        first, last = self._samples[0], self._samples[-1]
        return last[2] - first[2], last[3] - first[3]

    @property
    def steady_tokens_per_s(self) -> float | None:
        if self._num_running is None:
            return None
        elapsed_s, num_tokens = 0.0, 0
        for before, after in zip(self._samples, self._samples[1:], strict=False):
            if before[1] == after[1] == self._num_running:
                elapsed_s += after[0] - before[0]
                num_tokens += after[3] - before[3]
        return num_tokens / elapsed_s if elapsed_s >= MIN_STEADY_S else None


def run_decode_batch(cluster, prompts: list[list[int]], params) -> DecodeRun:
    """Send every prompt at once and time the span from the earliest first token to the latest last token."""
    cpu_before = cpu_seconds_by_process()
    with _DecodeCounterPoller(cluster, len(prompts)) as poller:
        submitted = time.perf_counter()
        outputs = cluster.generate(prompts, params, cache_salt=fresh_cache_salt())
        wall_s = time.perf_counter() - submitted
    cpu_percent = cpu_percent_between(cpu_before, cpu_seconds_by_process(), wall_s)

    first_at = [submitted + o.metrics.ttft_s for o in outputs]
    last_at = [first + o.metrics.tpot_s * (len(o.token_ids) - 1)
               for first, o in zip(first_at, outputs, strict=True)]
    num_tokens = sum(len(o.token_ids) - 1 for o in outputs)
    return DecodeRun(num_tokens, max(last_at) - min(first_at), *poller.totals, poller.steady_tokens_per_s,
                     wall_s, cpu_percent)


def run_decode_one_at_a_time(cluster, prompts: list[list[int]], params) -> DecodeRun:
    """Send the prompts one after another and sum their decode windows."""
    cpu_before = cpu_seconds_by_process()
    num_tokens, window_s = 0, 0.0
    with _DecodeCounterPoller(cluster) as poller:
        started = time.perf_counter()
        for prompt in prompts:
            output = cluster.generate(prompt, params, cache_salt=fresh_cache_salt())[0]
            num_tokens += len(output.token_ids) - 1
            window_s += output.metrics.tpot_s * (len(output.token_ids) - 1)
        wall_s = time.perf_counter() - started
    cpu_percent = cpu_percent_between(cpu_before, cpu_seconds_by_process(), wall_s)

    # The window already leaves out each prompt's prefill, so it is the steady rate too.
    return DecodeRun(num_tokens, window_s, *poller.totals, num_tokens / window_s, wall_s, cpu_percent)


def load_step_runner(model: str, num_slots: int, slot_tokens: int) -> tuple[ModelRunner, DecodeKVArena]:
    """Load the model as a decode worker does, with an arena of ``num_slots`` slots."""
    runner = ModelRunner(resolve_model(model), dtype="float32", num_threads=torch.get_num_threads())
    return runner, DecodeKVArena(runner.layout, num_slots, slot_tokens)


def run_model_steps(runner: ModelRunner, arena: DecodeKVArena, last_tokens: list[int], first_position: int,
                    num_steps: int) -> tuple[ModelStepRun, ModelStepRun]:
    """Time ``ModelRunner.decode_step`` at batch 1 and at the batch of ``last_tokens``, step by step in turn.

    Alternating single steps puts load from other processes on both batch
    sizes alike. The arena's zeros stand in for the prompts' K/V, which does
    not change the amount of work. Mutates the arena's first
    ``len(last_tokens)`` slots. Returns the batch-1 run and the full-batch run.
    """
    batch_size = len(last_tokens)
    elapsed_s = {1: 0.0, batch_size: 0.0}
    for step in range(num_steps):
        for rows in (1, batch_size):
            started = time.perf_counter()
            runner.decode_step(arena, 0, last_tokens[:rows], [first_position + step] * rows, [True] * rows)
            elapsed_s[rows] += time.perf_counter() - started
    single = ModelStepRun(1, num_steps, elapsed_s[1])
    return single, ModelStepRun(batch_size, num_steps, elapsed_s[batch_size])


def run_cluster_once(cluster, prompt: list[int], params) -> ClusterRun:
    """Time one request from the ``generate`` call to its return.

    Raises ``RuntimeError`` when the cluster served part of the prompt from a cache.
    """
    started = time.perf_counter()
    output = cluster.generate(prompt, params, cache_salt=fresh_cache_salt())[0]
    wall_s = time.perf_counter() - started
    metrics = output.metrics
    if metrics.cached_tokens:
        raise RuntimeError(f"the cluster reused {metrics.cached_tokens} cached prompt tokens, but "
                           "the latency test expects a full prefill")
    return ClusterRun(wall_s, metrics.ttft_s, metrics.tpot_s, metrics.prefill_s, metrics.transfer_s,
                      metrics.transfer_bytes, list(output.token_ids))


def load_baseline_model(path) -> torch.nn.Module:
    """Load the checkpoint as the workers do: float32, sdpa attention, eval mode."""
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


class _TokenClock(BaseStreamer):
    """Streamer that records when ``generate`` emits each token. Its first ``put`` is the prompt."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_baseline(model, prompt: list[int], max_new_tokens: int) -> BaselineRun:
    """Run greedy ``model.generate`` on this thread's torch settings and time it."""
    input_ids = torch.tensor([prompt], dtype=torch.long)
    clock = _TokenClock()
    started = time.perf_counter()
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                            streamer=clock)
    wall_s = time.perf_counter() - started

    token_ids = output[0, len(prompt):].tolist()
    token_times = clock.times[1:]
    tpot_s = (token_times[-1] - token_times[0]) / max(len(token_times) - 1, 1)
    return BaselineRun(wall_s, token_times[0] - started, tpot_s, token_ids)
