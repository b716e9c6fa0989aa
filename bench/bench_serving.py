"""Serving benchmark: decode batching and end-to-end latency of a disagg cluster on SmolLM2.

Run from the repository root, inside a loopback-only network namespace
(``make bench`` arranges that)::

    python bench/bench_serving.py [--model smollm2-135m-instruct] [--transport nixl] [--quick]

One run starts a cluster of 1 prefill and 1 decode worker, each on 1 CPU and
1 torch thread, and measures:

1. decode batching: decode tokens/s of 8 concurrent sequences against the
   same prompts sent one at a time, and the same two batch sizes on the
   model alone in this process;
2. end-to-end latency: one long prompt through the cluster against
   transformers ``generate`` in this process on the same number of threads;
3. the same latency over the other transport, on a second cluster.

Compared measurements alternate: one prompt alone, then all of them at
once, and the baseline, then the cluster. Load from other processes on a
shared machine thus falls on both sides, and each figure is a median.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace

import torch
from common import (
    LoadMonitor,
    cpu_percent_between,
    cpu_seconds_by_process,
    describe_machine,
    describe_revision,
    describe_versions,
    markdown_table,
    median,
    progress,
    utc_date,
    write_section,
)
from serving_runs import (
    BaselineRun,
    ClusterRun,
    DecodeRun,
    ModelStepRun,
    build_prompts,
    load_baseline_model,
    load_step_runner,
    run_baseline,
    run_cluster_once,
    run_decode_batch,
    run_decode_one_at_a_time,
    run_model_steps,
)

import disagg
from disagg.config import WorkerResources
from disagg.model.runner import load_tokenizer
from disagg.model.sources import resolve_model

SECTION = "serving"

# The targets were set for 1 prefill and 1 decode worker on 2 cores, so each
# worker gets 1 CPU and 1 torch thread. The in-process baseline gets the same 1 thread.
WORKER_THREADS = 1
TARGET_BATCH_SPEEDUP = 3.0  # 8 concurrent sequences against 1, in decode tokens/s
TARGET_LATENCY_RATIO = 1.3  # cluster end-to-end time against in-process generate
IDLE_SAMPLE_S = 3.0


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run."""

    batch_size: int = 8
    short_prompt_tokens: int = 64
    batch_new_tokens: int = 64
    long_prompt_tokens: int = 1000
    long_new_tokens: int = 32
    repeats: int = 3  # latency runs of each kind
    decode_rounds: int = 8  # each round sends one prompt alone, then all of them at once
    model_steps_per_round: int = 16

    @property
    def max_seq_len(self) -> int:
        needed = max(self.short_prompt_tokens + self.batch_new_tokens,
                     self.long_prompt_tokens + self.long_new_tokens)
        return (needed + 127) // 128 * 128


QUICK_SETTINGS = Settings(batch_size=8, short_prompt_tokens=64, batch_new_tokens=16, long_prompt_tokens=256,
                          long_new_tokens=8, repeats=1, decode_rounds=2, model_steps_per_round=4)


@dataclass
class Results:
    """Everything one run measured, for the report."""

    load: LoadMonitor
    decode_runs: dict[int, list[DecodeRun]] = field(default_factory=dict)  # concurrent sequences -> runs
    model_step_runs: dict[int, list[ModelStepRun]] = field(default_factory=dict)  # batch size -> runs
    latency_runs: list[tuple[str, list[BaselineRun], list[ClusterRun]]] = field(default_factory=list)
    idle_cpu_percent: dict[str, float] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    settings = QUICK_SETTINGS if args.quick else Settings()
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats)
    command = " ".join(["python bench/bench_serving.py", *(sys.argv[1:] if argv is None else argv)])

    progress(f"machine: {describe_machine()}")
    progress(f"versions: {describe_versions()}")
    results = Results(load=LoadMonitor())
    try:
        run_benchmarks(args, settings, results)
    finally:
        results.load.close()

    body = render_report(command, settings, args.quick, results)
    print(body)
    if args.quick:
        progress("--quick: results printed only, docs/benchmarks.md left unchanged")
    else:
        write_section(SECTION, body)
        progress(f"wrote section {SECTION!r} of docs/benchmarks.md")
    return 0


