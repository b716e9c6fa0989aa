from __future__ import annotations

import pytest

from disagg.model.sources import resolve_model
from disagg.prompts import check_length, encode_prompt


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model("tiny-random-llama", tmp_path_factory.mktemp("m")).path))


def test_text_token_ids_and_chat(tokenizer):
    assert encode_prompt("ab", tokenizer) == tokenizer("ab")["input_ids"]
    assert encode_prompt([3, 4, 5], tokenizer) == [3, 4, 5]
    chat = encode_prompt([{"role": "user", "content": "hi"}], tokenizer)
    rendered = tokenizer.decode(chat)
    assert "hi" in rendered
    assert rendered.rstrip().endswith("assistant")


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ("", "empty string"),
        ([], "empty list"),
        ([{"role": "user", "content": None}], "content=None"),
        ([{"role": "", "content": "x"}], "role=''"),
        ([1, -3], "token 1 is -3"),
        ([True], "token 0 is True"),
        (b"bytes", "not supported"),
    ],
)
def test_invalid_prompts(tokenizer, prompt, fragment):
    with pytest.raises(ValueError, match=fragment):
        encode_prompt(prompt, tokenizer)


def test_length_limits_name_the_fix():
    check_length(10, 5, max_seq_len=15, max_model_len=100)
    with pytest.raises(ValueError, match="context of 100"):
        check_length(100, 1, max_seq_len=2000, max_model_len=100)
    with pytest.raises(ValueError, match="lower max_tokens"):
        check_length(10, 6, max_seq_len=15, max_model_len=100)
