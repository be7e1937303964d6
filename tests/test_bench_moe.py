"""`trident bench moe`: its one-process rows (grouped matmul, expert loop, dense MLP of equal
active FLOPs), the parameter counts, and the expert-parallel rows with the all-to-all bytes
the layer sent, checked against the count from an independent routing of each rank's tokens.

Tiny shapes, one timed round, 2 gloo ranks; nothing is timed here: the figures are checked
to be there and consistent, the counts against hand values.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import pytest
import torch

from trident.tools.bench_moe import _layers, inputs, would_send
from trident.tools.cli import main

SHAPE = dict(experts=4, top_k=2, hidden=32, ffn=16, batch=2, seq=8, seed=0)
ARGS = ["bench", "moe", "--experts", "4", "--top-k", "2", "--hidden", "32", "--ffn", "16", "--batch", "2",
        "--seq", "8", "--repeats", "1", "--warmup", "0", "--ranks", "2", "--ep", "1", "2"]
# ep, experts/rank, grouped ms, tokens/s, loop ms, tokens/s, a2a KiB measured, from routing, uniform
EP_ROW = re.compile(r"^ +(\d+) +(\d+) +([\d.]+|-) +([\d,]+|-) +([\d.]+) +([\d,]+)" + r" +([\d,.]+)" * 3 + "$", re.M)


def _exact_bytes(ep: int, ranks: int = 2) -> float:
    """Bytes per rank per step (mean over ranks) from routing each rank's tokens in this process:
    the (token, choice) rows whose expert lives on another ep rank, 4 x hidden x 4 B each."""
    moe, _ = _layers(argparse.Namespace(**SHAPE), torch.device("cpu"), torch.float32)
    total = 0
    for rank in range(ranks):
        x, _ = inputs(argparse.Namespace(**SHAPE), rank, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            experts = moe.router(x.reshape(-1, SHAPE["hidden"])).experts  # [T, k]
        total += int((experts // (SHAPE["experts"] // ep) != rank % ep).sum()) * 4 * SHAPE["hidden"] * 4
    return total / ranks


@pytest.fixture(scope="module")
def out() -> str:
    """One run of the bench (it starts the gloo ranks), read by the tests below."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(ARGS) == 0
    return buf.getvalue()


def test_bench_moe_prints_its_rows_and_counts(out):
    rows = {m.group(1).strip(): m.group(2).split() for m in re.finditer(r"^    (\S.*?)\s{2,}(\d.*)$", out, re.M)}
    assert "MoE, expert loop" in rows and "dense MLP, width 2x16" in rows, out
    assert "MoE, grouped matmul" in rows or "MoE, grouped matmul: not available" in out
    for name, (ms, tok_s, ratio) in rows.items():
        ms, tok_s = float(ms), float(tok_s.replace(",", ""))
        assert ms > 0 and abs(tok_s * ms / 1e3 / 16 - 1) < 0.05, (name, out)  # 16 tokens
    assert rows["dense MLP, width 2x16"][2] == "1.00"
    # 4 experts x (gate, up, down) of 32 x 16 + the router's 4 x 32; 2 of the 4 experts active; dense 3 x 32 x 32
    assert "parameters: MoE 6,272 (active per token 3,200), dense 3,072" in out
    assert "not measured" not in out and "would send" not in out and "not built" not in out


def test_bench_moe_ep_rows_measure_the_bytes_the_routing_sends(out):
    ep_rows = {int(m.group(1)): m.groups()[1:] for m in EP_ROW.finditer(out)}
    assert sorted(ep_rows) == [1, 2], out
    assert "2 gloo ranks" in out and "local memory copy through gloo" in out
    for ep, (experts, g_ms, g_tok, l_ms, l_tok, measured, routed, uniform) in ep_rows.items():
        assert int(experts) == 4 // ep
        for ms, tok in ((g_ms, g_tok), (l_ms, l_tok)):
            if ms != "-":  # tokens/s over both ranks' 16 tokens
                assert float(ms) > 0 and abs(float(tok.replace(",", "")) * float(ms) / 1e3 / 32 - 1) < 0.05, out
        measured, routed, uniform = (float(v.replace(",", "")) for v in (measured, routed, uniform))
        assert uniform == would_send(16, 2, 32, 4, ep) / 1024  # 8 KiB at ep 2
        exact = _exact_bytes(ep) / 1024  # a multiple of 0.25 KiB (one row, 512 B, over 2 ranks)
        assert measured == routed == exact, (ep, measured, routed, exact, out)
    assert float(ep_rows[1][5]) == 0 and float(ep_rows[2][5]) > 0


def test_bench_moe_names_an_ep_that_does_not_divide_the_ranks(capsys):
    assert main(ARGS[:-3] + ["--ep", "3"]) == 2  # checked before anything is built or started
    assert "--ep 3 must divide --ranks 2 and --experts 4" in capsys.readouterr().err


def test_would_send_counts_the_remote_share_of_the_routed_rows():
    # 16 tokens x 2 choices x 32 x 4 B = 4 KiB of routed rows; half (ep 2) or 3/4 (ep 4) leave the
    # rank, 4 times a step (dispatch, combine; their gradients)
    assert would_send(16, 2, 32, 4, 2) == 8192 and would_send(16, 2, 32, 4, 4) == 12288
    assert would_send(16, 2, 32, 4, 1) == 0


def test_bench_train_on_an_moe_skips_the_reference_and_compares_mixtral():
    from cli_helpers import CONFIG, TINY, trident

    moe = ["model.moe_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=32"]
    out = trident("bench", "train", "--config", str(CONFIG), "--steps", "1", "--warmup", "0", *TINY, *moe).stdout
    assert "reference row skipped: the plain reference model has no mixture of experts (model.moe_experts=4)" in out
    assert re.search(r"transformers MixtralForCausalLM \(1 proc\) +[0-9.]+ +[0-9]+", out), out
    assert "trident / transformers throughput" in out and "trident / reference" not in out