def run_benchmarks(args: argparse.Namespace, settings: Settings, results: Results) -> None:
    """Run every measurement into ``results``: both tests on the first cluster, then latency on the second."""
    resolved = resolve_model(args.model)
    prompts = build_prompts(load_tokenizer(resolved), settings.batch_size, settings.short_prompt_tokens,
                            settings.long_prompt_tokens)
    torch.set_num_threads(WORKER_THREADS)
    baseline_model = load_baseline_model(resolved.path)
    step_runner = load_step_runner(args.model, settings.batch_size, settings.max_seq_len)

    transports = [args.transport]
    if not args.one_transport:
        transports.append("object_store" if args.transport == "nixl" else "nixl")
    for index, transport in enumerate(transports):
        cluster = launch_cluster(args.model, transport, settings)
        try:
            if index == 0:
                results.idle_cpu_percent = measure_idle_cpu()
                results.decode_runs, results.model_step_runs = bench_decode_batching(
                    cluster, step_runner, prompts.short, settings)
            baseline_runs, cluster_runs = bench_latency(cluster, baseline_model, prompts.long, settings)
            results.latency_runs.append((transport, baseline_runs, cluster_runs))
        finally:
            cluster.shutdown()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model name or checkpoint path, as disagg.launch takes it "
                             "(default: %(default)s)")
    parser.add_argument("--transport", default="nixl", choices=("nixl", "object_store"),
                        help="KV transport of the first cluster, which runs every measurement "
                             "(default: %(default)s)")
    parser.add_argument("--one-transport", action="store_true",
                        help="skip the second cluster, which repeats the latency test over the other "
                             "transport")
    parser.add_argument("--repeats", type=int, default=None,
                        help="latency runs of each kind, of which the median is reported (default: 3, "
                             "or 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="2 decode rounds of 16 new tokens and 1 latency run of a 256-token prompt, "
                             "to check that the benchmark works. The results are printed but not "
                             "written to docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats={args.repeats} is invalid: it must be >= 1")
    return args


def launch_cluster(model: str, transport: str, settings: Settings):
    progress(f"starting a cluster: 1 prefill + 1 decode worker, transport {transport}")
    resources = WorkerResources(num_cpus=1, torch_threads=WORKER_THREADS)
    return disagg.launch(model=model, prefill_replicas=1, decode_replicas=1, transport=transport,
                         max_seq_len=settings.max_seq_len, max_batch=settings.batch_size,
                         prefill_resources=resources, decode_resources=resources)


def measure_idle_cpu(duration_s: float = IDLE_SAMPLE_S) -> dict[str, float]:
    """Return the CPU use of each process of the idle cluster over ``duration_s``, in % of one core."""
    before = cpu_seconds_by_process()
    time.sleep(duration_s)
    usage = cpu_percent_between(before, cpu_seconds_by_process(), duration_s)
    progress("idle CPU, in % of one core: " + ", ".join(f"{n} {p:.1f}" for n, p in usage.items()))
    return usage


def bench_decode_batching(cluster, step_runner, short_prompts: list[list[int]], settings: Settings):
    """Run decode rounds over the same prompts, after one warm-up of each kind of run.

    Round i sends prompt ``i % len(short_prompts)`` alone, then every prompt
    at once, then times decode steps of the model alone in this process
    (``step_runner``) at batch 1 and at the full batch while the cluster is
    idle. Returns the cluster runs and the model runs, each keyed by the
    number of sequences.
    """
    params = disagg.SamplingParams(max_tokens=settings.batch_new_tokens, temperature=0.0, ignore_eos=True)
    last_tokens = [prompt[-1] for prompt in short_prompts]
    # Model steps run at the positions of the middle of the cluster's decode.
    num_model_steps = settings.model_steps_per_round
    first_position = settings.short_prompt_tokens + (settings.batch_new_tokens - num_model_steps) // 2
    progress("decode batching: warm-up")
    run_decode_one_at_a_time(cluster, short_prompts[:1], params)
    run_decode_batch(cluster, short_prompts, params)
    run_model_steps(*step_runner, last_tokens, first_position, 2)

    batch_size = len(short_prompts)
    runs: dict[int, list[DecodeRun]] = {1: [], batch_size: []}
    model_runs: dict[int, list[ModelStepRun]] = {1: [], batch_size: []}
    for index in range(settings.decode_rounds):
        runs[1].append(run_decode_one_at_a_time(cluster, [short_prompts[index % batch_size]], params))
        runs[batch_size].append(run_decode_batch(cluster, short_prompts, params))
        single, batched = run_model_steps(*step_runner, last_tokens, first_position, num_model_steps)
        model_runs[1].append(single)
        model_runs[batch_size].append(batched)
        progress(f"decode round {index + 1}/{settings.decode_rounds}, 1 / {batch_size} sequences: "
                 f"cluster {runs[1][-1].tokens_per_s:.1f} / {runs[batch_size][-1].tokens_per_s:.1f} tok/s, "
                 f"model alone {single.tokens_per_s:.1f} / {batched.tokens_per_s:.1f} tok/s")
    return runs, model_runs


