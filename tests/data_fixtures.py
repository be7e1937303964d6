"""Session fixtures for the data tests: a small real corpus, a tokenizer, a dataset.

Small on purpose (a few hundred KB of stdlib sources, a 512-piece BPE trained in well
under a second) so the whole data suite stays fast on two busy cores. Import the
fixtures into a test module with ``from data_fixtures import *``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from trident.data.corpus import write_stdlib_corpus
from trident.data.indexed import IndexedDatasetWriter
from trident.errors import UserError

# A deterministic slice of the stdlib: these files exist in every CPython 3.10+.
STDLIB_SUBSET = ["json/*.py", "html/*.py", "textwrap.py", "colorsys.py", "bisect.py", "keyword.py"]

__all__ = ["data_dir", "stdlib_jsonl", "sp_model", "stdlib_prefix", "write_synthetic", "synthetic_prefix", "run_cli"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def stdlib_jsonl(data_dir: Path) -> Path:
    path = data_dir / "stdlib.jsonl"
    write_stdlib_corpus(path, include=STDLIB_SUBSET)
    return path


@pytest.fixture(scope="session")
def sp_model(data_dir: Path, stdlib_jsonl: Path) -> Path:
    from trident.data.sources import iter_texts
    from trident.data.tokenizer import train_sentencepiece

    return Path(train_sentencepiece(iter_texts([str(stdlib_jsonl)]), data_dir / "sp512", 512, "bpe"))


@pytest.fixture(scope="session")
def stdlib_prefix(data_dir: Path, stdlib_jsonl: Path, sp_model: Path) -> str:
    from trident.data.preprocess import preprocess

    prefix = str(data_dir / "stdlib_text_document")
    preprocess([str(stdlib_jsonl)], prefix, str(sp_model), append_eod=True, progress=False)
    return prefix


def write_synthetic(
    prefix: str | Path, lengths: list[int] | np.ndarray, dtype=np.int32, start: int = 1
) -> list[np.ndarray]:
    """Documents whose tokens are start, start+1, ... across the corpus: every token is unique,
    so where a token lands in a sample says exactly which document and offset it came from."""
    docs = []
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for n in lengths:
            doc = np.arange(start, start + int(n), dtype=np.int64)
            start += int(n)
            writer.add_document(doc)
            docs.append(doc)
    return docs


@pytest.fixture(scope="session")
def synthetic_prefix(data_dir: Path) -> tuple[str, list[np.ndarray]]:
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 60, size=200)
    prefix = str(data_dir / "synthetic")
    return prefix, write_synthetic(prefix, lengths)


_CLI_MODULES = {
    "preprocess": "trident.tools.preprocess",
    "tokenizer": "trident.tools.tokenizer_cmd",
    "corpus": "trident.tools.corpus_cmd",
}


def run_cli(argv: list[str]) -> int:
    """Run a data subcommand in process through its real ``register``, as tools/cli.py does
    (a UserError prints one line and returns 2), without importing every other subcommand."""
    parser = argparse.ArgumentParser(prog="trident")
    sub = parser.add_subparsers(dest="command")
    importlib.import_module(_CLI_MODULES[argv[0]]).register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"trident {args.command}: error: {err}", file=sys.stderr)
        return 2
