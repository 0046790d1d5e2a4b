"""Every input the coverage-guided fuzzer kept (tests/fuzz/corpus) still decodes or fails with InvalidArgument."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.fuzz_validation import check

CORPUS = sorted((Path(__file__).parent / "fuzz" / "corpus").iterdir())


def test_the_corpus_is_not_empty():
    assert len(CORPUS) >= 5


@pytest.mark.parametrize("path", CORPUS, ids=[p.name[:16] for p in CORPUS])
def test_corpus_input(path):
    check(path.read_bytes())
