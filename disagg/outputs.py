"""Results returned to the driver."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the caller


@dataclass
class RequestMetrics:
    """Per-request timings in seconds and transfer facts."""

    ttft_s: float = 0.0  # submit -> first token at the driver
    tpot_s: float = 0.0  # mean time per output token after the first
    queue_s: float = 0.0  # waiting for a prefill worker and for decode KV room
    prefill_s: float = 0.0  # forward pass on the prefill worker
    transfer_s: float = 0.0  # KV pull by the decode worker
    transfer_bytes: int = 0
    cached_tokens: int = 0
    transport: str = ""
    prefill_worker: str = ""
    decode_worker: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)
