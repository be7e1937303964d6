"""Tokenizers: sentencepiece training with known special ids, round trips, the batch path, HF."""

from __future__ import annotations

import builtins
import sys

import pytest

from data_fixtures import *  # noqa: F401,F403
from trident.data.sources import iter_texts
from trident.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from trident.errors import UserError


def test_special_ids_and_vocab(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 512
    assert (tok.unk_id, tok.bos_id, tok.eod_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2, 3)


def test_round_trip_keeps_code_whitespace(sp_model, stdlib_jsonl):
    tok = load_tokenizer(sp_model)
    texts = list(iter_texts([str(stdlib_jsonl)]))
    sample = "def f(x):\n\tif x:\n        return  '\u00e9\u4e2d\U0001f600'\n"  # tabs, runs of spaces, non-ASCII
    for text in texts[:5] + [sample]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.unk_id not in tok.encode(sample)  # byte fallback: never <unk>


def test_batch_multithreaded_path_equals_per_document(sp_model, stdlib_jsonl):
    tok = load_tokenizer(sp_model)
    texts = list(iter_texts([str(stdlib_jsonl)]))
    one_by_one = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=4) == one_by_one
    assert tok.encode_batch(texts) == one_by_one  # all cores


def test_cli_train_unigram_and_info(tmp_path, stdlib_jsonl, capsys):
    assert run_cli(
        ["tokenizer", "train", "--input", str(stdlib_jsonl), "--vocab-size", "400", "--model-type", "unigram",
         "--output", str(tmp_path / "uni")]
    ) == 0
    assert (tmp_path / "uni.model").exists() and not list(tmp_path.glob("*.tmp*"))
    tok = load_tokenizer(tmp_path / "uni.model")
    assert tok.eod_id == 2 and tok.vocab_size <= 400
    assert run_cli(["tokenizer", "info", str(tmp_path / "uni.model")]) == 0
    assert "eod=2" in capsys.readouterr().out


def test_training_errors(tmp_path):
    with pytest.raises(UserError, match="--model-type 'word'"):
        train_sentencepiece(["x"], tmp_path / "t", 512, "word")
    with pytest.raises(UserError, match="--vocab-size 100"):
        train_sentencepiece(["x"], tmp_path / "t", 100)
    with pytest.raises(UserError, match="no non-empty text"):
        train_sentencepiece(["", "  \n"], tmp_path / "t", 512)
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="cannot tell the tokenizer type"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "none.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path / "bad.model")


@pytest.fixture(scope="module")
def hf_json(data_dir, stdlib_jsonl):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(iter_texts([str(stdlib_jsonl)]), trainer=trainer)
    path = data_dir / "hf" / "tokenizer.json"
    path.parent.mkdir(exist_ok=True)
    tok.save(str(path))
    return path


def test_hf_tokenizer(hf_json, stdlib_jsonl):
    tok = load_tokenizer(hf_json)
    assert isinstance(tok, HFTokenizer)
    assert tok.eod_id == 0 and tok.pad_id == 1 and tok.bos_id is None
    texts = list(iter_texts([str(stdlib_jsonl)]))[:10]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    assert load_tokenizer(hf_json.parent).vocab_size == tok.vocab_size  # a folder works too
    assert load_tokenizer(hf_json, eod_token="<pad>").eod_id == 1
    with pytest.raises(UserError, match="'<nope>' is not in the vocabulary"):
        load_tokenizer(hf_json, eod_token="<nope>")


def test_hf_missing_package_message(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "tokenizers", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(UserError, match=r"pip install 'trident\[hf\]'"):
        load_tokenizer(tmp_path / "tokenizer.json")
