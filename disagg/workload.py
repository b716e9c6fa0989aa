"""A document-QA workload built from the docstrings of Python standard-library modules.

Every Python install carries these documents, so the workload needs no download
and no data file, and no one in this project wrote the text. Each request is a
chat prompt: a system message, then a user message holding one module's
docstring (cut to a character budget) and a question that the docstring answers.

The prompts depend only on the running Python version's docstrings and the
arguments, so two calls in the same interpreter build the same list.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Tried in this order. A module that is missing (sqlite3 is optional in some
# builds) or whose docstring is shorter than MIN_DOC_CHARS is skipped.
CANDIDATE_MODULES: tuple[str, ...] = (
    "heapq", "json", "csv", "itertools", "statistics", "difflib",
    "argparse", "collections", "sched", "struct", "uuid", "copy",
    "tempfile", "unittest", "sqlite3", "typing", "pprint", "string",
)
MAX_DOCUMENTS = 12

# Docstrings shorter than this (bisect's is "Bisection algorithms.") contain
# too little to answer a question from.
MIN_DOC_CHARS = 500

# Below this budget the excerpt no longer answers the questions.
MIN_DOC_CHARS_BUDGET = 200

SYSTEM_PROMPT = (
    "You are a concise assistant. Answer questions about Python documentation "
    "using only the document you are given."
)

QUESTION_TEMPLATES: tuple[str, ...] = (
    "In two sentences, what is the `{module}` module for?",
    "Name two functions or classes that the document says `{module}` provides, and say what each one does.",
    "Give one concrete task that you would solve with the `{module}` module, based on the document.",
    "Summarize the documentation of `{module}` in one sentence for a Python beginner.",
)


@dataclass(frozen=True)
class Document:
    """One module's docstring, possibly cut to a character budget."""

    module: str
    text: str
    truncated: bool  # True when the docstring was longer than the budget


@dataclass(frozen=True)
class DocQuestion:
    """One request of the workload: a question about one module's documentation."""

    module: str
    question: str
    document: Document

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat messages of this request, as a new list on every access."""
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _user_message(self.module, self.document, self.question)},
        ]


def build_doc_qa_prompts(num_requests: int, max_doc_chars: int = 1500) -> list[DocQuestion]:
    """Build ``num_requests`` document questions, each document cut to ``max_doc_chars`` characters.

    Request ``i`` is a question about document ``i % D`` of the D available documents.
    Each pass over the documents shifts the question templates by one, so the
    first ``D * len(QUESTION_TEMPLATES)`` requests are distinct (module,
    question) pairs, and later requests repeat them in the same order.

    Raises ``ValueError`` for a non-positive ``num_requests`` or a budget below
    ``MIN_DOC_CHARS_BUDGET``, and ``RuntimeError`` when no candidate module has
    a usable docstring (for example under ``python -OO``, which strips them).
    """
    if not isinstance(num_requests, int) or num_requests < 1:
        raise ValueError(f"num_requests={num_requests!r} is invalid: it must be an integer >= 1.")
    if not isinstance(max_doc_chars, int) or max_doc_chars < MIN_DOC_CHARS_BUDGET:
        raise ValueError(
            f"max_doc_chars={max_doc_chars!r} is invalid: it must be an integer >= {MIN_DOC_CHARS_BUDGET} "
            "so that the excerpt can answer the questions."
        )

    documents = load_documents(max_doc_chars)
    questions = []
    for index in range(num_requests):
        document = documents[index % len(documents)]
        pass_index = index // len(documents)
        template = QUESTION_TEMPLATES[(index + pass_index) % len(QUESTION_TEMPLATES)]
        questions.append(DocQuestion(document.module, template.format(module=document.module), document))
    return questions


def load_documents(max_doc_chars: int) -> list[Document]:
    """Return up to ``MAX_DOCUMENTS`` module docstrings in ``CANDIDATE_MODULES`` order.

    Raises ``RuntimeError`` when no candidate has a docstring of at least
    ``MIN_DOC_CHARS`` characters.
    """
    documents = []
    for module in CANDIDATE_MODULES:
        text = module_docstring(module)
        if text is None:
            continue
        documents.append(truncate_document(module, text, max_doc_chars))
        if len(documents) == MAX_DOCUMENTS:
            break

    if not documents:
        raise RuntimeError(
            f"workload: none of the modules {', '.join(CANDIDATE_MODULES)} has a docstring of at least "
            f"{MIN_DOC_CHARS} characters. Python started with -OO strips docstrings."
        )
    return documents


def module_docstring(module: str) -> str | None:
    """Return the cleaned docstring of a standard-library module, or None when it is missing or short."""
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        logger.debug("workload skips %s: %s", module, exc)
        return None

    text = (inspect.getdoc(imported) or "").strip()
    if len(text) < MIN_DOC_CHARS:
        logger.debug("workload skips %s: docstring has %d characters, below %d", module, len(text), MIN_DOC_CHARS)
        return None
    return text


def truncate_document(module: str, text: str, max_chars: int) -> Document:
    """Cut ``text`` to at most ``max_chars`` characters, at a paragraph or line break when one is near.

    A break is used only when it keeps at least half of the budget, so a long
    first paragraph is cut mid-line rather than dropped.
    """
    if len(text) <= max_chars:
        return Document(module, text, truncated=False)

    head = text[:max_chars]
    for separator in ("\n\n", "\n"):
        cut = head.rfind(separator)
        if cut >= max_chars // 2:
            return Document(module, head[:cut].rstrip(), truncated=True)
    return Document(module, head.rstrip(), truncated=True)


def _user_message(module: str, document: Document, question: str) -> str:
    kind = "an excerpt of the documentation" if document.truncated else "the documentation"
    return (
        f"Here is {kind} of the Python `{module}` module.\n\n"
        f"<document>\n{document.text}\n</document>\n\n"
        f"Question: {question}"
    )
