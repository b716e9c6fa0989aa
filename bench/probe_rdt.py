"""Probe Ray Direct Transport (RDT) over NIXL for disagg's prefill-to-decode KV pull.

Compares, inside one local Ray instance with two CPU actors per path:

* RDT: the producer returns KV tensors from an ``@ray.method(tensor_transport="nixl")``
  method, the driver passes the ref on to the consumer, and the consumer pulls
  with ``ray.experimental.set_target_for_ref`` + ``ray.get`` into its arena;
* the object store: a plain actor method, ``ray.get`` and a copy into the arena;
* disagg's direct path: ``NixlEndpoint.read`` of the same bytes, region by
  region, with a msgpack ``ReleaseNotice`` as the READ's notification.

It also checks what RDT does with a strided target, refs inside containers,
a ref passed as a top-level argument, a producer killed before the pull, and
``wait_tensor_freed``. Prints a results table; writes nothing.

Run it in a loopback-only network namespace (for example with a
``netns-run`` wrapper around ``unshare --net``), because Ray contacts outside
addresses at start-up::

    netns-run .venv/bin/python bench/probe_rdt.py
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

LAYERS, HEADS, HEAD_DIM = 30, 3, 64
NUM_SLOTS, SLOT_TOKENS = 2, 1024
OBJECT_STORE_BYTES = 512 * 1024 * 1024
# Deadline for every driver-side ray.get, so that a hanging path fails the
# probe instead of blocking it. RDT's own fetch deadline is 60 s by default
# (RAY_rdt_fetch_fail_timeout_milliseconds in Ray 2.60).
GET_TIMEOUT_S = 90.0


def kv_shape(num_tokens: int) -> tuple[int, ...]:
    return (LAYERS, 2, HEADS, num_tokens, HEAD_DIM)


def per_head_views(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Split a [layers, 2, heads, tokens, dim] tensor into contiguous [tokens, dim] views."""
    return [tensor[layer, kv, head] for layer in range(LAYERS) for kv in range(2) for head in range(HEADS)]


def slot_head_views(arena: torch.Tensor, slot: int, num_tokens: int) -> list[torch.Tensor]:
    """Return contiguous [tokens, dim] views of one arena slot, in ``per_head_views`` order."""
    return [
        arena[layer, kv, slot, head, :num_tokens]
        for layer in range(LAYERS)
        for kv in range(2)
        for head in range(HEADS)
    ]


def expose_nixl_as_nixl_cu12() -> None:
    """Make ``import nixl._api`` load the installed ``nixl_cu12`` package.

    Ray 2.60's RDT imports ``nixl._api``, which only the ``nixl`` meta package
    provides. A bare ``nixl-cu12`` install ships the same module as
    ``nixl_cu12._api``, so this aliases it in the calling process.
    """
    try:
        importlib.import_module("nixl._api")
        return
    except ImportError:
        pass
    sys.modules["nixl"] = importlib.import_module("nixl_cu12")
    sys.modules["nixl._api"] = importlib.import_module("nixl_cu12._api")


