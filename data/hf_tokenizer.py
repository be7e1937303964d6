"""The tokenizer half of a Hugging Face export: files that `AutoTokenizer` loads as is.

A sentencepiece ``.model`` is copied as ``tokenizer.model`` and also converted to a
``tokenizer.json`` (so `AutoTokenizer` needs neither sentencepiece nor protobuf); a HF
``tokenizer.json`` is copied. ``tokenizer_config.json`` names ``PreTrainedTokenizerFast``,
which loads that ``tokenizer.json`` unchanged, and asks for no BOS/EOS on encode, because
trident trains on documents without BOS, so ``AutoTokenizer(text).input_ids`` is exactly
what trident's tokenizer gives.

The conversion mirrors transformers' own SpmConverter. BPE models (trident's default)
convert exactly. Unigram models agree except, rarely, where two segmentations have the
same total score and the two libraries break the tie differently.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

from trident.data.tokenizer import load_tokenizer
from trident.errors import UserError


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --- reading a sentencepiece model without its protobuf package -----------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _proto_fields(buf: bytes) -> dict[int, list[int | bytes]]:
    """The top-level fields of a protobuf message (wire format only, no schema)."""
    fields: dict[int, list[int | bytes]] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(num, []).append(value)
    return fields


def sentencepiece_spec(model_path: str) -> dict:
    """The few settings of a sentencepiece model that its HF conversion depends on.

    Read from the model's protobuf by field number (sentencepiece_model.proto:
    ModelProto.trainer_spec=2 {model_type=3, byte_fallback=35}, normalizer_spec=3
    {name=1, precompiled_charsmap=2, add_dummy_prefix=3, remove_extra_whitespaces=4}),
    so neither the protobuf package nor transformers is needed; absent fields take the
    proto's defaults.
    """
    model = _proto_fields(Path(model_path).read_bytes())
    trainer = _proto_fields(model.get(2, [b""])[0])
    norm = _proto_fields(model.get(3, [b""])[0])
    model_type = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}[int(trainer.get(3, [1])[0])]
    return {
        "model_type": model_type,
        "byte_fallback": bool(trainer.get(35, [0])[0]),
        "normalizer": bytes(norm.get(1, [b"identity"])[0]).decode(),
        "precompiled_charsmap": bytes(norm.get(2, [b""])[0]),
        "add_dummy_prefix": bool(norm.get(3, [1])[0]),
        "remove_extra_whitespaces": bool(norm.get(4, [1])[0]),
    }


def sentencepiece_to_tokenizer_json(model_path: str) -> str:
    """A ``tokenizer.json`` computing the same ids as the sentencepiece model (BPE or unigram).

    Mirrors transformers' own SpmConverter/LlamaConverter: spaces become ``▁`` (with one
    prepended when the model adds a dummy prefix), byte pieces back unknown characters,
    and BPE merges are recovered from the vocabulary ordered by piece score.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    spec = sentencepiece_spec(model_path)
    sp = spm.SentencePieceProcessor(model_file=model_path)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    unk = sp.unk_id()
    if spec["model_type"] == "bpe":
        vocab = {p: i for i, p in enumerate(pieces)}
        merges: list[tuple[str, str, float]] = []
        for i, piece in enumerate(pieces):
            if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i):
                continue
            local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
            merges += [(left, right, sp.get_score(i)) for left, right in local]
        merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep the order above
        model = BPE(
            vocab=vocab,
            merges=[(left, right) for left, right, _ in merges],
            unk_token=pieces[unk] if unk >= 0 else None,
            fuse_unk=True,
            byte_fallback=spec["byte_fallback"],
        )
    elif spec["model_type"] == "unigram":
        model = Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)], unk_id=unk if unk >= 0 else None,
                        byte_fallback=spec["byte_fallback"])
    else:
        raise UserError(
            f"cannot export sentencepiece {spec['model_type']!r} models to Hugging Face; bpe and unigram are supported"
        )
    tok = Tokenizer(model)
    steps = []
    if spec["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spec["precompiled_charsmap"]))
    if spec["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_dummy_prefix"]:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    specials = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in specials])
    return tok.to_str(pretty=True)


def export_tokenizer(tokenizer_path: str, out_dir: Path, max_len: int) -> dict[str, int | None]:
    """Write the tokenizer files into `out_dir`; returns the special ids (for config.json)."""
    tok = load_tokenizer(tokenizer_path)
    ids = {"bos": tok.bos_id, "eos": tok.eod_id, "pad": tok.pad_id, "unk": tok.unk_id}

    if str(tokenizer_path).endswith(".model"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        piece: Callable[[int], str] = sp.id_to_piece
        spec = sentencepiece_spec(tokenizer_path)
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
        # The converted tokenizer.json is the exact pipeline, and "PreTrainedTokenizerFast"
        # makes AutoTokenizer load it as is. Naming "LlamaTokenizer" instead would not: from
        # transformers 5 on it rebuilds its own pre-tokenizer from the vocabulary, which
        # splits runs of leading spaces differently from sentencepiece.
        tokenizer_class, extra = "PreTrainedTokenizerFast", {}
        try:
            (out_dir / "tokenizer.json").write_text(sentencepiece_to_tokenizer_json(tokenizer_path))
        except ImportError:
            warnings.warn(
                "the `tokenizers` package is missing, so no tokenizer.json was written; transformers will then "
                "read tokenizer.model with sentencepiece (pip install 'trident[hf]' writes the exact tokenizer.json)",
                stacklevel=2,
            )
            tokenizer_class = "LlamaTokenizer"
            extra = {"legacy": False, "add_prefix_space": spec["add_dummy_prefix"]}
    else:
        src = Path(tokenizer_path)
        spec_json = json.loads((src / "tokenizer.json" if src.is_dir() else src).read_text())
        # trident encodes without the BOS/EOS a post-processor would add: so must AutoTokenizer
        spec_json["post_processor"] = None
        (out_dir / "tokenizer.json").write_text(json.dumps(spec_json, ensure_ascii=False))
        tokenizer_class, extra = "PreTrainedTokenizerFast", {}
        from tokenizers import Tokenizer as _HF

        piece = _HF.from_file(str(out_dir / "tokenizer.json")).id_to_token
    names = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token"}
    special = {names[k]: piece(i) for k, i in ids.items() if i is not None}
    config = {
        "tokenizer_class": tokenizer_class,
        # trident trains on documents without BOS/EOS around them: encode adds none
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        **extra,
        **special,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)
    return ids
