"""Generate, stream and batch with a local disagg cluster.

Run inside a loopback-only namespace on a closed host:
    scripts/netns.sh .venv/bin/python examples/generate.py
"""

import asyncio
import logging

import disagg

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    cluster = disagg.launch(model="smollm2-135m-instruct", prefill_replicas=1, decode_replicas=1)
    try:
        greedy = disagg.SamplingParams(max_tokens=48, temperature=0.0)
        outputs = cluster.generate(
            [
                "The three laws of thermodynamics are",
                [{"role": "user", "content": "Give me one tip for writing clear Python."}],
            ],
            greedy,
        )
        for output in outputs:
            print(f"{output.request_id}: {output.text!r} ({output.finish_reason.value}, "
                  f"TTFT {output.metrics.ttft_s:.2f} s, {output.metrics.transfer_bytes} KV bytes)")

        sampled = disagg.SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=7, stop=["\n\n"])
        print("streamed: ", end="", flush=True)
        for delta in cluster.stream([{"role": "user", "content": "Write a haiku about caches."}], sampled):
            print(delta, end="", flush=True)
        print()

        more = asyncio.run(cluster.generate_async(["Ray actors are", "NIXL moves"], greedy))
        print([o.text for o in more])
        print(cluster.stats()["transfers"])
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
