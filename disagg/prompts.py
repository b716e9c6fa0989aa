"""Turn a user prompt (text, token ids or chat messages) into validated token ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union  # noqa: F401 - Union keeps the alias valid on Python 3.10

Prompt = Union[str, Sequence[int], Sequence[Mapping[str, Any]]]  # noqa: UP007


def encode_prompt(prompt: Prompt, tokenizer) -> list[int]:
    """Return the prompt's token ids; raise ``ValueError`` naming what is wrong and the fix.

    Chat messages are rendered with the model's chat template and a generation
    prompt, so the model answers as the assistant.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is an empty string: pass at least one character of text.")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])

    if not isinstance(prompt, Sequence) or isinstance(prompt, (bytes, bytearray)):
        raise ValueError(
            f"prompt of type {type(prompt).__name__} is not supported: pass a str, a list of token ids "
            'or a list of chat messages like [{"role": "user", "content": "..."}].'
        )
    if len(prompt) == 0:
        raise ValueError("prompt is an empty list: pass at least one token id or one chat message.")
    if all(isinstance(item, Mapping) for item in prompt):
        return _encode_chat(prompt, tokenizer)
    return _check_token_ids(prompt, len(tokenizer))


def check_length(num_prompt_tokens: int, max_tokens: int, max_seq_len: int, max_model_len: int) -> None:
    """Raise ``ValueError`` when the prompt or prompt + output cannot fit."""
    if num_prompt_tokens >= max_model_len:
        raise ValueError(
            f"prompt has {num_prompt_tokens} tokens, beyond the model's context of {max_model_len} "
            f"(its prompt must be at most {max_model_len - 1} tokens): shorten the prompt."
        )
    if num_prompt_tokens + max_tokens > max_seq_len:
        raise ValueError(
            f"prompt of {num_prompt_tokens} tokens plus max_tokens={max_tokens} exceeds max_seq_len={max_seq_len}: "
            "lower max_tokens, shorten the prompt, or launch with a larger max_seq_len "
            f"(at most {max_model_len})."
        )


def _encode_chat(messages: Sequence[Mapping[str, Any]], tokenizer) -> list[int]:
    for index, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(
                f"chat message {index} has role={role!r}: every message needs a non-empty 'role' "
                "such as 'system', 'user' or 'assistant'."
            )
        if not isinstance(content, str) or not content:
            raise ValueError(
                f"chat message {index} (role {role!r}) has content={content!r}: every message needs a "
                "non-empty 'content' string."
            )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: pass the prompt as text or token ids instead.")
    text = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_token_ids(prompt: Sequence[Any], vocab_size: int) -> list[int]:
    token_ids = list(prompt)
    for index, token_id in enumerate(token_ids):
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < vocab_size:
            raise ValueError(
                f"prompt token {index} is {token_id!r}: token ids must be integers in [0, {vocab_size}); "
                "a list prompt must hold only token ids or only chat-message dicts."
            )
    return token_ids