def bench_latency(cluster, baseline_model, long_prompt: list[int], settings: Settings):
    """Alternate in-process ``generate`` and cluster runs of one long prompt, after one warm-up of each."""
    params = disagg.SamplingParams(max_tokens=settings.long_new_tokens, temperature=0.0, ignore_eos=True)
    progress(f"latency over {cluster.transport}: warm-up")
    run_baseline(baseline_model, long_prompt, settings.long_new_tokens)
    run_cluster_once(cluster, long_prompt, params)

    baseline_runs, cluster_runs = [], []
    for repeat in range(settings.repeats):
        baseline_runs.append(run_baseline(baseline_model, long_prompt, settings.long_new_tokens))
        cluster_runs.append(run_cluster_once(cluster, long_prompt, params))
        progress(f"latency over {cluster.transport} {repeat + 1}/{settings.repeats}: "
                 f"in-process {baseline_runs[-1].wall_s:.2f} s, cluster {cluster_runs[-1].wall_s:.2f} s")
    return baseline_runs, cluster_runs


# ----- report ---------------------------------------------------------------


def render_report(command: str, settings: Settings, quick: bool, results: Results) -> str:
    parts = [
        "## Serving benchmark results",
        "",
        f"- Command: `{command.strip()}`" + (" (quick run, not comparable)" if quick else ""),
        f"- Date: {utc_date()}",
        f"- Machine: {describe_machine()}",
        f"- Load: {results.load.describe()}",
        f"- Versions: {describe_versions()}",
        f"- Commit: {describe_revision()}",
        f"- Cluster: 1 prefill + 1 decode worker, each "
        f"`WorkerResources(num_cpus=1, torch_threads={WORKER_THREADS})`. The in-process baseline runs on "
        f"{WORKER_THREADS} torch thread. Float32, greedy, `ignore_eos=True`.",
        "- KV chunk cache: the `disagg.launch` default, which is on with NIXL and off with the object store. "
        "Each request gets its own `cache_salt`, so every prefill computes the whole prompt.",
        f"- Each decode figure is the median of {_count(settings.decode_rounds, 'round')}, and each latency "
        f"figure the median of {_count(settings.repeats, 'run')}. Runs that are compared alternate, and "
        "model-alone steps alternate step by step.",
        "",
    ]
    parts += render_decode(settings, results.decode_runs, results.model_step_runs)
    parts += render_latency(settings, results.latency_runs)
    busy = {name: percent for name, percent in results.idle_cpu_percent.items() if percent >= 0.5}
    if busy:
        listed = ", ".join(f"{name} {percent:.0f}%" for name, percent in busy.items())
        parts += ["", f"CPU use of the idle cluster over {IDLE_SAMPLE_S:.0f} s, in % of one core: {listed}."]
    return "\n".join(parts)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def render_decode(settings: Settings, decode_runs: dict[int, list[DecodeRun]],
                  model_step_runs: dict[int, list[ModelStepRun]]) -> list[str]:
    rows = [_decode_row(num_sequences, runs) for num_sequences, runs in decode_runs.items()]
    single, batched = decode_runs[1], decode_runs[settings.batch_size]
    speedup = median([r.tokens_per_s for r in batched]) / median([r.tokens_per_s for r in single])
    verdict = "met" if speedup >= TARGET_BATCH_SPEEDUP else "**missed**"
    lines = [
        f"### Decode batching ({settings.short_prompt_tokens}-token prompts, "
        f"{settings.batch_new_tokens} new tokens)",
        "",
        markdown_table(["sequences", "decode tokens per run", "decode window s", "ms per step", "mean batch",
                        "decode tok/s", "each run, decode tok/s"], rows),
        "",
        f"{settings.batch_size} concurrent sequences decode **{speedup:.2f}x** the tokens/s of one "
        f"(target >= {TARGET_BATCH_SPEEDUP:.0f}x: {verdict}).",
    ]
    lines += ["", *_decode_breakdown(settings.batch_size, decode_runs, model_step_runs)]
    lines += ["", _cpu_line(single, batched, settings.batch_size), ""]
    return lines


