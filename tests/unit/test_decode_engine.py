"""Continuous batching on the tiny model: sequences join and leave, output equals running alone."""

from __future__ import annotations

import pytest
import torch

from disagg.engine.decode import DecodeEngine
from disagg.kv.arena import DecodeKVArena
from disagg.model.runner import ModelRunner
from disagg.model.sources import resolve_model
from disagg.outputs import FinishReason
from disagg.sampling import SamplingParams, make_sampler


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return ModelRunner(resolve_model("tiny-random-llama", tmp_path_factory.mktemp("models")), num_threads=1)


def alone(runner, prompt, max_tokens):
    """Greedy tokens of one prompt with a plain transformers cache."""
    result = runner.prefill(prompt)
    tokens = [int(result.logits.argmax())]
    ids = list(prompt) + tokens
    while len(tokens) < max_tokens:
        with torch.inference_mode():
            logits = runner.model(input_ids=torch.tensor([ids])).logits[0, -1]
        tokens.append(int(logits.argmax()))
        ids.append(tokens[-1])
    return tokens


def admit(engine, runner, request_id, prompt, max_tokens):
    slot = engine.arena.allocate(request_id)
    result = runner.prefill(prompt)
    engine.arena.write(slot, torch.stack([torch.stack([k, v]) for k, v in result.layer_kv]))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.add(request_id, slot, len(prompt), int(result.logits.argmax()), params, make_sampler(params, request_id))
    return slot


def step(engine):
    plan = engine.plan_step()
    return engine.finish_step(plan, engine.run_step(plan))


def test_join_and_leave_match_running_alone(runner):
    arena = DecodeKVArena(runner.layout, num_slots=4, slot_tokens=128)
    engine = DecodeEngine(runner, arena, max_batch=4)
    prompts = {"a": [5, 6, 7], "b": list(range(10, 60)), "c": [9], "d": list(range(100, 120))}
    lengths = {"a": 4, "b": 9, "c": 6, "d": 5}
    outputs = {r: [] for r in prompts}
    admit(engine, runner, "a", prompts["a"], lengths["a"])
    admit(engine, runner, "b", prompts["b"], lengths["b"])

    finished = {}
    for number in range(12):
        if number == 2:
            admit(engine, runner, "c", prompts["c"], lengths["c"])
        if number == 4:  # "a" has left slot 0 by now; "d" takes it, with "b" still running
            assert arena.owner(0) is None
            assert admit(engine, runner, "d", prompts["d"], lengths["d"]) == 0
        if not engine.has_work():
            break
        for event in step(engine):
            outputs[event.request_id].append(event.token_id)
            if event.finish_reason is not None:
                finished[event.request_id] = event.finish_reason

    for request_id, prompt in prompts.items():
        expected = alone(runner, prompt, lengths[request_id])
        assert [expected[0], *outputs[request_id]] == expected, request_id
        assert finished[request_id] == FinishReason.LENGTH
    assert arena.num_used_slots == 0


def test_abort_during_step_defers_slot_free(runner):
    arena = DecodeKVArena(runner.layout, num_slots=2, slot_tokens=64)
    engine = DecodeEngine(runner, arena, max_batch=2)
    slot = admit(engine, runner, "x", [1, 2, 3], 10)
    plan = engine.plan_step()
    logits = engine.run_step(plan)
    assert engine.abort("x")
    assert arena.owner(slot) == "x", "slot must stay reserved until the step ends"
    assert engine.finish_step(plan, logits) == []
    assert arena.owner(slot) is None
    assert not engine.abort("x")


def test_hole_rows_do_not_disturb_neighbours(runner):
    arena = DecodeKVArena(runner.layout, num_slots=3, slot_tokens=64)
    engine = DecodeEngine(runner, arena, max_batch=3)
    arena.allocate("hole")  # slot 0 reserved as if a transfer were landing there
    arena.write(0, torch.full((runner.layout.num_layers, 2, runner.layout.num_kv_heads, 4, runner.layout.head_dim), 7.0))
    admit(engine, runner, "p", [4, 4, 4, 4], 5)
    arena.free(0)
    arena.allocate("hole2")
    engine_slot_before = arena.tensor[:, :, 0, :, :4].clone()
    admit(engine, runner, "q", [8, 9], 5)
    tokens = {"p": [], "q": []}
    while engine.has_work():
        for event in step(engine):
            tokens[event.request_id].append(event.token_id)
    assert tokens["p"] == alone(runner, [4, 4, 4, 4], 5)[1:]
    assert tokens["q"] == alone(runner, [8, 9], 5)[1:]
    assert torch.equal(arena.tensor[:, :, 0, :, :4], engine_slot_before), "a reserved slot's prompt KV was touched"