def process_cpu_seconds(pid: int) -> float:
    """Return user + system CPU time of process ``pid`` from /proc, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@ray.remote(num_cpus=1, max_concurrency=2)
class RdtProducer:
    """Prefill stand-in: KV tensors returned by RDT (nixl) methods or a plain method.

    ``max_concurrency=2`` lets ``wait_freed`` block while other calls run.
    """

    def __init__(self, num_tokens: int) -> None:
        from ray.experimental import register_nixl_memory

        expose_nixl_as_nixl_cu12()
        torch.set_num_threads(1)
        self.num_tokens = num_tokens
        self.base = torch.randn(kv_shape(num_tokens))
        # A registered outbox, as in disagg: registered once, returned by view.
        self.outbox = torch.empty(kv_shape(num_tokens))
        register_nixl_memory(self.outbox)
        self.last: torch.Tensor | None = None

    def pid(self) -> int:
        return os.getpid()

    def _fill(self, target: torch.Tensor, seed: int) -> float:
        torch.add(self.base, float(seed), out=target)
        return float(target.double().sum())

    @ray.method(tensor_transport="nixl")
    def produce_fresh(self, seed: int, delay_s: float = 0.0) -> torch.Tensor:
        """Return a newly allocated tensor, which RDT registers with NIXL per object."""
        time.sleep(delay_s)
        tensor = torch.empty(kv_shape(self.num_tokens))
        self._fill(tensor, seed)
        self.last = tensor
        return tensor

    @ray.method(tensor_transport="nixl")
    def produce_outbox(self, seed: int) -> torch.Tensor:
        """Return the registered outbox as one contiguous tensor."""
        self._fill(self.outbox, seed)
        return self.outbox

    @ray.method(tensor_transport="nixl")
    def produce_per_head(self, seed: int) -> list[torch.Tensor]:
        """Return the registered outbox as one contiguous [tokens, dim] view per (layer, k/v, head)."""
        self._fill(self.outbox, seed)
        return per_head_views(self.outbox)

    def produce_plain(self, seed: int) -> torch.Tensor:
        """Return a tensor through the object store (no tensor transport)."""
        self._fill(self.outbox, seed)
        return self.outbox

    def checksum(self, seed: int) -> float:
        return float((self.base.double() + seed).sum())

    def wait_freed(self, timeout_s: float) -> dict[str, Any]:
        """Wait until every ref to the last ``produce_fresh`` tensor is gone."""
        from ray.experimental import wait_tensor_freed

        start = time.perf_counter()
        try:
            wait_tensor_freed(self.last, timeout=timeout_s)
        except TimeoutError as exc:
            return {"freed": False, "waited_s": time.perf_counter() - start, "error": type(exc).__name__}
        return {"freed": True, "waited_s": time.perf_counter() - start, "error": ""}


@ray.remote(num_cpus=1)
class RdtConsumer:
    """Decode stand-in with a registered arena[layers, 2, slots, heads, slot_tokens, dim]."""

    def __init__(self, num_tokens: int) -> None:
        from ray.experimental import register_nixl_memory

        expose_nixl_as_nixl_cu12()
        torch.set_num_threads(1)
        self.num_tokens = num_tokens
        self.arena = torch.zeros(LAYERS, 2, NUM_SLOTS, HEADS, SLOT_TOKENS, HEAD_DIM)
        self.staging = torch.empty(kv_shape(num_tokens))
        register_nixl_memory(self.arena)
        register_nixl_memory(self.staging)

    def pid(self) -> int:
        return os.getpid()

    def _slot_checksum(self, slot: int) -> float:
        return float(self.arena[:, :, slot, :, : self.num_tokens].double().sum())

    def pull(self, handle: Any, mode: str, slot: int, timeout_s: float) -> dict[str, Any]:
        """Pull the RDT ref inside ``handle`` (a list or a dict) into arena slot ``slot``.

        Modes:
        - ``staging``: land in a contiguous registered buffer, then copy into the slot.
        - ``strided``: target the strided slot view directly.
        - ``per_head``: target one contiguous slot view per (layer, k/v, head).
        - ``no_target``: let Ray allocate the tensor, then copy.
        - ``plain``: fetch an object-store ref by ray.get, then copy.
        """
        from ray.experimental import set_target_for_ref

        ref = handle[0] if isinstance(handle, list) else handle["kv"]
        slot_view = self.arena[:, :, slot, :, : self.num_tokens]
        result: dict[str, Any] = {"mode": mode, "error": ""}
        start = time.perf_counter()
        try:
            if mode == "staging":
                set_target_for_ref(ref, [self.staging])
                tensor = ray.get(ref, timeout=timeout_s)
                result["in_place"] = tensor.data_ptr() == self.staging.data_ptr()
                result["fetch_s"] = time.perf_counter() - start
                slot_view.copy_(tensor)
            elif mode == "strided":
                result["target_contiguous"] = slot_view.is_contiguous()
                set_target_for_ref(ref, [slot_view])
                tensor = ray.get(ref, timeout=timeout_s)
                result["in_place"] = tensor.data_ptr() == slot_view.data_ptr()
            elif mode == "per_head":
                targets = slot_head_views(self.arena, slot, self.num_tokens)
                set_target_for_ref(ref, targets)
                tensors = ray.get(ref, timeout=timeout_s)
                result["in_place"] = all(t.data_ptr() == v.data_ptr() for t, v in zip(tensors, targets))
            elif mode in ("no_target", "plain"):
                tensor = ray.get(ref, timeout=timeout_s)
                result["fetch_s"] = time.perf_counter() - start
                slot_view.copy_(tensor)
            else:
                raise ValueError(f"unknown pull mode {mode!r}")
        except Exception as exc:  # noqa: BLE001 - the probe reports every failure
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        result["total_s"] = time.perf_counter() - start
        if not result["error"]:
            result["checksum"] = self._slot_checksum(slot)
        return result

    def take_top_level(self, tensor: torch.Tensor) -> dict[str, Any]:
        """Receive an RDT object resolved by Ray as a top-level argument."""
        return {"shape": tuple(tensor.shape), "checksum": float(tensor.double().sum())}


@ray.remote(num_cpus=1)
class DirectProducer:
    """Prefill stand-in on disagg's NixlEndpoint: fills its outbox and serves READs."""

    def __init__(self, num_tokens: int, compat: dict[str, Any]) -> None:
        from disagg.transfer.nixl_agent import NixlEndpoint

        torch.set_num_threads(1)
        self.num_tokens = num_tokens
        self.base = torch.randn(kv_shape(num_tokens))
        self.outbox = torch.empty(kv_shape(num_tokens))
        self.endpoint = NixlEndpoint("probe-direct-producer", compat, worker="probe-producer")
        self.endpoint.register(self.outbox)
        self.released: list[bytes] = []
        self._progress_task: asyncio.Task | None = None

    async def start(self) -> bytes:
        self._progress_task = asyncio.get_running_loop().create_task(
            self.endpoint.progress_forever(
                on_notification=lambda _peer, message: self.released.append(message)
            )
        )
        return self.endpoint.handshake()

    async def add_peer(self, handshake: bytes) -> str:
        return self.endpoint.add_peer(handshake)

    async def pid(self) -> int:
        return os.getpid()

    async def produce(self, seed: int) -> dict[str, Any]:
        torch.add(self.base, float(seed), out=self.outbox)
        regions = [
            (view.data_ptr(), view.numel() * view.element_size()) for view in per_head_views(self.outbox)
        ]
        return {
            "agent": self.endpoint.name,
            "regions": np.asarray(regions, dtype=np.int64).tobytes(),
            "checksum": float(self.outbox.double().sum()),
        }

    async def num_released(self) -> int:
        return len(self.released)


