"""The ``disagg`` command line.

``disagg demo`` starts a small cluster, sends a document-QA workload built from
standard-library docstrings as one concurrent batch, prints every question
with its answer and a per-request table of latency and KV transfer figures,
and can write that table as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import disagg
from disagg.errors import RequestFailedError
from disagg.outputs import RequestOutput
from disagg.sampling import SamplingParams
from disagg.workload import MIN_DOC_CHARS_BUDGET, DocQuestion, build_doc_qa_prompts

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOGGED_PACKAGES = ("disagg", "actors")

# Exit status for an invalid option, as argparse uses for its own errors.
EXIT_USAGE = 2
# Exit status for a request that failed or timed out on a worker.
EXIT_FAILURE = 1


def main(argv: list[str] | None = None) -> int:
    """Run the ``disagg`` command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    argparse errors and ``--help`` raise ``SystemExit`` as usual. A
    ``ValueError`` raised for an invalid setting is printed as one line and
    returns 2, and a request that failed or timed out on a worker returns 1.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    try:
        return args.run(args)
    except ValueError as exc:
        print(f"disagg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RequestFailedError, TimeoutError) as exc:
        print(f"disagg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg",
        description="Disaggregated LLM serving on Ray: prefill and decode workers with KV moved by NIXL.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo_parser(commands)
    return parser


def _add_demo_parser(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="run a document-QA workload on a local cluster and print answers and per-request metrics",
        description=(
            "Start prefill and decode workers on a local Ray instance (or the cluster named by RAY_ADDRESS), "
            "ask questions about the docstrings of Python standard-library modules, all at once, and print "
            "each answer and a table of TTFT, TPOT, throughput and KV bytes moved. Decoding is greedy."
        ),
    )
    demo.add_argument("--model", default=DEFAULT_MODEL,
                      help="model to serve: smollm2-135m-instruct, tiny-random-llama, a .gguf file or a "
                           "transformers checkpoint directory (default: %(default)s)")
    demo.add_argument("--transport", choices=("nixl", "object_store"), default="nixl",
                      help="how decode workers pull KV from prefill workers; nixl falls back to object_store "
                           "with a warning when NIXL cannot load (default: %(default)s)")
    demo.add_argument("--requests", type=_positive_int, default=8, metavar="N",
                      help="number of questions sent concurrently (default: %(default)s)")
    demo.add_argument("--max-tokens", type=_positive_int, default=64, metavar="N",
                      help="maximum output tokens per answer (default: %(default)s)")
    demo.add_argument("--max-doc-chars", type=_positive_int, default=1500, metavar="N",
                      help="maximum characters of each document put in a prompt, at least "
                           f"{MIN_DOC_CHARS_BUDGET} (default: %(default)s)")
    demo.add_argument("--max-seq-len", type=_positive_int, default=2048, metavar="N",
                      help="maximum prompt plus output tokens of one request (default: %(default)s)")
    demo.add_argument("--prefill-replicas", type=_positive_int, default=1, metavar="N",
                      help="number of prefill workers, 1 CPU each (default: %(default)s)")
    demo.add_argument("--decode-replicas", type=_positive_int, default=1, metavar="N",
                      help="number of decode workers, 1 CPU each (default: %(default)s)")
    demo.add_argument("--json", type=Path, metavar="PATH",
                      help="also write the summary (answers, per-request metrics, totals) as JSON to this file")
    demo.set_defaults(run=run_demo)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be >= 1")
    return value


def configure_logging() -> None:
    """Show INFO records of disagg's own loggers (start-up facts) and WARNING of every other logger."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S")
    for name in LOGGED_PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO)


# ----- demo -------------------------------------------------------------------


@dataclass(frozen=True)
class DemoRow:
    """Question, answer text and metrics of one demo request."""

    module: str
    question: str
    answer: str
    request_id: str
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_ms: float
    tokens_per_s: float  # output tokens / (submit to last token)
    queue_s: float  # waiting for a prefill worker and for decode KV room
    prefill_s: float
    transfer_bytes: int  # KV bytes the decode worker pulled
    transfer_s: float
    transport: str
    finish_reason: str
    cached_tokens: int = 0  # prompt tokens loaded from the KV chunk cache


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo described by the parsed ``demo`` options and return the exit status."""
    _check_json_path(args.json)
    questions = build_doc_qa_prompts(args.requests, args.max_doc_chars)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    _progress(_starting_message(args))
    start_s = time.perf_counter()
    with disagg.launch(args.model, args.prefill_replicas, args.decode_replicas, transport=args.transport,
                       max_seq_len=args.max_seq_len) as cluster:
        _progress(f"Cluster ready in {time.perf_counter() - start_s:.1f} s (transport {cluster.transport}). "
                  f"Sending {len(questions)} questions at once...")
        first_rows, first_wall_s = _ask(cluster, questions, params)
        _progress("Asking the same questions again: their document prefixes are now in the KV chunk cache...")
        second_rows, second_wall_s = _ask(cluster, questions, params)

    summary = _summarize(args, first_rows, first_wall_s)
    summary["second_pass"] = _summarize(args, second_rows, second_wall_s)
    print("Answers (first pass):")
    _print_answers(first_rows)
    same = sum(a.answer == b.answer for a, b in zip(first_rows, second_rows, strict=True))
    print(f"\nSecond pass: {same} of {len(first_rows)} answers identical to the first pass (greedy decoding).")
    print("\nFirst pass (cold cache):")
    _print_table(first_rows, summary)
    print("\nSecond pass (same questions, prefixes cached):")
    _print_table(second_rows, summary["second_pass"])
    _print_cache_effect(summary, summary["second_pass"])
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"Wrote the summary to {args.json}")
    return 0


def _ask(cluster, questions: list[DocQuestion], params: SamplingParams) -> tuple[list[DemoRow], float]:
    start_s = time.perf_counter()
    outputs = cluster.generate([q.messages for q in questions], params)
    wall_s = time.perf_counter() - start_s
    # Chunks are stored after each first token; give the pool a moment to index them.
    time.sleep(0.5)
    return [_make_row(q, out) for q, out in zip(questions, outputs, strict=True)], wall_s


def _print_cache_effect(first: dict, second: dict) -> None:
    def mean_ttft(summary: dict) -> float:
        return sum(r["ttft_s"] for r in summary["requests"]) / max(1, len(summary["requests"]))

    prompt_tokens = sum(r["prompt_tokens"] for r in second["requests"])
    cached = sum(r["cached_tokens"] for r in second["requests"])
    print(
        f"cache: second pass loaded {cached} of {prompt_tokens} prompt tokens from the chunk cache; "
        f"mean TTFT {mean_ttft(first):.3f} s -> {mean_ttft(second):.3f} s, "
        f"wall {first['wall_s']:.2f} s -> {second['wall_s']:.2f} s"
    )


def _check_json_path(path: Path | None) -> None:
    if path is not None and not path.parent.is_dir():
        raise ValueError(f"--json {path}: directory {path.parent} not found. Create it or pick another path.")


def _starting_message(args: argparse.Namespace) -> str:
    workers = (f"{args.prefill_replicas} prefill worker{'s' * (args.prefill_replicas > 1)} and "
               f"{args.decode_replicas} decode worker{'s' * (args.decode_replicas > 1)}")
    if args.model == DEFAULT_MODEL:
        first_run = "the first run converts the model, about 30 s"
    else:
        first_run = "the first run prepares the model in the cache"
    return f"Starting {workers} for {args.model} with transport {args.transport} ({first_run})..."


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _make_row(question: DocQuestion, output: RequestOutput) -> DemoRow:
    metrics = output.metrics
    num_output = output.num_output_tokens
    # ttft_s ends at the first token and tpot_s averages the gaps after it,
    # so their sum below is the time from submit to the last token.
    latency_s = metrics.ttft_s + metrics.tpot_s * max(0, num_output - 1)
    return DemoRow(
        module=question.module,
        question=question.question,
        answer=output.text,
        request_id=output.request_id,
        prompt_tokens=len(output.prompt_token_ids),
        output_tokens=num_output,
        ttft_s=metrics.ttft_s,
        tpot_ms=metrics.tpot_s * 1e3,
        tokens_per_s=num_output / latency_s if latency_s > 0 else 0.0,
        queue_s=metrics.queue_s,
        prefill_s=metrics.prefill_s,
        transfer_bytes=metrics.transfer_bytes,
        transfer_s=metrics.transfer_s,
        transport=metrics.transport,
        finish_reason=output.finish_reason.value,
        cached_tokens=metrics.cached_tokens,
    )


def _summarize(args: argparse.Namespace, rows: list[DemoRow], wall_s: float) -> dict:
    num_output = sum(row.output_tokens for row in rows)
    return {
        "model": args.model,
        "transport": rows[0].transport,
        "prefill_replicas": args.prefill_replicas,
        "decode_replicas": args.decode_replicas,
        "max_tokens": args.max_tokens,
        "num_requests": len(rows),
        "wall_s": wall_s,
        "output_tokens": num_output,
        "output_tokens_per_s": num_output / wall_s if wall_s > 0 else 0.0,
        "transfer_bytes": sum(row.transfer_bytes for row in rows),
        "requests": [asdict(row) for row in rows],
    }


def _print_answers(rows: list[DemoRow]) -> None:
    for index, row in enumerate(rows, start=1):
        print(f"\n[{index}/{len(rows)}] {row.module}: {row.question}")
        answer = row.answer.strip() or "(empty answer)"
        for paragraph in answer.splitlines():
            print(textwrap.fill(paragraph, width=100, initial_indent="    ", subsequent_indent="    "))


_TABLE_COLUMNS = (
    # header, width, format of one cell; text columns are left-aligned, numbers right-aligned
    ("#", 3, "{index}"),
    ("module", 11, "{row.module:<11}"),
    ("prompt tok", 10, "{row.prompt_tokens}"),
    ("out tok", 7, "{row.output_tokens}"),
    ("TTFT s", 7, "{row.ttft_s:.3f}"),
    ("TPOT ms", 7, "{row.tpot_ms:.1f}"),
    ("tok/s", 6, "{row.tokens_per_s:.1f}"),
    ("cached", 6, "{row.cached_tokens}"),
    ("KV MiB", 7, "{kv_mib:.2f}"),
    ("transport", 12, "{row.transport:<12}"),
    ("finish", 6, "{row.finish_reason:<6}"),
)


def _print_table(rows: list[DemoRow], summary: dict) -> None:
    print()
    print("  ".join(_align_header(header, width, cell) for header, width, cell in _TABLE_COLUMNS).rstrip())
    for index, row in enumerate(rows, start=1):
        cells = (cell.format(index=index, row=row, kv_mib=row.transfer_bytes / 2**20)
                 for _, _, cell in _TABLE_COLUMNS)
        line = "  ".join(text.rjust(width) for text, (_, width, _) in zip(cells, _TABLE_COLUMNS, strict=True))
        print(line.rstrip())
    print(
        f"total: {summary['num_requests']} requests, {summary['output_tokens']} output tokens in "
        f"{summary['wall_s']:.2f} s wall, {summary['output_tokens_per_s']:.1f} output tokens/s, "
        f"{summary['transfer_bytes'] / 2**20:.2f} MiB of KV moved by {summary['transport']}"
    )


def _align_header(header: str, width: int, cell: str) -> str:
    return header.ljust(width) if ":<" in cell else header.rjust(width)
