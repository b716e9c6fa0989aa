from __future__ import annotations

import pytest

from disagg.detokenizer import IncrementalDetokenizer
from disagg.model.sources import resolve_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    model = resolve_model("tiny-random-llama", tmp_path_factory.mktemp("models"))
    return AutoTokenizer.from_pretrained(str(model.path))


def feed(tokenizer, text: str, stop=()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, tuple(stop))
    pieces = []
    for token_id in tokenizer(text, add_special_tokens=False)["input_ids"]:
        delta = detok.add(token_id)
        pieces.append(delta.text)
        if delta.stopped:
            return pieces, detok
    pieces.append(detok.flush())
    return pieces, detok


def test_multibyte_characters_are_released_whole(tokenizer):
    text = "naïve café 日本語 🙂 done"
    pieces, detok = feed(tokenizer, text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert detok.text == text


def test_stop_string_is_cut_and_never_released(tokenizer):
    pieces, detok = feed(tokenizer, "hello STOP world", stop=["STOP"])
    assert "".join(pieces) == "hello "
    assert detok.stopped
    assert all("S" not in piece for piece in pieces)


def test_prefix_of_stop_is_released_when_it_diverges(tokenizer):
    pieces, detok = feed(tokenizer, "STOne and STOP", stop=["STOP"])
    assert "".join(pieces) == "STOne and "
    assert detok.stopped


def test_earliest_of_several_stops_wins(tokenizer):
    pieces, _ = feed(tokenizer, "a b c d", stop=["c", "b c"])
    assert "".join(pieces) == "a "


def test_held_back_text_flushes_at_end(tokenizer):
    pieces, detok = feed(tokenizer, "ends with ST", stop=["STOP"])
    assert "".join(pieces) == "ends with ST"
    assert not detok.stopped


def test_skipped_token_ids_render_nothing(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, (), skip_token_ids=(tokenizer.eos_token_id,))
    ids = tokenizer("ok", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text = "".join(detok.add(i).text for i in ids) + detok.flush()
    assert text == "ok"
