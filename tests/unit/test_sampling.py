from __future__ import annotations

import pytest
import torch

from disagg.sampling import SamplingParams, is_stop_token, make_sampler


def test_greedy_picks_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    sampler = make_sampler(SamplingParams(temperature=0.0), "r1")
    assert sampler.sample(logits, 0) == 1


def test_seeded_draw_depends_only_on_seed_and_index():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)
    a = [make_sampler(params, "any-id").sample(logits, i) for i in range(20)]
    b = [make_sampler(params, "other-id").sample(logits, i) for i in range(20)]
    assert a == b
    assert len(set(a)) > 1


def test_unseeded_draw_depends_on_request_id():
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0)
    a = [make_sampler(params, "id-a").sample(logits, i) for i in range(10)]
    b = [make_sampler(params, "id-b").sample(logits, i) for i in range(10)]
    assert a != b


def test_top_k_one_is_greedy():
    logits = torch.tensor([0.0, 5.0, 4.9, 4.8])
    sampler = make_sampler(SamplingParams(temperature=2.0, top_k=1, seed=3), "r")
    assert {sampler.sample(logits, i) for i in range(30)} == {1}


def test_top_p_keeps_smallest_covering_set():
    # Probabilities ~0.5, 0.3, 0.2 (after softmax of their logs).
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    sampler = make_sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=11), "r")
    drawn = {sampler.sample(logits, i) for i in range(200)}
    assert drawn == {0, 1}


def test_sampling_frequencies_follow_probabilities():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    sampler = make_sampler(SamplingParams(temperature=1.0, seed=5), "r")
    counts = torch.bincount(torch.tensor([sampler.sample(logits, i) for i in range(3000)]), minlength=3)
    freqs = counts.float() / 3000
    assert torch.allclose(freqs, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"max_tokens": 1.5}, "max_tokens=1.5"),
        ({"temperature": -1}, "temperature=-1"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"top_p": 0}, "top_p=0"),
        ({"top_p": 1.01}, "top_p=1.01"),
        ({"top_k": -2}, "top_k=-2"),
        ({"seed": "x"}, "seed='x'"),
        ({"stop": ["ok", ""]}, "stop="),
        ({"stop_token_ids": [-1]}, "stop_token_ids="),
    ],
)
def test_invalid_params_name_the_value(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        SamplingParams(**kwargs)


def test_stop_accepts_single_string_and_roundtrips():
    params = SamplingParams(stop="END", stop_token_ids=[5])
    assert params.stop == ("END",)
    assert SamplingParams.from_dict(params.to_dict()) == params


def test_is_stop_token_respects_ignore_eos():
    assert is_stop_token(2, SamplingParams(), eos_token_ids=(2,))
    assert not is_stop_token(2, SamplingParams(ignore_eos=True), eos_token_ids=(2,))
    assert is_stop_token(9, SamplingParams(ignore_eos=True, stop_token_ids=[9]), eos_token_ids=(2,))
