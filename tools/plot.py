"""`trident plot RUN_DIR`: loss, validation loss and learning-rate curves as one PNG, and for a
mixture of experts the expert load balance (moe_load_cv, moe_balance) over the steps."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="draw loss / val loss / lr curves of a run as a PNG")
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--output", default=None, help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=run)


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    from trident.errors import UserError
    from trident.training.metrics import read_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{str(run_dir / 'metrics.jsonl')!r} does not exist; pass a run directory of trident train")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("trident plot needs matplotlib: pip install 'trident[plot]'") from None
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    moe = [r for r in train if "moe_load_cv" in r]
    rows = 3 if moe else 2
    fig, axes = plt.subplots(rows, 1, figsize=(8, 6 + 2 * (rows - 2)), sharex=True, height_ratios=[3, 1, 1.5][:rows])
    ax_loss, ax_lr = axes[0], axes[1]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train if "lr" in r], [r["lr"] for r in train if "lr" in r], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    if moe:
        _plot_moe(axes[2], moe)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"trident run {run_dir.name}")
    fig.tight_layout()
    out = Path(output) if output else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _plot_moe(ax, records: list[dict]) -> None:
    """Expert load balance: the worst layer's coefficient of variation of tokens per expert
    (0 = every expert equally loaded) and the mean Switch balance term (1.0 = balanced)."""
    steps = [r["step"] for r in records]
    cv = [r["moe_load_cv"] for r in records]
    ax.plot(steps, cv, color="tab:red", label="load CV, worst layer (0 = balanced)")
    if all("moe_balance" in r for r in records):
        balance = [r["moe_balance"] for r in records]
        ax.plot(steps, balance, color="tab:purple", label="balance E·Σ f·P (1 = balanced)")
    ax.set_ylabel("expert load")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def run(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.output))
    return 0
