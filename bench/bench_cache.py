"""Prefix-cache benchmark: TTFT and throughput of a disagg cluster with the KV chunk cache on, on SmolLM2.

Run from the repository root, inside a loopback-only network namespace::

    python bench/bench_cache.py [--quick]

One run starts one cluster of 1 prefill and 1 decode worker, each on 1 CPU and
1 torch thread, with a 1.5 GiB chunk pool, and measures:

1. TTFT of a prompt whose prefix is cached against the same prefix computed,
   for prefixes of 256, 1,024, 4,096 and 8,000 tokens;
2. a multi-turn chat workload, with reuse on and off;
3. the document-QA workload of ``disagg.workload``, with reuse on and off.

Reuse is switched by ``cache_salt``: requests share cached chunks only with
requests of the same salt, so a fresh salt per request turns reuse off
without a second cluster. Every ratio compares figures of this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from common import (
    describe_machine,
    describe_revision,
    describe_versions,
    markdown_table,
    median,
    progress,
    utc_date,
    write_section,
)

import disagg
from disagg.outputs import RequestOutput
from disagg.prompts import encode_prompt
from disagg.workload import QUESTION_TEMPLATES, SYSTEM_PROMPT, build_doc_qa_prompts, load_documents

SECTION = "cache"
MODEL = "smollm2-135m-instruct"
CHUNK_TOKENS = 256  # prefill_block_tokens, which is also the cache chunk size
MAX_SEQ_LEN = 8192  # SmolLM2's whole context: launch rejects more
OUTBOX_TOKENS = 16_896  # 66 chunks: two 8,000-token prompts with room to spare
POOL_BYTES = 3 * 2**29  # 1.5 GiB: about 136 chunks of SmolLM2 float32 KV (11.8 MB each)
WORKER = disagg.WorkerResources(num_cpus=1, torch_threads=1)

TARGET_SPEEDUP = 5.0  # minimum cold TTFT / warm TTFT for prefixes of TARGET_MIN_PREFIX_TOKENS or more
TARGET_MIN_PREFIX_TOKENS = 4096
INDEX_TIMEOUT_S = 30.0  # max wait for a cold request's chunks to be stored and indexed

# Docstrings concatenated, in this order, into the long text the TTFT prefixes are cut from.
TEXT_MODULES = (
    "json", "inspect", "collections", "argparse", "itertools", "difflib", "csv", "typing", "unittest", "heapq",
    "statistics", "sched", "struct", "uuid", "copy", "tempfile", "pprint", "string", "re", "pickle",
    "subprocess", "os", "sys", "textwrap", "logging", "shutil", "zipfile", "tarfile", "calendar", "random",
)
DOC_CHARS = 4000  # per document in both workloads: whole docstrings up to about 950 tokens


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run."""

    prefix_lengths: tuple[int, ...] = (256, 1024, 4096, 8000)
    suffix_tokens: int = 16
    short_prefix_repeats: int = 3  # cold requests per prefix of up to 1,024 tokens, one for longer ones
    warm_per_cold: int = 3  # warm requests after each cold one
    chat_conversations: int = 4
    chat_turns: int = 4
    doc_qa_questions: int = 3  # per document, for every document load_documents returns
    answer_tokens: int = 24
    concurrency: int = 4  # requests in flight in both workloads


QUICK_SETTINGS = Settings(prefix_lengths=(256, 1024), short_prefix_repeats=1, warm_per_cold=2, chat_conversations=2,
                          chat_turns=3, doc_qa_questions=2)


class TtftSample(NamedTuple):
    """One prefix sent under one salt: first computed (cold), then read from the cache (warm), with new suffixes."""

    prefix_tokens: int
    cold: RequestOutput
    warm: list[RequestOutput]


