"""Model runner: prefill of one prompt and batched decode steps over the arena."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from disagg.kv.arena import DecodeKVArena
from disagg.kv.layout import KVLayout, torch_dtype
from disagg.model.slot_cache import StepIndex, make_slot_cache
from disagg.model.sources import ResolvedModel

logger = logging.getLogger(__name__)


@dataclass
class PrefillResult:
    """Output of one prefill.

    ``layer_kv[l]`` is layer l's ``(k, v)``, each ``[kv_heads, num_tokens, head_dim]``,
    covering every prompt token (cached prefix included).
    """

    logits: torch.Tensor  # [vocab] at the last prompt position, float32
    layer_kv: list[tuple[torch.Tensor, torch.Tensor]]
    num_tokens: int
    num_computed_tokens: int
    forward_s: float


def load_tokenizer(model: ResolvedModel):
    return AutoTokenizer.from_pretrained(str(model.path))


class ModelRunner:
    """Owns the model weights and runs forward passes. Not thread-safe."""

    def __init__(self, model: ResolvedModel, dtype: str = "float32", num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        started = time.perf_counter()
        self.resolved = model
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model.path), dtype=torch_dtype(dtype), attn_implementation="sdpa"
        )
        self.model.eval()
        config = self.model.config
        self.layout = kv_layout_of(config, dtype)
        head_dim = self.layout.head_dim
        self.max_position_embeddings = config.max_position_embeddings
        self.eos_token_ids = _eos_ids(self.model)
        logger.info(
            "loaded model %s (%s, %d layers, %d KV heads, head_dim %d) in %.1f s; KV bytes per token: %d; "
            "torch threads: %d",
            model.name,
            dtype,
            self.layout.num_layers,
            self.layout.num_kv_heads,
            head_dim,
            time.perf_counter() - started,
            self.layout.bytes_per_token,
            torch.get_num_threads(),
        )

    @torch.inference_mode()
    def prefill(
        self,
        token_ids: list[int],
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        chunk_tokens: int = 2048,
    ) -> PrefillResult:
        """Run the prompt and return the last position's logits and every layer's KV.

        ``prefix_kv`` (per-layer ``[kv_heads, p, head_dim]``) supplies the
        first ``p`` positions; at least the last prompt token is always
        recomputed, because the first output token needs its hidden state.
        Long prompts run in chunks of ``chunk_tokens``; the result is exact.
        """
        started = time.perf_counter()
        num_prefix = prefix_kv[0][0].shape[1] if prefix_kv else 0
        if num_prefix >= len(token_ids):
            raise ValueError(f"prefix of {num_prefix} tokens must be shorter than the prompt ({len(token_ids)})")

        if prefix_kv:
            cache = DynamicCache([(k.unsqueeze(0), v.unsqueeze(0)) for k, v in prefix_kv])
        else:
            cache = DynamicCache()
        logits = None
        for start in range(num_prefix, len(token_ids), chunk_tokens):
            chunk = token_ids[start : start + chunk_tokens]
            input_ids = torch.tensor([chunk], dtype=torch.long)
            position_ids = torch.arange(start, start + len(chunk)).unsqueeze(0)
            out = self.model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True,
                             logits_to_keep=1)
            logits = out.logits[0, -1].float()

        layer_kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        return PrefillResult(
            logits=logits,
            layer_kv=layer_kv,
            num_tokens=len(token_ids),
            num_computed_tokens=len(token_ids) - num_prefix,
            forward_s=time.perf_counter() - started,
        )

    @torch.inference_mode()
    def decode_step(
        self, arena: DecodeKVArena, lo: int, input_ids: list[int], positions: list[int], active: list[bool]
    ) -> torch.Tensor:
        """Run one token for each slot in ``[lo, lo + len(input_ids))``; return ``[batch, vocab]`` logits.

        Mutates the arena: row i's new K/V lands at ``positions[i]`` of its slot.
        """
        step = StepIndex(lo, positions, active, arena.slot_tokens)
        cache = make_slot_cache([arena.layer_kv(layer) for layer in range(self.layout.num_layers)], step)
        out = self.model(
            input_ids=torch.tensor([[t] for t in input_ids], dtype=torch.long),
            position_ids=step.position_ids,
            attention_mask=step.attention_mask,
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()


def kv_layout_of(config, dtype: str) -> KVLayout:
    """Return the KV layout of a transformers model config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KVLayout(
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        dtype=dtype,
    )


def _eos_ids(model) -> tuple[int, ...]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None:
        ids = model.config.eos_token_id
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)
