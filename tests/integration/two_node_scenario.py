"""Run in its own process by test_two_nodes.py: two Ray nodes on one machine.

A prefix stored by the prefill worker on one node is reused by the prefill
worker on the other node, with the chunk bytes moved by NIXL from the first
node's pool. Prints one JSON line with the facts the test checks.
"""

from __future__ import annotations

import json
import time

import ray
from ray.cluster_utils import Cluster

import disagg
from disagg.sampling import SamplingParams

CHUNK = 16


def main() -> None:
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"prefill_slot": 1}})
    nodes.add_node(num_cpus=2, resources={"prefill_slot": 1})
    ray.init(address=nodes.address, log_to_driver=False)
    cluster = disagg.launch(
        model="tiny-random-llama", prefill_replicas=2, decode_replicas=1, max_seq_len=256,
        prefill_block_tokens=CHUNK, prefill_outbox_tokens=1024, cache_pool_bytes=4 * 2**20,
        prefill_resources=disagg.WorkerResources(num_cpus=0.5, resources={"prefill_slot": 1}),
        decode_resources=disagg.WorkerResources(num_cpus=0.5),
    )
    try:
        facts = run(cluster)
    finally:
        cluster.shutdown()
        ray.shutdown()
        nodes.shutdown()
    print(json.dumps(facts))


def run(cluster) -> dict:
    prompt = [(i * 13) % 200 + 3 for i in range(4 * CHUNK + 5)]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    first = cluster.generate(prompt, params)[0]

    keys = cluster._chunk_keys(prompt, None)
    deadline = time.monotonic() + 10
    while ray.get(cluster._coordinator.lookup.remote(keys))["num_chunks"] < len(keys) and time.monotonic() < deadline:
        time.sleep(0.05)

    workers = {w: cluster._workers[w] for w in cluster._workers if cluster._kinds[w] == "prefill"}
    nodes = {w: ray.get(h.registration.remote())["node_id"] for w, h in workers.items()}
    storer = first.metrics.prefill_worker
    other = next(w for w in workers if w != storer)
    before = ray.get(workers[other].stats.remote())["nixl"]["transferred_bytes"]

    request = {"request_id": "cross-node-1", "prompt_token_ids": prompt, "params": params.to_dict(),
               "chunk_keys": keys, "cache_salt": None}
    result = ray.get(workers[other].prefill.remote(request))
    ray.get(workers[other].release.remote("cross-node-1"))
    after = ray.get(workers[other].stats.remote())["nixl"]["transferred_bytes"]

    pools = {p: ray.get(h.stats.remote()) for p, h in cluster._pools.items()}
    time.sleep(0.5)
    stats = cluster.stats()
    return {
        "distinct_nodes": len(set(nodes.values())),
        "storer_node": nodes[storer],
        "reader_node": nodes[other],
        "cached_tokens": result["cached_tokens"],
        "first_token_matches": result["first_token"] == first.token_ids[0],
        "nixl_bytes_read_by_reader": after - before,
        "pool_hits": {pools[p]["node_id"]: pools[p]["hits"] for p in pools},
        "chunk_bytes": stats["cache"]["pool_bytes_used"] // max(1, stats["cache"]["chunks"]),
        "leases_active": stats["leases_active"],
        "outbox_blocks_used": stats["prefill"]["outbox_blocks_used"],
        "pinned": stats["cache"]["pinned"],
    }


if __name__ == "__main__":
    main()