@dataclass
class WorkloadRun:
    """One pass of a workload with reuse on or off."""

    workload: str
    reuse: bool
    wall_s: float
    outputs: dict[str, RequestOutput]  # request key, such as "json/turn-2" -> output
    submitted: list[list[int]]  # prompt token ids in submission order

    @property
    def prompt_tokens(self) -> int:
        return sum(len(o.prompt_token_ids) for o in self.outputs.values())

    @property
    def cached_tokens(self) -> int:
        return sum(o.metrics.cached_tokens for o in self.outputs.values())

    @property
    def requests_per_s(self) -> float:
        return len(self.outputs) / self.wall_s

    @property
    def mean_ttft_s(self) -> float:
        return statistics.fmean(o.metrics.ttft_s for o in self.outputs.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    settings = QUICK_SETTINGS if args.quick else Settings()
    command = " ".join(["python bench/bench_cache.py", *(sys.argv[1:] if argv is None else argv)])
    revision = describe_revision()  # before the run: the code the workers import
    progress(f"machine: {describe_machine()}")
    progress(f"versions: {describe_versions()}")
    load_averages = [os.getloadavg()[0]]

    cluster = disagg.launch(MODEL, 1, 1, max_seq_len=MAX_SEQ_LEN, max_batch=2, prefill_block_tokens=CHUNK_TOKENS,
                            prefill_outbox_tokens=OUTBOX_TOKENS, cache_pool_bytes=POOL_BYTES,
                            prefill_resources=WORKER, decode_resources=WORKER)
    try:
        progress("cluster ready; warming up")
        text_tokens = build_text_tokens(cluster.tokenizer, max(settings.prefix_lengths))
        measure_prefix(cluster, text_tokens[:2 * CHUNK_TOKENS], suffixes(cluster.tokenizer, settings, start=10_000),
                       num_warm=1)
        samples = bench_ttft(cluster, text_tokens, settings)
        chat_runs = [run_workload(cluster, "chat", settings, reuse) for reuse in (False, True)]
        doc_qa_runs = [run_workload(cluster, "doc-QA", settings, reuse) for reuse in (True, False)]
        cache_stats = cluster.stats()["cache"]
    finally:
        cluster.shutdown()
    load_averages.append(os.getloadavg()[0])

    body = render_report(command, revision, args.quick, settings, samples, chat_runs, doc_qa_runs, cache_stats,
                         load_averages)
    print(body)
    if args.quick:
        progress("--quick: results printed only, docs/benchmarks.md left unchanged")
    else:
        write_section(SECTION, body)
        progress(f"wrote section {SECTION!r} of docs/benchmarks.md")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="prefixes of 256 and 1,024 tokens only and smaller workloads; prints the results "
                             "and leaves docs/benchmarks.md unchanged")
    return parser.parse_args(argv)


def new_salt() -> str:
    """Return a cache salt no other request uses, so the request shares no cached chunk."""
    return f"bench-cache-{uuid.uuid4().hex}"


# ----- TTFT with the prefix cached or computed ------------------------------


def build_text_tokens(tokenizer, num_tokens: int) -> list[int]:
    """Return at least ``num_tokens`` token ids of standard-library docstrings joined by blank lines.

    Raises ``RuntimeError`` when the docstrings are too short, as under ``python -OO``.
    """
    token_ids: list[int] = []
    for name in TEXT_MODULES:
        try:
            docstring = inspect.getdoc(importlib.import_module(name)) or ""
        except ImportError:
            continue
        token_ids += tokenizer("\n\n" + docstring if token_ids else docstring, add_special_tokens=False)["input_ids"]
        if len(token_ids) >= num_tokens:
            return token_ids
    raise RuntimeError(f"the docstrings of {len(TEXT_MODULES)} modules have {len(token_ids)} tokens, fewer than "
                       f"{num_tokens}. Python started with -OO strips them.")


