"""`trident bench moe`: its rows (grouped matmul, expert loop, dense MLP of equal active FLOPs),
the parameter counts and the all-to-all bytes it says expert parallelism would send.

Tiny shapes, one timed round; nothing is timed here: the figures are checked to be there
and consistent, the counts against hand values.
"""

from __future__ import annotations

import re

from trident.tools.bench_moe import would_send
from trident.tools.cli import main

ARGS = ["bench", "moe", "--experts", "4", "--top-k", "2", "--hidden", "32", "--ffn", "16", "--batch", "2",
        "--seq", "8", "--repeats", "1", "--warmup", "0"]


def test_bench_moe_prints_its_rows_and_counts(capsys):
    assert main(ARGS) == 0
    out = capsys.readouterr().out
    rows = {m.group(1).strip(): m.group(2).split() for m in re.finditer(r"^    (\S.*?)\s{2,}(\d.*)$", out, re.M)}
    assert "MoE, expert loop" in rows and "dense MLP, width 2x16" in rows, out
    assert "MoE, grouped matmul" in rows or "MoE, grouped matmul: not available" in out
    for name, (ms, tok_s, ratio) in rows.items():
        ms, tok_s = float(ms), float(tok_s.replace(",", ""))
        assert ms > 0 and abs(tok_s * ms / 1e3 / 16 - 1) < 0.05, (name, out)  # 16 tokens
    assert rows["dense MLP, width 2x16"][2] == "1.00"
    # 4 experts x (gate, up, down) of 32 x 16 + the router's 4 x 32; 2 of the 4 experts active; dense 3 x 32 x 32
    assert "parameters: MoE 6,272 (active per token 3,200), dense 3,072" in out
    assert "ep=2: 0.01 MiB, ep=4: 0.01 MiB" in out and "not measured" in out


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
