"""The ``disagg`` command line: option errors without Ray, and one end-to-end demo on Ray."""

from __future__ import annotations

import json

import pytest

from disagg.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["serve"], "invalid choice: 'serve'"),
        (["demo", "--requests", "0"], "argument --requests: 0 is invalid: it must be >= 1"),
        (["demo", "--max-tokens", "many"], "argument --max-tokens: invalid integer: 'many'"),
        (["demo", "--transport", "tcp"], "argument --transport: invalid choice: 'tcp'"),
        (["demo", "--prefill-replicas", "-1"], "argument --prefill-replicas: -1 is invalid"),
        (["demo", "--unknown"], "unrecognized arguments: --unknown"),
    ],
)
def test_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    assert exit_info.value.code == 0
    assert "usage: disagg" in capsys.readouterr().out


def test_demo_help_names_units(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out

    for option in ("--model", "--transport", "--requests", "--max-tokens", "--max-doc-chars", "--max-seq-len",
                   "--prefill-replicas", "--decode-replicas", "--json"):
        assert option in out
    assert "maximum output tokens per answer" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--max-doc-chars", "100"], "max_doc_chars=100 is invalid"),
        (["demo", "--json", "/no/such/directory/out.json"], "directory /no/such/directory not found"),
        (["demo", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    ],
)
def test_value_error_is_one_line(argv, message, capsys):
    # Each of these fails before Ray starts.
    assert main(argv) == 2

    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("disagg demo: error:")]
    assert len(err_lines) == 1
    assert message in err_lines[0]


@pytest.mark.ray
def test_demo_end_to_end(tmp_path, capsys):
    summary_path = tmp_path / "summary.json"

    status = main(["demo", "--model", "tiny-random-llama", "--requests", "3", "--max-tokens", "4",
                   "--json", str(summary_path)])

    assert status == 0
    summary = json.loads(summary_path.read_text())
    rows = summary["requests"]
    assert summary["num_requests"] == 3
    assert summary["second_pass"]["num_requests"] == 3
    assert all(row["cached_tokens"] == 0 for row in rows)
    assert sum(row["cached_tokens"] for row in summary["second_pass"]["requests"]) > 0
    assert len(rows) == 3
    assert summary["wall_s"] > 0
    assert summary["output_tokens"] == sum(row["output_tokens"] for row in rows)
    for row in rows:
        assert row["ttft_s"] > 0, row
        assert row["transfer_bytes"] > 0, row
        assert 1 <= row["output_tokens"] <= 4, row
        assert row["prompt_tokens"] > 0, row
        assert row["prefill_s"] > 0, row
        assert row["transport"] in ("nixl", "object_store"), row
        assert row["finish_reason"] in ("stop", "length"), row
    assert len({row["module"] for row in rows}) == 3

    out = capsys.readouterr().out
    assert "[3/3]" in out
    assert "total: 3 requests" in out


@pytest.mark.ray
def test_demo_prompt_too_long(capsys):
    # The byte-level tiny model makes each prompt over 200 tokens, beyond --max-seq-len 64,
    # so the cluster starts and the request is rejected before any prefill.
    status = main(["demo", "--model", "tiny-random-llama", "--requests", "1", "--max-seq-len", "64"])

    assert status == 2
    err = capsys.readouterr().err
    assert "exceeds max_seq_len=64" in err
