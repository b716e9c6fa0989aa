"""Opt-in autoscaling: pick prefill and decode replica counts from recent load.

Prefill scales on queue wait (or TTFT) against a target, decode on batch
occupancy (or time per output token). Each kind moves one replica at a time,
stays within its bounds, waits ``cooldown_s`` after a change, and does not
grow while replicas it asked for are still pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AutoscalePolicy:
    """Targets and bounds. A metric above its target adds a replica; below ``scale_down_ratio`` x target removes one."""

    min_prefill: int = 1
    max_prefill: int = 4
    min_decode: int = 1
    max_decode: int = 4
    target_prefill_queue_s: float = 2.0  # mean wait for a prefill worker
    target_ttft_s: float | None = None  # if set, prefill also scales on mean TTFT
    target_decode_occupancy: float = 0.8  # running sequences / decode slots
    target_tpot_s: float | None = None  # if set, decode also scales on mean time per output token
    scale_down_ratio: float = 0.25
    cooldown_s: float = 30.0
    interval_s: float = 2.0
    window: int = 32  # recent requests whose metrics are averaged

    def __post_init__(self) -> None:
        for kind in ("prefill", "decode"):
            low, high = getattr(self, f"min_{kind}"), getattr(self, f"max_{kind}")
            if not 1 <= low <= high:
                raise ValueError(f"min_{kind}={low}, max_{kind}={high} are invalid: need 1 <= min <= max.")
        if not 0 < self.scale_down_ratio < 1:
            raise ValueError(f"scale_down_ratio={self.scale_down_ratio} is invalid: it must be in (0, 1).")
        if self.cooldown_s < 0 or self.interval_s <= 0:
            raise ValueError("cooldown_s must be >= 0 and interval_s > 0.")


@dataclass(frozen=True)
class LoadSignals:
    """Load measurements the autoscaler decides on, taken over the recent window."""

    num_prefill: int
    num_decode: int
    pending_prefill: int
    pending_decode: int
    prefill_queue_s: float
    ttft_s: float
    decode_occupancy: float
    tpot_s: float


@dataclass
class Autoscaler:
    """Turns ``LoadSignals`` into replica targets. Mutates its cool-down clock on every change."""

    policy: AutoscalePolicy
    clock: Callable[[], float] = time.monotonic
    _last_change_s: dict[str, float] = field(default_factory=dict)

    def decide(self, signals: LoadSignals) -> dict[str, int | None]:
        """Return ``{"prefill": n or None, "decode": m or None}``; None leaves that kind as it is."""
        policy = self.policy
        prefill_load = max(signals.prefill_queue_s / policy.target_prefill_queue_s,
                           signals.ttft_s / policy.target_ttft_s if policy.target_ttft_s else 0.0)
        decode_load = max(signals.decode_occupancy / policy.target_decode_occupancy,
                          signals.tpot_s / policy.target_tpot_s if policy.target_tpot_s else 0.0)
        return {
            "prefill": self._step("prefill", prefill_load, signals.num_prefill, signals.pending_prefill),
            "decode": self._step("decode", decode_load, signals.num_decode, signals.pending_decode),
        }

    def _step(self, kind: str, load: float, current: int, pending: int) -> int | None:
        low, high = getattr(self.policy, f"min_{kind}"), getattr(self.policy, f"max_{kind}")
        now = self.clock()
        if now - self._last_change_s.get(kind, float("-inf")) < self.policy.cooldown_s:
            return None

        target = current
        if load > 1.0 and pending == 0:
            target = current + 1
        elif load < self.policy.scale_down_ratio and pending == 0:
            target = current - 1
        target = min(max(target, low), high)
        if target == current:
            return None
        self._last_change_s[kind] = now
        return target
