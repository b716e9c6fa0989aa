"""Helpers shared by the benchmarks: machine facts, progress lines, tables and the results page.

Each benchmark owns one section of ``docs/benchmarks.md``, delimited by HTML
comments that markdown renderers hide::

    <!-- bench:serving -->
    ...generated text, replaced on every run...
    <!-- /bench:serving -->

``write_section`` replaces only the text between one pair of markers, so
several benchmarks share the page and the hand-written header stays as it is.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PAGE = REPO_ROOT / "docs" / "benchmarks.md"

# Distributions whose versions go into every record. NIXL is looked up by
# distribution name, because `import nixl` imports torch and changes logging.
VERSIONED_DISTRIBUTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python", ()),
    ("torch", ("torch",)),
    ("transformers", ("transformers",)),
    ("ray", ("ray",)),
    ("nixl", ("nixl-cu12", "nixl-cu13", "nixl")),
)

_STARTED_AT = time.perf_counter()


def progress(message: str) -> None:
    """Print one progress line to stderr, prefixed with seconds since the benchmark started."""
    print(f"[{time.perf_counter() - _STARTED_AT:7.1f} s] {message}", file=sys.stderr, flush=True)


def package_versions() -> dict[str, str]:
    """Return the version of each package in ``VERSIONED_DISTRIBUTIONS``, or "not installed"."""
    versions = {}
    for label, distributions in VERSIONED_DISTRIBUTIONS:
        if not distributions:
            versions[label] = platform.python_version()
            continue
        versions[label] = "not installed"
        for distribution in distributions:
            try:
                versions[label] = f"{importlib.metadata.version(distribution)} ({distribution})"
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def describe_versions() -> str:
    """Return the package versions as one line, such as ``python 3.11.9, torch 2.13.0+cpu (torch), ...``."""
    return ", ".join(f"{label} {version}" for label, version in package_versions().items())


def describe_machine() -> str:
    """Return the OS, CPU model, logical CPU count and memory of this machine as one line."""
    memory_gib = _total_memory_bytes() / 2**30
    cpu_model = _cpu_model() or platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, {cpu_model}, "
        f"{os.cpu_count()} logical CPUs, {memory_gib:.0f} GiB RAM"
    )


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def describe_revision(repo: Path = REPO_ROOT, page: Path = RESULTS_PAGE) -> str:
    """Return the checked-out commit, such as ``bfaa82a (uncommitted changes)``, or why it is unknown.

    Changes to ``page``, where the results go, and untracked files do not count as uncommitted changes.
    """
    try:
        commit = _git(repo, "rev-parse", "--short", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".",
                     f":(exclude){page.relative_to(repo)}")
    except (OSError, ValueError, subprocess.SubprocessError):
        return "unknown (not a git checkout, or git is missing)"
    return f"{commit} (uncommitted changes)" if dirty else commit


def _git(repo: Path, *args: str) -> str:
    completed = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                               timeout=10)
    return completed.stdout.strip()


def utc_date() -> str:
    """Return the current UTC date and time, to the minute, as ``YYYY-MM-DD HH:MM UTC``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def median(values: Sequence[float]) -> float:
    """Return the median of ``values``. Raise ``ValueError`` when there are none."""
    if not values:
        raise ValueError("median of no measurements: run at least one repetition.")
    return statistics.median(values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render a GitHub-flavoured markdown table with padded columns. Cells are formatted with ``str``.

    Raises ``ValueError`` when a row has a different number of cells than ``headers``.
    """
    cells = [[str(h) for h in headers]]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table row {list(row)!r} has {len(row)} cells, the header has {len(headers)}.")
        cells.append([str(cell).replace("|", "\\|") for cell in row])

    widths = [max(len(line[column]) for line in cells) for column in range(len(headers))]
    lines = [_table_line(cells[0], widths), _table_line(["-" * w for w in widths], widths)]
    lines += [_table_line(line, widths) for line in cells[1:]]
    return "\n".join(lines)


def _table_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"


def section_markers(name: str) -> tuple[str, str]:
    """Return the opening and closing marker lines of section ``name``."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"section name {name!r} is invalid: use lower-case letters, digits and underscores.")
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def write_section(name: str, body: str, page: Path = RESULTS_PAGE) -> None:
    """Replace the text between section ``name``'s markers in ``page``, or append the section.

    Creates ``page`` with a title when it does not exist. Only the marked
    section changes, and the rest of the page is kept byte for byte. The page is
    written to a temporary file and renamed into place, so a crash leaves the
    old page whole. Raises ``RuntimeError`` when the page contains only one of
    the two markers, or both out of order.
    """
    start_marker, end_marker = section_markers(name)
    text = page.read_text(encoding="utf-8") if page.exists() else "# Benchmarks\n"
    section = f"{start_marker}\n{body.strip()}\n{end_marker}"

    start, end = text.find(start_marker), text.find(end_marker)
    if start == -1 and end == -1:
        new_text = text.rstrip("\n") + "\n\n" + section + "\n"
    elif start == -1 or end == -1 or end < start:
        raise RuntimeError(
            f"{page}: the markers of section {name!r} are unpaired or out of order. "
            f"Fix or delete the lines {start_marker!r} and {end_marker!r} by hand."
        )
    else:
        new_text = text[:start] + section + text[end + len(end_marker):]

    page.parent.mkdir(parents=True, exist_ok=True)
    temporary = page.with_name(f".{page.name}.tmp-{os.getpid()}")
    temporary.write_text(new_text, encoding="utf-8")
    temporary.replace(page)


class LoadMonitor:
    """Background sampler of the 1-minute load average, taken every ``interval_s`` seconds until closed."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-load-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.samples.append(os.getloadavg()[0])

    def close(self) -> None:
        """Stop sampling after one last sample. Idempotent."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.samples.append(os.getloadavg()[0])

    def describe(self) -> str:
        """Return the range of the samples, with a warning when the load exceeded the logical CPU count."""
        low, high = min(self.samples), max(self.samples)
        text = f"1-minute load average {low:.1f} to {high:.1f} during the run"
        cpus = os.cpu_count() or 1
        if high > cpus:
            text += (f" (**busy machine**: more runnable threads than the {cpus} logical CPUs, so absolute "
                     "times are inflated and ratios are noisier than usual)")
        return text


def cpu_seconds_by_process() -> dict[str, float]:
    """Return the user + system CPU seconds of this process ("driver") and each descendant, by name.

    Ray names its worker processes after the actor class (``ray::DecodeWorker``),
    and processes with the same name are summed. A process that exits while it is
    read is skipped.
    """
    driver = psutil.Process()
    totals: dict[str, float] = {}
    for process in [driver, *driver.children(recursive=True)]:
        try:
            name = "driver" if process.pid == driver.pid else _process_name(process)
            totals[name] = totals.get(name, 0.0) + sum(process.cpu_times()[:2])
        except psutil.Error:
            continue
    return totals


def cpu_percent_between(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Return each process's CPU use between two ``cpu_seconds_by_process`` snapshots, in % of one core."""
    return {name: (seconds - before.get(name, 0.0)) / wall_s * 100 for name, seconds in sorted(after.items())}


def _process_name(process: psutil.Process) -> str:
    cmdline = process.cmdline()
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    return process.name()
