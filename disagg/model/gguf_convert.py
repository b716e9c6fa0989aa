"""Conversion of a GGUF file into a float32 transformers checkpoint directory.

transformers (5.25.0, with `gguf` installed) loads a GGUF file dequantized to
float32, but a model loaded that way rejects `save_pretrained` because its
config carries a GGUF `quantization_config`. The converter therefore rebuilds
the same architecture from the config without it, copies the state dict in
and saves that model, together with the tokenizer and chat template that the
GGUF file ships.
"""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a float32 checkpoint (config, safetensors, tokenizer) converted from `gguf_path` into `out_dir`.

    Raises RuntimeError if the saved tokenizer lost the GGUF file's eos token
    or chat template.
    """
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )
    model = _rebuild_without_quantization(gguf_model)
    del gguf_model
    model.save_pretrained(out_dir)

    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )
    tokenizer.save_pretrained(out_dir)

    _check_saved_checkpoint(out_dir, tokenizer, model.config.eos_token_id)


def _rebuild_without_quantization(gguf_model: PreTrainedModel) -> PreTrainedModel:
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)

    model = type(gguf_model)(config).eval()
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    return model


def _check_saved_checkpoint(out_dir: Path, gguf_tokenizer, eos_token_id: int | list[int] | None) -> None:
    saved_config = AutoConfig.from_pretrained(out_dir, local_files_only=True)
    if getattr(saved_config, "quantization_config", None) is not None:
        raise RuntimeError(f"GGUF converter: the config saved in {out_dir} still has a quantization_config")

    saved_tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if saved_tokenizer.chat_template != gguf_tokenizer.chat_template:
        raise RuntimeError(f"GGUF converter: the tokenizer saved in {out_dir} lost the GGUF chat template")

    eos_token_ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    wrong_eos_id = eos_token_id is not None and saved_tokenizer.eos_token_id not in eos_token_ids
    if saved_tokenizer.eos_token != gguf_tokenizer.eos_token or wrong_eos_id:
        raise RuntimeError(
            f"GGUF converter: the tokenizer saved in {out_dir} has eos {saved_tokenizer.eos_token!r} "
            f"(id {saved_tokenizer.eos_token_id}), expected {gguf_tokenizer.eos_token!r} with an id in "
            f"the config's eos_token_id {eos_token_id}"
        )