@ray.remote(num_cpus=1)
class DirectConsumer:
    """Decode stand-in on disagg's NixlEndpoint: READs into a slot of its registered arena."""

    def __init__(self, num_tokens: int, compat: dict[str, Any]) -> None:
        from disagg.transfer.nixl_agent import NixlEndpoint

        torch.set_num_threads(1)
        self.num_tokens = num_tokens
        self.arena = torch.zeros(LAYERS, 2, NUM_SLOTS, HEADS, SLOT_TOKENS, HEAD_DIM)
        self.endpoint = NixlEndpoint("probe-direct-consumer", compat, worker="probe-consumer")
        self.endpoint.register(self.arena)

    async def handshake(self) -> bytes:
        return self.endpoint.handshake()

    async def pid(self) -> int:
        return os.getpid()

    async def add_peer(self, handshake: bytes) -> str:
        return self.endpoint.add_peer(handshake)

    async def pull(
        self, request_id: str, descriptor: dict[str, Any], slot: int, timeout_s: float
    ) -> dict[str, Any]:
        from disagg.transfer.protocol import ReleaseNotice

        remote = np.frombuffer(descriptor["regions"], dtype=np.int64).reshape(-1, 2)
        targets = slot_head_views(self.arena, slot, self.num_tokens)
        local = np.asarray([(t.data_ptr(), t.numel() * t.element_size()) for t in targets], dtype=np.int64)
        notice = ReleaseNotice(request_id=request_id, ok=True).encode()
        result: dict[str, Any] = {"error": ""}
        start = time.perf_counter()
        try:
            await self.endpoint.read(descriptor["agent"], local, remote, notice, timeout_s)
        except Exception as exc:  # noqa: BLE001 - the probe reports every failure
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        result["total_s"] = time.perf_counter() - start
        if not result["error"]:
            result["checksum"] = float(self.arena[:, :, slot, :, : self.num_tokens].double().sum())
        return result


