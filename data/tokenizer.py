"""Tokenizers: one small interface, a sentencepiece implementation, and Hugging Face as an extra.

Everything downstream (preprocessing, the GPT dataset's loss mask) needs only ``encode``,
``encode_batch``, ``decode``, ``vocab_size`` and the special ids. ``encode_batch`` is the
path for many documents: it hands the whole list to the library's own thread pool (C++ in
sentencepiece, Rust in ``tokenizers``) instead of looping in Python.

Models trained by ``train_sentencepiece`` have fixed special ids, so configs can rely on
them: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (the end-of-document token), ``<pad>`` 3.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from trident.errors import UserError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class Tokenizer(ABC):
    """The interface the data pipeline uses; ids absent from a vocabulary are ``None``."""

    vocab_size: int
    eod_id: int | None
    bos_id: int | None
    pad_id: int | None
    unk_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS (documents get EOD from the preprocessor)."""

    @abstractmethod
    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed by the library's threads; 0 = all cores."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    def describe(self) -> str:
        return (
            f"{type(self).__name__}: vocab_size={self.vocab_size} eod={self.eod_id} "
            f"bos={self.bos_id} pad={self.pad_id} unk={self.unk_id}"
        )


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        import sentencepiece as spm

        self.path = os.fspath(model_path)
        if not os.path.isfile(self.path):
            raise UserError(f"tokenizer model {self.path} does not exist; train one with `trident tokenizer train`.")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as err:
            raise UserError(f"{self.path} is not a sentencepiece model ({err}).") from None
        self.vocab_size = int(self._sp.get_piece_size())

        def _id(value: int) -> int | None:
            return int(value) if value >= 0 else None

        self.eod_id = _id(self._sp.eos_id())
        self.bos_id = _id(self._sp.bos_id())
        self.pad_id = _id(self._sp.pad_id())
        self.unk_id = _id(self._sp.unk_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        # sentencepiece spreads a list over a C++ thread pool; -1 means "all cores" there.
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads if num_threads > 0 else -1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# Names that mark the special tokens in common tokenizer.json files, most specific first.
_HF_SPECIALS: dict[str, tuple[str, ...]] = {
    "eod": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]"),
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
    "unk": ("<unk>", "<|unk|>", "[UNK]"),
}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` through the optional ``tokenizers`` package."""

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise UserError(
                f"{os.fspath(path)} is a Hugging Face tokenizer, which needs the optional `tokenizers` "
                "package; install it with `pip install 'trident[hf]'`."
            ) from None
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.path = os.path.join(self.path, "tokenizer.json")
        if not os.path.isfile(self.path):
            raise UserError(f"tokenizer file {self.path} does not exist.")
        try:
            self._tok = _HF.from_file(self.path)
        except Exception as err:  # the Rust side raises plain Exception subclasses
            raise UserError(f"{self.path} is not a valid tokenizer.json ({err}).") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

        def find(kind: str) -> int | None:
            for name in _HF_SPECIALS[kind]:
                token_id = self._tok.token_to_id(name)
                if token_id is not None:
                    return int(token_id)
            return None

        if eod_token is not None:
            eod = self._tok.token_to_id(eod_token)
            if eod is None:
                raise UserError(f"end-of-document token {eod_token!r} is not in the vocabulary of {self.path}.")
            self.eod_id = int(eod)
        else:
            self.eod_id = find("eod")
        self.bos_id, self.pad_id, self.unk_id = find("bos"), find("pad"), find("unk")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        # The Rust side parallelises a batch itself (RAYON_NUM_THREADS caps it); num_threads
        # is accepted for the common interface.
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | os.PathLike, eod_token: str | None = None) -> Tokenizer:
    """Open a tokenizer by file: ``*.model`` is sentencepiece, ``*.json`` or a folder is HF."""
    text = os.fspath(path)
    if text.endswith(".json") or os.path.isdir(text):
        return HFTokenizer(text, eod_token=eod_token)
    if text.endswith(".model"):
        if eod_token is not None:
            raise UserError("--eod-token applies to Hugging Face tokenizers; a sentencepiece model uses its </s> id.")
        return SentencePieceTokenizer(text)
    raise UserError(
        f"cannot tell the tokenizer type of {text}; give a sentencepiece .model file or a Hugging Face tokenizer.json."
    )


def _training_pieces(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Documents cut at line ends into pieces under ``max_bytes``.

    sentencepiece learns from "sentences" and drops any longer than its limit; cutting at
    line ends (and keeping the newlines) lets it see every line and learn newline and
    indentation pieces, which matter for code.
    """
    for doc in documents:
        piece: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if piece and size + n > max_bytes:
                yield "".join(piece)
                piece, size = [], 0
            if n > max_bytes:  # one overlong line: keep its head, the rest adds little
                line = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
                n = len(line.encode("utf-8"))
            piece.append(line)
            size += n
        if piece and "".join(piece).strip():
            yield "".join(piece)


def train_sentencepiece(
    documents: Iterable[str],
    output_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
    num_threads: int = 0,
) -> str:
    """Train a sentencepiece model on ``documents`` and write ``PREFIX.model`` (atomically).

    Byte fallback is on, so no input is ever ``<unk>``; normalisation is the identity and
    whitespace is kept, so ``decode(encode(text)) == text`` holds for source code.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise UserError(f"--model-type {model_type!r} is not supported; use bpe or unigram.")
    # 4 specials + 256 byte pieces must fit, with room for at least a few learned pieces.
    if vocab_size < 300:
        raise UserError(f"--vocab-size {vocab_size} is too small; byte fallback needs at least 300.")
    prefix = os.fspath(output_prefix)
    if prefix.endswith(".model"):
        prefix = prefix[: -len(".model")]
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    pieces = _training_pieces(documents, max_bytes=4000)
    first = next(pieces, None)
    if first is None:
        raise UserError("the tokenizer training input holds no non-empty text.")

    def sentences() -> Iterator[str]:
        yield first
        yield from pieces

    tmp_prefix = f"{prefix}.tmp-{os.getpid()}"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="<pad>",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=4096,
            num_threads=num_threads if num_threads > 0 else (os.cpu_count() or 1),
            hard_vocab_limit=False,
            minloglevel=2,
        )
    except BaseException as err:
        for suffix in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + suffix):
                os.unlink(tmp_prefix + suffix)
        if isinstance(err, RuntimeError):
            raise UserError(f"sentencepiece training failed for vocab size {vocab_size}: {err}") from None
        raise
    os.replace(tmp_prefix + ".vocab", prefix + ".vocab")
    os.replace(tmp_prefix + ".model", prefix + ".model")
    return prefix + ".model"
