"""Sampling parameters and the per-request sampler.

Sampling is deterministic per request: the random draw for output token ``i``
comes from a generator seeded by ``(seed, i)`` alone, so a seeded request
samples the same tokens whichever worker serves it and whatever else shares
its decode batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token and when to stop.

    ``temperature == 0`` means greedy decoding; then ``top_p``, ``top_k`` and
    ``seed`` are ignored.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists and a single string for convenience, store tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and its valid range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is invalid: it must be an integer >= 1.")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature={self.temperature!r} is invalid: use 0 for greedy decoding or a positive number."
            )
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} is invalid: it must be in (0, 1]; use 1.0 to disable it.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} is invalid: it must be an integer >= 0; use 0 to disable it.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is invalid: it must be an integer or None.")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop={self.stop!r} is invalid: every stop string must be a non-empty str.")
        for token_id in self.stop_token_ids:
            if not isinstance(token_id, int) or token_id < 0:
                raise ValueError(
                    f"stop_token_ids={self.stop_token_ids!r} is invalid: token ids must be integers >= 0."
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
        }

    @classmethod
    def from_dict(cls, data: dict) -> SamplingParams:
        return cls(**data)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class RequestSampler:
    """Samples one request's tokens; ``output_index`` picks the random stream."""

    params: SamplingParams
    request_seed: int = field(default=0)

    def sample(self, logits: torch.Tensor, output_index: int) -> int:
        """Pick the token for output position ``output_index`` from 1-D ``logits``."""
        if self.params.greedy:
            return int(torch.argmax(logits).item())

        scores = logits.float() / self.params.temperature
        scores = _apply_top_k(scores, self.params.top_k)
        scores = _apply_top_p(scores, self.params.top_p)
        probs = torch.softmax(scores, dim=-1)

        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, and the
        # draw depends only on (seed, output_index), never on the batch.
        generator = torch.Generator().manual_seed(_stream_seed(self.request_seed, output_index))
        noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
        return int(torch.argmax(probs / noise).item())


def make_sampler(params: SamplingParams, request_id: str) -> RequestSampler:
    """Build the sampler; an unseeded request gets a seed derived from its id."""
    seed = params.seed if params.seed is not None else _stable_int(request_id)
    return RequestSampler(params=params, request_seed=seed)


def _apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= scores.numel():
        return scores
    threshold = torch.topk(scores, top_k).values[-1]
    return scores.masked_fill(scores < threshold, float("-inf"))


def _apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=True)
    cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p.
    drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def _stream_seed(seed: int, output_index: int) -> int:
    return _stable_int(f"{seed}:{output_index}")


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def is_stop_token(token_id: int, params: SamplingParams, eos_token_ids: Sequence[int]) -> bool:
    if token_id in params.stop_token_ids:
        return True
    return not params.ignore_eos and token_id in eos_token_ids
