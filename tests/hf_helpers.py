"""Tiny models, a tiny tokenizer and checkpoints of them, for the export/import and generation tests.

Everything is built here, in seconds: a sentencepiece BPE tokenizer trained on a few
standard-library files (the same text wherever the same Python is installed), models
initialised from a seed, and trident checkpoints written with `save_checkpoint`.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from trident.model.config import ModelConfig
from trident.model.gpt import GPT
from trident.parallel.topology import Topology

VOCAB = 400

# llama-style (GQA, untied), llama-style (GQA, tied, biases, another RoPE base), gpt2-style
CONFIGS: dict[str, ModelConfig] = {
    "llama-gqa-untied": ModelConfig(
        vocab_size=VOCAB, n_layers=2, hidden=64, n_heads=8, n_kv_heads=2, ffn_hidden=96, max_seq_len=64,
    ),
    "llama-tied-bias": ModelConfig(
        vocab_size=VOCAB, n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64,
        tie_embeddings=True, bias=True, rope_theta=500000.0, norm_eps=1e-6,
    ),
    "gpt2": ModelConfig(
        vocab_size=VOCAB, n_layers=2, hidden=64, n_heads=4, ffn_hidden=256, max_seq_len=64, position="learned",
        norm="layernorm", activation="gelu", bias=True, tie_embeddings=True,
    ),
}


def stdlib_texts(n: int = 40, start: int = 0) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(errors="ignore") for p in sorted(root.glob("*.py"))[start : start + n]]


def train_tokenizer(folder: Path) -> str:
    """A 400-piece sentencepiece BPE model like `trident tokenizer train` makes (~0.2 s)."""
    from trident.data.tokenizer import train_sentencepiece

    return train_sentencepiece(stdlib_texts(), folder / "sp", VOCAB, model_type="bpe", num_threads=1)


def tiny_model(cfg: ModelConfig, seed: int = 0, noise: float = 0.05) -> GPT:
    """A single-process model whose every tensor (norm weights and biases too) is random,
    so a mix-up of any two tensors would show in the logits."""
    model = GPT(cfg, Topology.single())
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model.eval()


def write_checkpoint(model: GPT, root: Path, tokenizer: str | None, step: int = 1) -> Path:
    """`model` saved as a training run would save it (tp = pp = dp = 1)."""
    from trident.parallel.random import RNGStreams
    from trident.checkpoint.checkpoint import RunState, save_checkpoint
    from trident.training.config import Config, DataSection
    from trident.parallel.zero.optimizer import DistributedOptimizer, OptimizerConfig

    topo = model.topo
    opt = DistributedOptimizer(model, topo, OptimizerConfig(zero=0))
    run = Config(model=model.cfg, data=DataSection(tokenizer=tokenizer, seq_len=32))
    state = RunState(loss_scaler=opt.scaler.state_dict(), tokenizer=tokenizer, config=run.to_dict())
    path = save_checkpoint(root, step, topo, model, opt, RNGStreams(0, topo), state, keep=0)
    opt.buffer.remove_hooks()
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: starting threads costs more than their work (and the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))
