"""Start-up shared by every worker actor."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from disagg.config import EngineConfig
from disagg.model.runner import ModelRunner
from disagg.model.sources import resolve_model


def configure_process(threads: int) -> None:
    """Pin torch threads and set up logging inside a worker process."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_runner(config: EngineConfig, threads: int) -> ModelRunner:
    configure_process(threads)
    cache_dir = None if config.cache_dir is None else Path(config.cache_dir)
    model = resolve_model(config.model, cache_dir)
    return ModelRunner(model, dtype=config.dtype, num_threads=threads)


def compat_fields(runner: ModelRunner, config: EngineConfig) -> dict:
    return runner.layout.compat_fields(runner.resolved.name, runner.resolved.weights_digest,
                                       config.prefill_block_tokens)
