"""Cross-node prefix reuse on a two-node Ray cluster simulated on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

SCENARIO = Path(__file__).with_name("two_node_scenario.py")


def test_prefix_stored_on_one_node_reused_on_other():
    # Own process: the session's Ray instance cannot also join a second cluster.
    done = subprocess.run([sys.executable, str(SCENARIO)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-4000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])

    assert facts["distinct_nodes"] == 2
    assert facts["storer_node"] != facts["reader_node"]
    assert facts["cached_tokens"] == 4 * 16
    assert facts["first_token_matches"]
    # Four chunks of 16 tokens x 2,048 bytes per token came over NIXL into the reader.
    assert facts["nixl_bytes_read_by_reader"] == 4 * 16 * 2048
    assert facts["pool_hits"][facts["storer_node"]] >= 4
    assert facts["leases_active"] == 0
    assert facts["outbox_blocks_used"] == 0
    assert facts["pinned"] == 0
