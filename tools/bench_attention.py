"""`trident bench attention`: forward+backward time of the attention core on packed documents.

Side by side in one run, on the same shapes (fp32, CPU unless --device), the real
`Attention.core` (RoPE, GQA repeat, SDPA) of one layer with:

* causal -- plain ``is_causal=True`` SDPA, documents ignored (the speed to match);
* dense mask (old) -- the additive [b, 1, s, s] document mask ``GPT.attention_inputs`` built
  before (mask built once, outside the timing, as it was once per forward);
* segments (new) -- `document_segments`' table and causal SDPA per document (table built
  once, outside the timing, as it is once per forward).

Each row holds ``--docs`` documents with random boundaries (different per row). Timings are
interleaved over ``--repeats`` rounds after ``--warmup`` untimed ones; the best is printed (robust
to other work on a shared machine), with new/causal (the issue's target: <= 1.10 at seq 1024). Run it as
``trident bench attention``.
"""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attention", help="document-masked attention (dense mask vs segments) vs causal SDPA",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 1024], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=4, help="rows per batch")
    parser.add_argument("--hidden", type=int, default=256, help="model width (heads * head_dim)")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    parser.add_argument("--docs", type=int, default=4, help="documents per row (random boundaries)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (the best is printed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the boundaries")
    parser.set_defaults(func=run)


def _doc_ids(batch: int, seq: int, docs: int, gen):
    """[batch, seq] ids with `docs` contiguous documents per row (at least one token each)."""
    import torch

    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1, generator=gen)[: docs - 1] + 1  # distinct starts in [1, seq)
        starts = torch.zeros(seq, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


def _cases(args: argparse.Namespace, seq: int) -> tuple[dict, tuple[int, int]]:
    """The timed closures by name, and (dense mask bytes, segment table lines)."""
    import torch

    from trident.model.attention import Attention, document_positions, document_segments, rope_tables
    from trident.model.config import preset
    from trident.parallel.topology import Topology

    gen = torch.Generator().manual_seed(args.seed)
    cfg = preset("tiny", hidden=args.hidden, n_heads=args.heads, n_kv_heads=args.kv_heads, max_seq_len=seq)
    dev = torch.device(args.device)
    attn = Attention(cfg, Topology.single(dev), 0, False, None, dev, torch.float32)
    b, hd = args.batch, cfg.head_dim
    q = torch.randn(b, args.heads, seq, hd, generator=gen).to(dev).requires_grad_()
    k = torch.randn(b, args.kv_heads, seq, hd, generator=gen).to(dev).requires_grad_()
    v = torch.randn(b, args.kv_heads, seq, hd, generator=gen).to(dev).requires_grad_()
    grad = torch.randn(b, seq, args.heads * hd, generator=gen).to(dev)
    doc_ids = _doc_ids(b, seq, args.docs, gen).to(dev)
    cos_t, sin_t = rope_tables(cfg, dev)  # [max_seq_len, hd]
    pos_doc, pos_plain = document_positions(doc_ids), torch.arange(seq, device=dev).expand(b, seq)
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=dev).tril() & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))
    dense = torch.zeros(allowed.shape, device=dev).masked_fill_(~allowed, float("-inf")).unsqueeze(1)  # [b, 1, s, s]
    table = document_segments(doc_ids)

    def case(pos, mask):
        cos, sin = cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)  # [b, 1, s, hd]
        return lambda: attn.core(q, k, v, cos, sin, mask).backward(grad)

    cases = {
        "causal SDPA": case(pos_plain, None),
        "doc-masked, dense mask (old)": case(pos_doc, dense),
        "doc-masked, segments (new)": case(pos_doc, table),
    }
    return cases, (dense.numel() * dense.element_size(), 0 if table is None else table.shape[0])


def _time(fn, device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    """Time the three cases at each --seq, interleaved, and print them side by side."""
    import torch

    from trident.errors import UserError

    if args.docs < 1 or args.repeats < 1 or args.warmup < 0 or min(args.seq) < args.docs:
        raise UserError(f"need --docs >= 1, --repeats >= 1, --warmup >= 0 and every --seq >= --docs; got {vars(args)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"trident bench attention: fp32 {args.device}, batch {args.batch}, hidden {args.hidden}, heads "
          f"{args.heads}, kv heads {args.kv_heads}, {args.docs} docs per row, {torch.get_num_threads()} threads, "
          f"forward+backward of Attention.core, best of {args.repeats}")
    for seq in args.seq:
        cases, (mask_bytes, segments) = _cases(args, seq)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(args.warmup + args.repeats):
            for name, fn in cases.items():
                t = _time(fn, args.device)
                if i >= args.warmup:
                    times[name].append(t)
        med = {name: min(ts) for name, ts in times.items()}
        base = med["causal SDPA"]
        print(f"  seq {seq}: dense mask {mask_bytes / 2**20:.1f} MiB, segment table {segments} lines")
        for name, t in med.items():
            print(f"    {name:<32}{t * 1e3:>10.2f} ms{t / base:>8.2f}x causal")
    return 0
