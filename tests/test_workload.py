"""The standard-library document-QA workload: pure Python, no Ray."""

from __future__ import annotations

import pytest

from disagg import workload
from disagg.workload import (
    MAX_DOCUMENTS,
    QUESTION_TEMPLATES,
    SYSTEM_PROMPT,
    build_doc_qa_prompts,
    load_documents,
    truncate_document,
)


def as_tuples(questions):
    return [(q.module, q.question, q.messages) for q in questions]


def test_prompts_deterministic():
    first = build_doc_qa_prompts(20, 800)
    second = build_doc_qa_prompts(20, 800)

    assert as_tuples(first) == as_tuples(second)


def test_prompts_are_chat_messages():
    for question in build_doc_qa_prompts(MAX_DOCUMENTS, 1500):
        system, user = question.messages
        assert system == {"role": "system", "content": SYSTEM_PROMPT}
        assert user["role"] == "user"
        assert question.document.text.strip()
        assert question.document.text in user["content"]
        assert user["content"].endswith(f"Question: {question.question}")
        assert f"`{question.module}`" in question.question


def test_messages_are_fresh_lists():
    question = build_doc_qa_prompts(1)[0]
    question.messages.append({"role": "user", "content": "extra"})

    assert len(question.messages) == 2


@pytest.mark.parametrize("max_doc_chars", [200, 500, 1500, 100_000])
def test_documents_fit_budget(max_doc_chars):
    for question in build_doc_qa_prompts(MAX_DOCUMENTS, max_doc_chars):
        document = question.document
        assert 0 < len(document.text) <= max_doc_chars, document.module
        full = workload.module_docstring(document.module)
        assert document.truncated == (len(full) > max_doc_chars), document.module
        assert full.startswith(document.text), document.module


def test_excerpt_is_labelled():
    short = build_doc_qa_prompts(1, 200)[0]
    whole = build_doc_qa_prompts(1, 100_000)[0]

    assert short.document.truncated
    assert "an excerpt of the documentation" in short.messages[1]["content"]
    assert not whole.document.truncated
    assert "Here is the documentation" in whole.messages[1]["content"]


def test_first_pass_covers_distinct_modules():
    num_documents = len(load_documents(1500))
    questions = build_doc_qa_prompts(num_documents)

    assert len({q.module for q in questions}) == num_documents
    assert len({q.question for q in questions}) == num_documents


def test_questions_differ_until_cycle():
    num_pairs = len(load_documents(1500)) * len(QUESTION_TEMPLATES)
    questions = build_doc_qa_prompts(num_pairs + 3)
    pairs = [(q.module, q.question) for q in questions]

    assert len(set(pairs[:num_pairs])) == num_pairs
    assert pairs[num_pairs:] == pairs[:3]


def test_templates_rotate_per_pass():
    num_documents = len(load_documents(1500))
    questions = build_doc_qa_prompts(num_documents + 1)
    module = questions[0].module

    assert questions[0].question == QUESTION_TEMPLATES[0].format(module=module)
    assert questions[num_documents].module == module
    assert questions[num_documents].question == QUESTION_TEMPLATES[1].format(module=module)


def test_document_count():
    # All 18 candidates qualify on CPython 3.11.7, so a floor of 8 leaves room for other versions.
    assert 8 <= len(load_documents(1500)) <= MAX_DOCUMENTS


def test_missing_and_short_modules_skipped(monkeypatch):
    # bisect's docstring is the single line "Bisection algorithms."
    monkeypatch.setattr(workload, "CANDIDATE_MODULES", ("no_such_module_for_disagg", "bisect", "heapq"))

    documents = load_documents(1500)

    assert [d.module for d in documents] == ["heapq"]
    assert {q.module for q in build_doc_qa_prompts(3)} == {"heapq"}


def test_no_usable_module_raises(monkeypatch):
    monkeypatch.setattr(workload, "CANDIDATE_MODULES", ("no_such_module_for_disagg", "bisect"))

    with pytest.raises(RuntimeError, match="no_such_module_for_disagg, bisect"):
        build_doc_qa_prompts(1)


@pytest.mark.parametrize("num_requests", [0, -1, 2.5])
def test_invalid_num_requests(num_requests):
    with pytest.raises(ValueError, match="num_requests"):
        build_doc_qa_prompts(num_requests)


def test_invalid_budget():
    with pytest.raises(ValueError, match="max_doc_chars=199"):
        build_doc_qa_prompts(1, 199)


def test_truncate_at_paragraph_break():
    text = "first paragraph\n\nsecond paragraph is longer\n\nthird"

    document = truncate_document("m", text, 30)

    assert document.text == "first paragraph"
    assert document.truncated


def test_truncate_at_line_break():
    text = "one line of text\nanother line\n\nlast"

    document = truncate_document("m", text, 24)

    assert document.text == "one line of text"


def test_truncate_mid_line_when_break_is_early():
    # The only break keeps 3 of 20 characters, under half the budget.
    text = "ab\n" + "x" * 40

    document = truncate_document("m", text, 20)

    assert document.text == "ab\n" + "x" * 17
    assert document.truncated


def test_truncate_keeps_short_text():
    document = truncate_document("m", "short text", 10)

    assert document.text == "short text"
    assert not document.truncated
