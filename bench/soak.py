"""Soak test: mixed traffic against a local cluster for a bounded time, reporting memory over time.

Run inside a loopback-only namespace, e.g.:
    scripts/netns.sh .venv/bin/python bench/soak.py --duration 120

Traffic (all to the local cluster): text, chat and token-id prompts of mixed
lengths, some sharing a long prefix (cache hits), some streamed and closed
early, some aborted. Stops after ``--duration`` seconds or ``--max-requests``
requests, whichever comes first. Every ``--sample-s`` seconds it records the
requests finished, errors by type, the summed RSS of this cluster's Ray worker
processes, and KV in use; at the end it checks that nothing is held and writes
the ``soak`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import threading
import time

import psutil
from common import (  # bench/ is on sys.path when run as a script
    describe_machine,
    describe_revision,
    describe_versions,
    markdown_table,
    progress,
    utc_date,
    write_section,
)

import disagg

SHARED_PREFIX = "You are a careful assistant. Answer in one short sentence. " * 12


def main() -> None:
    args = parse_args()
    cluster = disagg.launch(model=args.model, prefill_replicas=1, decode_replicas=1, max_seq_len=1024,
                            max_batch=8, max_queued_requests=16)
    try:
        samples, counts, errors = run(cluster, args)
        final = cluster.stats()
    finally:
        cluster.shutdown()
    report(args, samples, counts, errors, final)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llama", help="model name or path (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic (default: %(default)s)")
    parser.add_argument("--max-requests", type=int, default=5000, help="stop after this many requests")
    parser.add_argument("--concurrency", type=int, default=6, help="client threads sending at once")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    return parser.parse_args()


def run(cluster, args):
    stop = threading.Event()
    counts: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    started = time.monotonic()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            with lock:
                if counts["sent"] >= args.max_requests:
                    return
                counts["sent"] += 1
            kind = one_request(cluster, rng)
            with lock:
                if kind.startswith("error:"):
                    errors[kind[6:]] += 1
                else:
                    counts[kind] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
    for thread in threads:
        thread.start()
    samples = []
    while time.monotonic() - started < args.duration and any(t.is_alive() for t in threads):
        time.sleep(min(args.sample_s, max(0.0, args.duration - (time.monotonic() - started))))
        samples.append(sample(cluster, started, counts, errors))
        progress(f"t={samples[-1]['t_s']:.0f} s: {samples[-1]}")
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    return samples, counts, errors


def one_request(cluster, rng: random.Random) -> str:
    params = disagg.SamplingParams(max_tokens=rng.choice([4, 16, 48]), temperature=rng.choice([0.0, 0.8]),
                                   seed=rng.randrange(1000))
    choice = rng.random()
    try:
        if choice < 0.3:
            cluster.generate(SHARED_PREFIX + f"Question {rng.randrange(50)}?", params)
            return "prefix"
        if choice < 0.5:
            cluster.generate([{"role": "user", "content": f"Tell me about number {rng.randrange(100)}."}], params)
            return "chat"
        if choice < 0.65:
            cluster.generate([rng.randrange(3, 250) for _ in range(rng.randrange(1, 600))], params)
            return "token_ids"
        if choice < 0.8:
            stream = cluster.stream(f"Stream a story about {rng.randrange(100)}", params)
            next(stream, None)
            stream.close()
            return "stream_closed"
        if choice < 0.9:
            return abort_one(cluster, rng)
        cluster.generate("", params)  # invalid on purpose
        return "error:unexpected_success"
    except ValueError:
        return "invalid_rejected"
    except Exception as exc:  # noqa: BLE001 - counted by type in the report
        return f"error:{type(exc).__name__}"


def abort_one(cluster, rng: random.Random) -> str:
    request_id = f"soak-abort-{rng.randrange(10**9)}"
    params = disagg.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    timer = threading.Timer(0.2, cluster.abort, args=(request_id,))
    timer.start()
    asyncio.run(cluster.generate_async("abort me " * 10, params, request_id=request_id))
    timer.cancel()
    return "aborted"


def sample(cluster, started: float, counts, errors) -> dict:
    stats = cluster.stats()
    return {
        "t_s": time.monotonic() - started,
        "done": sum(v for k, v in counts.items() if k != "sent"),
        "errors": sum(errors.values()),
        "worker_rss_mib": worker_rss_bytes() / 2**20,
        "kv_blocks_used": stats["decode"]["kv_blocks_used"],
        "leases": stats["leases_active"],
        "cache_chunks": stats["cache"]["chunks"],
    }


def worker_rss_bytes() -> int:
    total = 0
    for process in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "ray::" in cmdline or "default_worker.py" in cmdline:
            total += process.info["memory_info"].rss
    return total


def report(args, samples, counts, errors, final) -> None:
    rows = [[f"{s['t_s']:.0f}", s["done"], s["errors"], f"{s['worker_rss_mib']:.0f}", s["kv_blocks_used"],
             s["leases"], s["cache_chunks"]] for s in samples]
    table = markdown_table(["t (s)", "requests done", "errors", "worker RSS (MiB)", "KV slots used", "leases",
                            "cached chunks"], rows)
    idle = final["decode"]["kv_blocks_used"] == 0 and final["leases_active"] == 0 and final["cache"]["pinned"] == 0
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    error_text = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none"
    print(table)
    print(f"requests by kind: {kinds}; errors: {error_text}; idle at the end: {idle}")
    if args.no_write:
        return
    body = "\n".join([
        "## Soak: mixed traffic over time",
        "",
        f"Command: `scripts/netns.sh .venv/bin/python bench/soak.py --model {args.model} "
        f"--duration {args.duration:.0f} --concurrency {args.concurrency}`",
        "",
        f"Machine: {describe_machine()}. {describe_versions()}. {describe_revision()}. Date: {utc_date()}.",
        "",
        table,
        "",
        f"Requests by kind: {kinds}. Errors: {error_text}. Nothing held at the end (KV slots, leases, pins): "
        f"{idle}.",
    ])
    write_section("soak", body)


if __name__ == "__main__":
    main()
