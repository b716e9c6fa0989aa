"""A seeded random-weight llama with a byte-level tokenizer, for fast tests.

It builds offline in under a second (once torch and transformers are
imported) and has the parts of a real checkpoint: a llama config with
grouped-query attention and tied embeddings, safetensors weights and a
tokenizer with a ChatML chat template.

Token ids::

    0 <|pad|>   1 <|im_start|>   2 <|im_end|> (eos)   3 + b  the byte b (0..255)
"""

import hashlib
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_SEED = 0

# Bumped whenever the weights built from the same seed and config change.
TINY_RECIPE_VERSION = 1

PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
NUM_BYTE_TOKENS = 256

# The ChatML layout of SmolLM2's template, without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# initializer_range is 0.5 rather than llama's 0.02: with 0.02 the logits are
# tiny and greedy argmax is close to a tie, so batched and one-row forwards
# could pick different tokens. With 0.5 the median top-1 to top-2 logit gap
# was about 1.4 over a 77-token chat prompt and its greedy continuation.
TINY_CONFIG = {
    "vocab_size": len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "initializer_range": 0.5,
    "tie_word_embeddings": True,
    "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
    "bos_token_id": None,
    "eos_token_id": SPECIAL_TOKENS.index(IM_END_TOKEN),
}


def tiny_digest() -> str:
    """Return the sha256 hex over the seed, recipe version and config of the tiny model."""
    recipe = {
        "name": "tiny-random-llama",
        "recipe_version": TINY_RECIPE_VERSION,
        "seed": TINY_SEED,
        "config": TINY_CONFIG,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def build_tiny_llama(out_dir: Path) -> None:
    """Write the tiny model's config, safetensors weights and tokenizer into `out_dir`."""
    model = _build_model()
    model.save_pretrained(out_dir)
    build_byte_tokenizer().save_pretrained(out_dir)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer: every UTF-8 byte is one token, there are no merges."""
    vocab = {token: token_id for token_id, token in enumerate(SPECIAL_TOKENS)}
    for byte, char in enumerate(_byte_to_unicode()):
        vocab[char] = len(SPECIAL_TOKENS) + byte

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )

    # clean_up_tokenization_spaces=False keeps " ." as it is, so decode(encode(text)) == text.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )


def _build_model() -> LlamaForCausalLM:
    config = LlamaConfig(**TINY_CONFIG)
    model = LlamaForCausalLM(config).eval()

    # Draw every weight from a private generator in parameter-name order, so the
    # weights depend on the seed and config only and not on how transformers
    # orders its own initialisation.
    # NOTE: torch.randn's output for a seed may change between torch versions,
    # but the cache of built models is keyed by the transformers version only.
    generator = torch.Generator().manual_seed(TINY_SEED)
    std = config.initializer_range
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    model.tie_weights()
    return model


def _byte_to_unicode() -> list[str]:
    """Return the printable character that byte-level BPE uses for each byte value 0..255.

    This is the GPT-2 byte-level mapping: printable Latin-1 bytes stand for
    themselves and the others take code points from 256 upwards, in byte order.
    """
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    chars = {}
    next_code_point = NUM_BYTE_TOKENS
    for byte in range(NUM_BYTE_TOKENS):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(next_code_point)
            next_code_point += 1

    if set(chars.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError(
            "tiny model: the byte-to-character table does not match the tokenizers ByteLevel alphabet"
        )
    return [chars[byte] for byte in range(NUM_BYTE_TOKENS)]