def checksums_match(got: float, expected: float) -> bool:
    return abs(got - expected) <= 1e-6 * max(1.0, abs(expected))


def submit_when_borrowable(submit, deadline_s: float = 10.0) -> tuple[Any, float]:
    """Call ``submit`` until Ray lets an RDT ref be serialized inside a container.

    In Ray 2.60 the driver learns an RDT object's transport metadata some time
    after ``ray.wait`` reports the ref ready, and serializing the ref inside a
    list or dict before then raises NotImplementedError. Returns the submitted
    ref and the seconds spent retrying.
    """
    start = time.perf_counter()
    while True:
        try:
            return submit(), time.perf_counter() - start
        except NotImplementedError:
            if time.perf_counter() - start > deadline_s:
                raise
            time.sleep(0.001)


def run_rdt_pulls(
    producer, consumer, method: str, mode: str, repeats: int, container: str = "list"
) -> dict[str, Any]:
    """Run one warm-up pull and ``repeats`` timed pulls, each routed through the driver."""
    times, first, errors, in_place, correct = [], None, [], [], True
    metadata_waits: list[float] = []
    fetch_times: list[float] = []
    for index in range(repeats + 1):
        seed = index + 1
        ref = getattr(producer, method).remote(seed)
        ray.wait([ref], timeout=GET_TIMEOUT_S)
        handle = [ref] if container == "list" else {"kv": ref}
        pending, metadata_wait_s = submit_when_borrowable(
            functools.partial(consumer.pull.remote, handle, mode, index % NUM_SLOTS, 60.0)
        )
        metadata_waits.append(metadata_wait_s)
        result = ray.get(pending, timeout=GET_TIMEOUT_S)
        del ref, handle
        if result["error"]:
            errors.append(result["error"])
            break
        expected = ray.get(producer.checksum.remote(seed), timeout=GET_TIMEOUT_S)
        correct = correct and checksums_match(result["checksum"], expected)
        in_place.append(result.get("in_place"))
        if index == 0:
            first = result["total_s"]
        else:
            times.append(result["total_s"])
            if "fetch_s" in result:
                fetch_times.append(result["fetch_s"])
    return {
        "first_s": first,
        "median_fetch_s": statistics.median(fetch_times) if fetch_times else None,
        "median_s": statistics.median(times) if times else None,
        "errors": errors,
        "in_place": in_place,
        "correct": correct and not errors,
        "max_metadata_wait_s": max(metadata_waits),
    }