def _decode_breakdown(batch_size: int, decode_runs: dict[int, list[DecodeRun]],
                      model_step_runs: dict[int, list[ModelStepRun]]) -> list[str]:
    """Tabulate the batching gain from the model alone, to the cluster at full batch, to the decode window."""
    single_rate = median([r.tokens_per_s for r in decode_runs[1]])
    model_single, model_batched = model_step_runs[1], model_step_runs[batch_size]
    model_single_rate = median([r.tokens_per_s for r in model_single])
    model_batched_rate = median([r.tokens_per_s for r in model_batched])
    rows = [["model alone in this process: `ModelRunner.decode_step`, no Ray",
             f"{median([r.step_ms for r in model_single]):.1f}", f"{model_single_rate:.1f}",
             f"{median([r.step_ms for r in model_batched]):.1f}", f"{model_batched_rate:.1f}",
             f"{model_batched_rate / model_single_rate:.2f}x"]]

    steady = [r.steady_tokens_per_s for r in decode_runs[batch_size] if r.steady_tokens_per_s is not None]
    if steady:
        steady_rate = median(steady)
        rows.append([f"cluster while all {batch_size} sequences ran", f"{1e3 / single_rate:.1f}",
                     f"{single_rate:.1f}", f"{batch_size * 1e3 / steady_rate:.1f}", f"{steady_rate:.1f}",
                     f"{steady_rate / single_rate:.2f}x"])

    window_rate = median([r.tokens_per_s for r in decode_runs[batch_size]])
    rows.append([f"cluster over the decode window (mean batch "
                 f"{median([r.mean_batch for r in decode_runs[batch_size]]):.2f})",
                 f"{1e3 / single_rate:.1f}", f"{single_rate:.1f}",
                 f"{median([r.step_ms for r in decode_runs[batch_size]]):.1f}", f"{window_rate:.1f}",
                 f"{window_rate / single_rate:.2f}x"])
    return [
        "Where the batching gain goes (medians; the cluster's 1-sequence figures are the same decode "
        "window in every row):",
        "",
        markdown_table(["measurement", "1 seq ms/step", "1 seq tok/s", f"{batch_size} seq ms/step",
                        f"{batch_size} seq tok/s", "gain"], rows),
    ]


def _decode_row(num_sequences: int, runs: list[DecodeRun]) -> list[object]:
    return [
        num_sequences,
        runs[0].num_tokens,
        f"{median([r.window_s for r in runs]):.2f}",
        f"{median([r.step_ms for r in runs]):.1f}",
        f"{median([r.mean_batch for r in runs]):.2f}",
        f"**{median([r.tokens_per_s for r in runs]):.1f}**",
        ", ".join(f"{r.tokens_per_s:.1f}" for r in runs),
    ]


def _cpu_line(single: list[DecodeRun], batched: list[DecodeRun], batch_size: int) -> str:
    names = ("ray::DecodeWorker", "ray::PrefillWorker", "driver")
    shares = []
    for name in names:
        one = median([r.cpu_percent.get(name, 0.0) for r in single])
        many = median([r.cpu_percent.get(name, 0.0) for r in batched])
        shares.append(f"{name} {one:.0f}% / {many:.0f}%")
    return (f"CPU use during these runs, in % of one core (1 sequence / {batch_size} sequences, prefill "
            f"included): {', '.join(shares)}.")


def render_latency(settings: Settings, latency_runs) -> list[str]:
    rows, verdicts = [], []
    for transport, baseline_runs, cluster_runs in latency_runs:
        baseline_s = median([r.wall_s for r in baseline_runs])
        cluster_s = median([r.wall_s for r in cluster_runs])
        ratio = cluster_s / baseline_s
        same = all(c.token_ids == b.token_ids for c, b in zip(cluster_runs, baseline_runs, strict=True))
        rows.append(["transformers generate, in process", "-", f"{baseline_s:.2f}",
                     f"{median([r.ttft_s for r in baseline_runs]):.2f}",
                     f"{median([r.tpot_s for r in baseline_runs]) * 1e3:.1f}", "-", "-", "-", "1.00"])
        rows.append([f"disagg cluster{'' if same else ' (tokens differ)'}", transport, f"**{cluster_s:.2f}**",
                     f"{median([r.ttft_s for r in cluster_runs]):.2f}",
                     f"{median([r.tpot_s for r in cluster_runs]) * 1e3:.1f}",
                     f"{median([r.prefill_s for r in cluster_runs]):.2f}",
                     f"{median([r.transfer_s for r in cluster_runs]) * 1e3:.1f}",
                     f"{cluster_runs[0].transfer_bytes / 2**20:.1f}", f"**{ratio:.2f}**"])
        verdict = "met" if ratio <= TARGET_LATENCY_RATIO else "**missed**"
        verdicts.append(f"over {transport} {ratio:.2f}x ({verdict})")
    return [
        f"### End-to-end latency ({settings.long_prompt_tokens}-token prompt, "
        f"{settings.long_new_tokens} new tokens)",
        "",
        markdown_table(["path", "transport", "wall s", "TTFT s", "TPOT ms", "prefill s", "transfer ms",
                        "transfer MiB", "x in-process"], rows),
        "",
        f"Target: cluster wall time <= {TARGET_LATENCY_RATIO}x in-process `generate`, measured in the same "
        "period: " + "; ".join(verdicts) + ".",
    ]


if __name__ == "__main__":
    sys.exit(main())
