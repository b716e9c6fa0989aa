"""Cluster and worker configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

TransportName = Literal["nixl", "object_store"]


@dataclass(frozen=True)
class Timeouts:
    """Named bounds, in seconds, on every remote call and wait."""

    route_s: float = 10.0  # coordinator picks workers
    prefill_s: float = 600.0  # one prompt's forward on a prefill worker
    admission_s: float = 300.0  # a decode worker waits for a free KV slot
    transfer_s: float = 60.0  # one KV pull
    lease_s: float = 120.0  # prefill KV that no reader takes within this is released
    first_token_s: float = 900.0  # driver waits for the first streamed token
    token_s: float = 120.0  # driver waits between two streamed tokens
    actor_start_s: float = 300.0  # a worker loads its model and registers


@dataclass(frozen=True)
class WorkerResources:
    """Ray placement of one worker kind: CPUs, GPUs and custom resources (node types)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    torch_threads: int | None = None  # default: max(1, int(num_cpus))

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))


@dataclass(frozen=True)
class EngineConfig:
    """Everything a worker needs to serve a model; shared by every worker of a cluster."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    transport: TransportName = "nixl"
    max_seq_len: int = 2048  # prompt + output tokens of one sequence (the decode slot size)
    decode_kv_tokens: int | None = None  # decode arena budget in tokens ...
    decode_kv_bytes: int | None = None  # ... or in bytes; default: max_batch slots
    max_batch: int = 16  # most sequences one decode step runs
    prefill_block_tokens: int = 256
    prefill_outbox_tokens: int = 16384  # KV held by a prefill worker until decode reads it
    prefill_chunk_tokens: int = 2048  # forward pass size for long prompts
    max_queued_requests: int = 64  # per worker; more waiting requests are rejected as overloaded
    cache_dir: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)

    def __post_init__(self) -> None:
        if self.transport not in ("nixl", "object_store"):
            raise ValueError(f"transport={self.transport!r} is invalid: use 'nixl' or 'object_store'.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} is invalid: use 'float32' or 'bfloat16'.")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len={self.max_seq_len} is invalid: it must be >= 2.")
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} is invalid: it must be >= 1.")
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests={self.max_queued_requests} is invalid: it must be >= 1.")
        if self.decode_kv_tokens is not None and self.decode_kv_bytes is not None:
            raise ValueError("set decode_kv_tokens or decode_kv_bytes, not both.")
        if self.prefill_outbox_tokens < self.max_seq_len:
            raise ValueError(
                f"prefill_outbox_tokens={self.prefill_outbox_tokens} is below max_seq_len={self.max_seq_len}: "
                "a prefill worker could not hold one full prompt; raise prefill_outbox_tokens."
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EngineConfig:
        data = dict(data)
        data["timeouts"] = Timeouts(**data.get("timeouts", {}))
        return cls(**data)