def probe_direct(num_tokens: int, repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time disagg's NixlEndpoint READ, then READ from a killed producer."""
    compat = {"model": "probe", "layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32"}
    producer = DirectProducer.remote(num_tokens, compat)
    consumer = DirectConsumer.remote(num_tokens, compat)
    producer_handshake = ray.get(producer.start.remote(), timeout=GET_TIMEOUT_S)
    ray.get(producer.add_peer.remote(ray.get(consumer.handshake.remote())), timeout=GET_TIMEOUT_S)
    ray.get(consumer.add_peer.remote(producer_handshake), timeout=GET_TIMEOUT_S)

    times, first, correct, error = [], None, True, ""
    for index in range(repeats + 1):
        descriptor = ray.get(producer.produce.remote(index + 1), timeout=GET_TIMEOUT_S)
        result = ray.get(
            consumer.pull.remote(f"req-{index}", descriptor, index % NUM_SLOTS, 10.0), timeout=GET_TIMEOUT_S
        )
        if result["error"]:
            error = result["error"]
            break
        correct = correct and checksums_match(result["checksum"], descriptor["checksum"])
        if index == 0:
            first = result["total_s"]
        else:
            times.append(result["total_s"])
    time.sleep(0.05)
    released = ray.get(producer.num_released.remote(), timeout=GET_TIMEOUT_S)
    pull = {
        "first_s": first,
        "median_s": statistics.median(times) if times else None,
        "errors": [error] if error else [],
        "in_place": [True],
        "correct": correct and not error,
        "released": f"{released}/{repeats + 1} ReleaseNotices",
    }

    pids = [ray.get(producer.pid.remote()), ray.get(consumer.pid.remote())]
    pull["idle_cores"] = measure_idle_cpu(pids, 1.0)

    descriptor = ray.get(producer.produce.remote(99), timeout=GET_TIMEOUT_S)
    ray.kill(producer)
    time.sleep(1.0)
    dead = ray.get(consumer.pull.remote("req-dead", descriptor, 0, 10.0), timeout=GET_TIMEOUT_S)
    ray.kill(consumer)
    return pull, dead


def measure_idle_cpu(pids: list[int], seconds: float) -> float:
    """Return the CPU time ``pids`` used together while idle, as cores busy."""
    before = sum(process_cpu_seconds(pid) for pid in pids)
    time.sleep(seconds)
    return (sum(process_cpu_seconds(pid) for pid in pids) - before) / seconds


def probe_failures(consumer, num_tokens: int) -> dict[str, Any]:
    """Check refs in containers, a top-level ref, wait_tensor_freed and a killed producer."""
    findings: dict[str, Any] = {}

    victim = RdtProducer.remote(num_tokens)
    ray.get(victim.pid.remote(), timeout=GET_TIMEOUT_S)

    # A ref inside a list before the producer has returned.
    ref = victim.produce_fresh.remote(1, 0.5)
    try:
        pending = consumer.pull.remote([ref], "staging", 0, 30.0)
        findings["list_before_ready"] = ray.get(pending, timeout=GET_TIMEOUT_S)["error"] or "ok"
    except Exception as exc:  # noqa: BLE001 - the probe reports every failure
        findings["list_before_ready"] = f"{type(exc).__name__} at .remote(): {str(exc).splitlines()[0][:200]}"
    ray.wait([ref], timeout=GET_TIMEOUT_S)
    del ref

    # A ref passed as a top-level argument: Ray resolves it before the call.
    ref = victim.produce_fresh.remote(2)
    ray.wait([ref], timeout=GET_TIMEOUT_S)
    start = time.perf_counter()
    try:
        result = ray.get(consumer.take_top_level.remote(ref), timeout=GET_TIMEOUT_S)
        expected = ray.get(victim.checksum.remote(2), timeout=GET_TIMEOUT_S)
        findings["top_level_arg"] = f"ok, correct={checksums_match(result['checksum'], expected)}"
    except Exception as exc:  # noqa: BLE001 - the probe reports every failure
        findings["top_level_arg"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    findings["top_level_arg_s"] = time.perf_counter() - start
    del ref

    # wait_tensor_freed: the driver still owns the ref after the consumer is done.
    ref = victim.produce_fresh.remote(3)
    ray.wait([ref], timeout=GET_TIMEOUT_S)
    pending, _ = submit_when_borrowable(
        functools.partial(consumer.pull.remote, {"kv": ref}, "staging", 0, 30.0)
    )
    pulled = ray.get(pending, timeout=GET_TIMEOUT_S)
    findings["dict_after_ready"] = pulled["error"] or "ok"
    findings["freed_while_driver_holds_ref"] = ray.get(victim.wait_freed.remote(1.0), timeout=GET_TIMEOUT_S)
    waiter = victim.wait_freed.remote(10.0)
    time.sleep(0.2)
    released_at = time.perf_counter()
    del ref
    freed = ray.get(waiter, timeout=GET_TIMEOUT_S)
    freed["after_driver_del_s"] = time.perf_counter() - released_at
    findings["freed_after_driver_del"] = freed

    # The producer dies after returning, before the consumer pulls.
    ref = victim.produce_fresh.remote(4)
    ray.wait([ref], timeout=GET_TIMEOUT_S)
    ray.kill(victim)
    time.sleep(1.0)
    start = time.perf_counter()
    try:
        pending, _ = submit_when_borrowable(
            functools.partial(consumer.pull.remote, [ref], "staging", 0, 60.0)
        )
        result = ray.get(pending, timeout=GET_TIMEOUT_S)
        findings["producer_killed"] = result["error"] or "ok (pulled from a dead actor?)"
    except Exception as exc:  # noqa: BLE001 - the probe reports every failure
        findings["producer_killed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    findings["producer_killed_s"] = time.perf_counter() - start
    del ref
    return findings


def format_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:8.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=int, default=1000, help="prompt tokens per pull (default 1000, ~46 MB)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed pulls per path, after one warm-up")
    args = parser.parse_args()
    if not 0 < args.tokens <= SLOT_TOKENS:
        parser.error(f"--tokens must be in [1, {SLOT_TOKENS}], got {args.tokens}")

    num_bytes = LAYERS * 2 * HEADS * args.tokens * HEAD_DIM * 4
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=OBJECT_STORE_BYTES,
        logging_level="WARNING",
    )
    print(f"Ray {ray.__version__}, torch {torch.__version__}, {num_bytes / 1e6:.1f} MB per pull")
    rows: list[tuple[str, dict[str, Any]]] = []

    direct_pull, direct_dead = probe_direct(args.tokens, args.repeats)
    rows.append(("direct NixlEndpoint.read, 180 regions", direct_pull))

    producer = RdtProducer.remote(args.tokens)
    consumer = RdtConsumer.remote(args.tokens)
    pids = [ray.get(producer.pid.remote()), ray.get(consumer.pid.remote())]
    idle_rdt_agents = measure_idle_cpu(pids, 1.0)

    # (row label, producer method, consumer pull mode, timed pulls, ref container)
    rdt_cases = [
        ("object store: ray.get + copy", "produce_plain", "plain", args.repeats, "list"),
        ("RDT fresh tensor -> staging + copy", "produce_fresh", "staging", args.repeats, "list"),
        ("RDT outbox -> staging + copy", "produce_outbox", "staging", args.repeats, "list"),
        ("RDT outbox -> no target + copy", "produce_outbox", "no_target", args.repeats, "list"),
        ("RDT outbox -> strided slot view", "produce_outbox", "strided", 0, "list"),
        ("RDT 180 head views -> slot views", "produce_per_head", "per_head", args.repeats, "list"),
        ("RDT same, ref in a dict", "produce_per_head", "per_head", args.repeats, "dict"),
    ]
    for label, method, mode, repeats, container in rdt_cases:
        rows.append((label, run_rdt_pulls(producer, consumer, method, mode, repeats, container)))
    idle_rdt_after_pulls = measure_idle_cpu(pids, 1.0)

    findings = probe_failures(consumer, args.tokens)

    print()
    print(
        f"{'path':40} {'first':>11} {'median':>11} {'fetch only':>11}  {'meta wait':>11}  in place  correct  error"
    )
    for name, row in rows:
        in_place = "yes" if row["in_place"] and all(row["in_place"]) else "no"
        error = row["errors"][0] if row["errors"] else row.get("released", "")
        print(
            f"{name:40} {format_seconds(row['first_s']):>11} {format_seconds(row['median_s']):>11}"
            f" {format_seconds(row.get('median_fetch_s')):>11}"
            f"  {format_seconds(row.get('max_metadata_wait_s')):>11}"
            f"  {in_place:8}  {str(row['correct']):7}  {error}"
        )
    print()
    # RDT creates each actor's NIXL agent with NIXL's progress thread on, but
    # NixlEndpoint turns it off and polls every 1 ms from the event loop.
    print(f"idle CPU, direct producer + consumer (1 ms polling): {direct_pull['idle_cores']:.2f} cores")
    print(f"idle CPU, RDT producer + consumer, agents created:   {idle_rdt_agents:.2f} cores")
    print(f"idle CPU, RDT producer + consumer, after the pulls:  {idle_rdt_after_pulls:.2f} cores")
    print(
        f"direct READ from a killed producer: {direct_dead['error'] or 'ok'} after {format_seconds(direct_dead['total_s'])}"
    )
    for key, value in findings.items():
        if key.endswith("_s"):
            value = format_seconds(value)
        print(f"{key}: {value}")
    ray.shutdown()


if __name__ == "__main__":
    main()