def suffixes(tokenizer, settings: Settings, start: int = 0) -> Iterator[list[int]]:
    """Yield distinct question suffixes of exactly ``settings.suffix_tokens`` tokens."""
    number = start
    while True:
        text = f"\n\nQuestion {number}: in one line, what does the text above say about item {number}?"
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:settings.suffix_tokens]
        if len(token_ids) < settings.suffix_tokens:
            raise RuntimeError(f"suffix {text!r} has fewer than {settings.suffix_tokens} tokens")
        yield token_ids
        number += 1


def measure_prefix(cluster, prefix: list[int], suffix_source: Iterator[list[int]], num_warm: int) -> TtftSample:
    """Send the prefix with one suffix under a fresh salt, wait until its chunks are indexed, then with others.

    Each warm request gets its own suffix, as distinct questions about one document would.
    """
    params = disagg.SamplingParams(max_tokens=1, temperature=0.0)
    salt = new_salt()
    indexed_before = cluster.stats()["coordinator"]["indexed_chunks"]
    cold = cluster.generate(prefix + next(suffix_source), params, cache_salt=salt)[0]
    wait_until_indexed(cluster, indexed_before + len(cold.prompt_token_ids) // CHUNK_TOKENS)
    warm = [cluster.generate(prefix + next(suffix_source), params, cache_salt=salt)[0] for _ in range(num_warm)]
    return TtftSample(len(prefix), cold, warm)


def wait_until_indexed(cluster, num_chunks: int) -> None:
    """Wait until the coordinator indexes ``num_chunks`` chunks; warn and go on after ``INDEX_TIMEOUT_S``.

    The prefill worker has the pool store a prompt's chunks after the first
    token, and the pool reports them to the coordinator every 50 ms.
    """
    deadline = time.monotonic() + INDEX_TIMEOUT_S
    while (indexed := cluster.stats()["coordinator"]["indexed_chunks"]) < num_chunks:
        if time.monotonic() > deadline:
            progress(f"WARNING: {indexed} chunks indexed after {INDEX_TIMEOUT_S:.0f} s, expected {num_chunks}; "
                     "the warm request may miss")
            return
        time.sleep(0.05)


def bench_ttft(cluster, text_tokens: list[int], settings: Settings) -> list[TtftSample]:
    """Measure cold and warm TTFT, cycling through the prefix lengths so that load drift falls on each."""
    suffix_source = suffixes(cluster.tokenizer, settings)
    samples = []
    for repeat in range(settings.short_prefix_repeats):
        for length in settings.prefix_lengths:
            if repeat > 0 and length > 1024:
                continue
            sample = measure_prefix(cluster, text_tokens[:length], suffix_source, settings.warm_per_cold)
            warm = ", ".join(f"{o.metrics.ttft_s:.3f}" for o in sample.warm)
            progress(f"TTFT {length}-token prefix: cold {sample.cold.metrics.ttft_s:.2f} s, warm {warm} s, "
                     f"{sample.warm[0].metrics.cached_tokens} tokens cached")
            samples.append(sample)
    return samples


def expected_cached_tokens(num_prompt_tokens: int) -> int:
    """Return the tokens a warm request can load: whole chunks that end before its last token."""
    return (num_prompt_tokens - 1) // CHUNK_TOKENS * CHUNK_TOKENS


# ----- workloads --------------------------------------------------------------


def run_workload(cluster, workload: str, settings: Settings, reuse: bool) -> WorkloadRun:
    """Run one workload. With ``reuse`` every request gets the run's salt, without it a fresh salt each."""
    run_salt = new_salt()
    salt_for = (lambda: run_salt) if reuse else new_salt
    progress(f"{workload} workload, reuse {'on' if reuse else 'off'}")
    runner = run_chat if workload == "chat" else run_doc_qa
    started = time.perf_counter()
    outputs, submitted = asyncio.run(runner(cluster, settings, salt_for))
    run = WorkloadRun(workload, reuse, time.perf_counter() - started, outputs, submitted)
    progress(f"{workload}, reuse {'on' if reuse else 'off'}: {len(outputs)} requests in {run.wall_s:.1f} s, "
             f"{run.cached_tokens} of {run.prompt_tokens} prompt tokens from the cache")
    return run


async def run_chat(cluster, settings: Settings, salt_for: Callable[[], str]):
    """Hold ``chat_conversations`` conversations at once, each turn resending the whole history.

    The first user message contains one module's docstring and a question, later
    ones a question only, and the model's own answers go into the history.
    """
    params = disagg.SamplingParams(max_tokens=settings.answer_tokens, temperature=0.0)
    documents = load_documents(DOC_CHARS)[:settings.chat_conversations]
    outputs: dict[str, RequestOutput] = {}
    submitted: list[list[int]] = []

    async def converse(document) -> None:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for turn in range(settings.chat_turns):
            question = QUESTION_TEMPLATES[turn % len(QUESTION_TEMPLATES)].format(module=document.module)
            if turn == 0:
                question = f"Here is the documentation of the Python `{document.module}` module.\n\n" \
                           f"<document>\n{document.text}\n</document>\n\n{question}"
            messages.append({"role": "user", "content": question})
            token_ids = encode_prompt(messages, cluster.tokenizer)
            submitted.append(token_ids)
            output = (await cluster.generate_async(token_ids, params, cache_salt=salt_for()))[0]
            outputs[f"{document.module}/turn-{turn + 1}"] = output
            # An empty answer would be an invalid chat message, so both runs replace it with the same text.
            messages.append({"role": "assistant", "content": output.text or "(no answer)"})

    await asyncio.gather(*(converse(document) for document in documents))
    return outputs, submitted


async def run_doc_qa(cluster, settings: Settings, salt_for: Callable[[], str]):
    """Send ``build_doc_qa_prompts`` requests in order, ``concurrency`` at a time.

    Request i asks about document i % D, so the questions about one document
    are D requests apart. Each prompt puts the document before the question.
    """
    params = disagg.SamplingParams(max_tokens=settings.answer_tokens, temperature=0.0)
    num_documents = len(load_documents(DOC_CHARS))
    questions = build_doc_qa_prompts(num_documents * settings.doc_qa_questions, max_doc_chars=DOC_CHARS)
    prompts = [encode_prompt(q.messages, cluster.tokenizer) for q in questions]
    semaphore = asyncio.Semaphore(settings.concurrency)
    outputs: dict[str, RequestOutput] = {}
    submitted: list[list[int]] = []

    async def ask(index: int) -> None:
        async with semaphore:
            submitted.append(prompts[index])
            output = (await cluster.generate_async(prompts[index], params, cache_salt=salt_for()))[0]
            outputs[f"{index}/{questions[index].module}"] = output

    await asyncio.gather(*(ask(index) for index in range(len(prompts))))
    return outputs, submitted


def reusable_tokens(submitted: list[list[int]]) -> int:
    """Return the tokens a perfect cache of unbounded size would serve for prompts sent in this order.

    Each prompt can load the whole chunks it shares with an earlier prompt,
    up to but not including its last token. Requests still in flight when a
    later one looks up are counted as stored, so the measured figure can fall
    below this bound.
    """
    total = 0
    for index, prompt in enumerate(submitted):
        shared = max((_common_prefix_len(prompt, earlier) for earlier in submitted[:index]), default=0)
        total += min(shared, len(prompt) - 1) // CHUNK_TOKENS * CHUNK_TOKENS
    return total


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


# ----- report -----------------------------------------------------------------


def render_report(command: str, revision: str, quick: bool, settings: Settings, samples: list[TtftSample],
                  chat_runs: list[WorkloadRun], doc_qa_runs: list[WorkloadRun], cache_stats: dict,
                  load_averages: list[float]) -> str:
    parts = [
        "## Prefix cache",
        "",
        f"- Command: `{command.strip()}`" + (" (quick run, not comparable)" if quick else ""),
        f"- Date: {utc_date()}",
        f"- Machine: {describe_machine()}; 1-minute load average {load_averages[0]:.1f} at the start, "
        f"{load_averages[1]:.1f} at the end",
        f"- Versions: {describe_versions()}",
        f"- Commit: {revision} when the run started",
        f"- Cluster: {MODEL}, float32, NIXL transport, 1 prefill + 1 decode worker, each "
        f"`WorkerResources(num_cpus=1, torch_threads=1)`, `max_seq_len={MAX_SEQ_LEN}`, `max_batch=2`, "
        f"`prefill_outbox_tokens={OUTBOX_TOKENS}`, `cache_pool_bytes={POOL_BYTES}` (1.5 GiB), chunks of "
        f"{CHUNK_TOKENS} tokens.",
        "- Every figure comes from this one run on one cluster, so the ratios compare like with like. Absolute "
        "times depend on what else the shared machine ran (see the load averages).",
        "",
    ]
    parts += render_ttft(settings, samples)
    parts += render_workloads(settings, chat_runs, doc_qa_runs)
    parts += ["", f"Pool counters at the end of the run: {cache_stats['hits']} chunks pinned for a READ, "
              f"{cache_stats['evictions']} evictions, {cache_stats['chunks']} chunks stored "
              f"({cache_stats['pool_bytes_used'] / 2**30:.2f} of {cache_stats['pool_bytes_total'] / 2**30:.2f} GiB)."]
    return "\n".join(parts)


def render_ttft(settings: Settings, samples: list[TtftSample]) -> list[str]:
    rows, verdicts = [], []
    for length in settings.prefix_lengths:
        measured = [sample for sample in samples if sample.prefix_tokens == length]
        colds = [sample.cold.metrics for sample in measured]
        warms = [output.metrics for sample in measured for output in sample.warm]
        cold, warm = median([m.ttft_s for m in colds]), median([m.ttft_s for m in warms])
        num_prompt = len(measured[0].cold.prompt_token_ids)
        rows.append([
            length, num_prompt, f"{len(colds)} / {len(warms)}", f"{cold:.2f}", f"**{warm:.3f}**",
            f"{min(m.ttft_s for m in warms):.3f}-{max(m.ttft_s for m in warms):.3f}", f"**{cold / warm:.1f}x**",
            ", ".join(map(str, sorted({m.cached_tokens for m in warms}))), expected_cached_tokens(num_prompt),
            f"{median([m.prefill_s for m in colds]):.2f}", f"{median([m.prefill_s for m in warms]):.3f}",
            f"{median([m.ttft_s - m.prefill_s for m in warms]):.3f}",
        ])
        if length >= TARGET_MIN_PREFIX_TOKENS:
            met = cold / warm >= TARGET_SPEEDUP
            verdicts.append(f"{length} tokens {cold / warm:.1f}x ({'met' if met else '**missed**'})")
    verdict = "; ".join(verdicts) if verdicts else "not measured (no prefix of 4,096 tokens or more in this run)"
    return [
        f"### TTFT with the prefix cached or recomputed ({settings.suffix_tokens}-token suffix, `max_tokens=1`)",
        "",
        markdown_table(["prefix tokens", "prompt tokens", "cold / warm requests", "cold TTFT s", "warm TTFT s",
                        "warm TTFT range s", "cold / warm", "cached tokens", "expected cached", "cold forward s",
                        "warm forward s", "warm TTFT - forward s"], rows),
        "",
        f"Target: from {TARGET_MIN_PREFIX_TOKENS:,} prefix tokens up, warm TTFT at most 1/{TARGET_SPEEDUP:.0f} of "
        f"cold: {verdict}.",
        "",
        "Each cold request sends the prefix plus one suffix under a fresh `cache_salt`, so nothing is cached and "
        "the whole prompt is computed. After the coordinator has indexed its stored chunks, "
        f"{settings.warm_per_cold} warm requests send the prefix plus other suffixes under the same salt. "
        "Figures are medians over the requests. Forward s is the prefill worker's forward pass "
        "(`metrics.prefill_s`), which includes appending the new KV to the loaded prefix. Warm TTFT minus "
        "forward is the rest of the first-token path: routing, the cache lookup, pinning, the NIXL READ of the "
        "cached chunks into the outbox, copying them out of the outbox blocks into per-layer tensors, writing the "
        "new KV and the replies. Only whole chunks that end before the last prompt token are loaded, so a warm "
        "request recomputes up to one chunk plus the suffix.",
        "",
    ]


def render_workloads(settings: Settings, chat_runs: list[WorkloadRun], doc_qa_runs: list[WorkloadRun]) -> list[str]:
    rows, lines = [], []
    for runs in (chat_runs, doc_qa_runs):
        off, on = sorted(runs, key=lambda r: r.reuse)
        rows += [_workload_row(off), _workload_row(on)]
        same = sum(on.outputs[key].token_ids == off.outputs[key].token_ids for key in on.outputs)
        lines.append(
            f"- {on.workload}: reuse on took {on.wall_s / off.wall_s:.2f}x the wall time of reuse off "
            f"({off.requests_per_s:.3f} -> {on.requests_per_s:.3f} requests/s), and mean TTFT went from "
            f"{off.mean_ttft_s:.2f} s to {on.mean_ttft_s:.2f} s. {same} of {len(on.outputs)} requests produced "
            "the same tokens with reuse on and off (greedy).")
    chat_keys = f"{settings.chat_conversations} conversations x {settings.chat_turns} turns"
    return [
        f"### Workloads ({settings.answer_tokens} new tokens per request, greedy, {settings.concurrency} "
        "requests in flight)",
        "",
        markdown_table(["workload", "reuse", "requests", "wall s", "requests/s", "mean TTFT s", "mean forward s",
                        "prompt tokens", "from cache", "perfect-cache bound"], rows),
        "",
        *lines,
        "",
        f"Chat: {chat_keys}, held at once. The first user message contains one module's docstring (whole, up to "
        f"{DOC_CHARS} characters) and a question. Each later turn resends the system prompt, every earlier "
        "message and the model's own answers, plus a new question. Chat ran reuse off first, then on.",
        "",
        f"Document QA: `disagg.workload.build_doc_qa_prompts` over every document it loads, {settings.doc_qa_questions} "
        f"questions each, documents cut to {DOC_CHARS} characters, sent in its order (request i asks about "
        "document i % D) with a fixed number of requests in flight. Its prompt puts the system prompt and the "
        "document before the question, so the questions about one document share a prefix. It ran reuse on "
        "first, then off, the reverse of chat, so that drift in machine load does not favour one setting.",
        "",
        "Reuse on gives every request of the pass one salt; reuse off gives each request a fresh salt, so "
        "nothing hits. \"From cache\" is the share of prompt tokens loaded from the pool (`metrics.cached_tokens`). "
        "The perfect-cache bound counts, for each prompt, the whole chunks it shares with any earlier prompt, up "
        "to its last token. A request whose prefix is still being computed or stored when it looks up misses it, "
        "so the measured share can fall below the bound. Mean forward s is the prefill worker's forward pass. "
        "TTFT also contains the wait for the one prefill worker, which the other requests in flight occupy.",
    ]


def _workload_row(run: WorkloadRun) -> list[object]:
    outputs = list(run.outputs.values())
    bound = reusable_tokens(run.submitted) if run.reuse else 0
    return [
        run.workload,
        "on" if run.reuse else "off (salt per request)",
        len(outputs),
        f"{run.wall_s:.1f}",
        f"**{run.requests_per_s:.3f}**",
        f"**{run.mean_ttft_s:.2f}**",
        f"{statistics.fmean(o.metrics.prefill_s for o in outputs):.2f}",
        run.prompt_tokens,
        f"{run.cached_tokens / run.prompt_tokens:.1%}",
        f"{bound / run.prompt_tokens:.1%}",
    ]


if __name__ == "__main__":
    sys.exit(main())
