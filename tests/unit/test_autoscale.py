from __future__ import annotations

import pytest

from disagg.autoscale import AutoscalePolicy, Autoscaler, LoadSignals


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def signals(**overrides) -> LoadSignals:
    values = dict(num_prefill=1, num_decode=1, pending_prefill=0, pending_decode=0, prefill_queue_s=1.0,
                  ttft_s=1.0, decode_occupancy=0.5, tpot_s=0.05)
    values.update(overrides)
    return LoadSignals(**values)


def make(**policy) -> tuple[Autoscaler, Clock]:
    clock = Clock()
    return Autoscaler(AutoscalePolicy(cooldown_s=10, **policy), clock), clock


def test_steady_load_changes_nothing():
    scaler, _ = make()
    assert scaler.decide(signals()) == {"prefill": None, "decode": None}


def test_long_prefill_queue_adds_prefill_replica():
    scaler, _ = make()
    assert scaler.decide(signals(prefill_queue_s=5.0)) == {"prefill": 2, "decode": None}


def test_full_decode_batch_adds_decode_replica():
    scaler, _ = make()
    assert scaler.decide(signals(decode_occupancy=1.0)) == {"prefill": None, "decode": 2}


def test_cooldown_prevents_flapping():
    scaler, clock = make()
    assert scaler.decide(signals(prefill_queue_s=5.0))["prefill"] == 2
    clock.now = 5.0
    assert scaler.decide(signals(num_prefill=2, prefill_queue_s=0.0))["prefill"] is None
    clock.now = 11.0
    assert scaler.decide(signals(num_prefill=2, prefill_queue_s=0.0))["prefill"] == 1


def test_bounds_are_respected():
    scaler, _ = make(max_prefill=2, min_decode=2, max_decode=3)
    assert scaler.decide(signals(num_prefill=2, prefill_queue_s=50.0))["prefill"] is None
    assert scaler.decide(signals(num_decode=2, decode_occupancy=0.0))["decode"] is None


def test_no_growth_while_replicas_pending():
    scaler, _ = make()
    assert scaler.decide(signals(prefill_queue_s=9.0, pending_prefill=1))["prefill"] is None


def test_optional_latency_targets():
    scaler, _ = make(target_ttft_s=0.5, target_tpot_s=0.01)
    assert scaler.decide(signals(prefill_queue_s=0.1, ttft_s=2.0, tpot_s=0.05)) == {"prefill": 2, "decode": 2}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"min_prefill": 0}, "min_prefill=0"), ({"min_decode": 3, "max_decode": 2}, "max_decode=2"),
     ({"scale_down_ratio": 1.5}, "scale_down_ratio"), ({"interval_s": 0}, "interval_s")],
)
def test_invalid_policy(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        AutoscalePolicy(**kwargs)
