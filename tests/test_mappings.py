"""Each communication autograd function, forward and backward, against dense math.

Every rank builds the same full tensor X and the same upstream gradient G (same seed).
A function f is then checked by the identity it must satisfy with the dense computation:
its forward output equals the right slice / sum of X, and the gradient that reaches its
input equals the right slice / sum of G.
"""

from __future__ import annotations


def _check_all() -> int:
    import torch
    import torch.distributed as dist

    from trident.parallel.tensor import mappings as M

    r, n = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2, 4 * n, 3 * n, generator=gen)  # [b, s, h], the same everywhere
    G = torch.randn(2, 4 * n, 3 * n, generator=gen)
    # per-rank distinct values, known to every rank: Xr[k] is rank k's tensor
    Xr = [torch.randn(2, 4 * n, 3 * n, generator=gen) for _ in range(n)]
    seq_chunk = lambda t, k: t.chunk(n, dim=1)[k]  # noqa: E731
    hid_chunk = lambda t, k: t.chunk(n, dim=-1)[k]  # noqa: E731
    checks = 0

    def run(fn, x_in, grad_out):
        x = x_in.clone().requires_grad_(True)
        y = fn(x, group)
        y.backward(grad_out)
        return y.detach(), x.grad

    # copy_to_tp: identity forward; backward sums every rank's gradient
    y, gx = run(M.copy_to_tp, X, Xr[r])
    assert torch.equal(y, X) and torch.allclose(gx, sum(Xr)), "copy_to_tp"
    checks += 1
    # reduce_from_tp: forward sums; backward identity
    y, gx = run(M.reduce_from_tp, Xr[r], G)
    assert torch.allclose(y, sum(Xr)) and torch.equal(gx, G), "reduce_from_tp"
    checks += 1
    # scatter_to_tp: keep my hidden chunk; backward gathers the chunks of every rank's grad
    y, gx = run(M.scatter_to_tp, X, hid_chunk(Xr[r], r))
    assert torch.equal(y, hid_chunk(X, r)), "scatter_to_tp forward"
    assert torch.equal(gx, torch.cat([hid_chunk(Xr[k], k) for k in range(n)], -1)), "scatter_to_tp backward"
    checks += 1
    # gather_from_tp: concatenate every rank's chunk; backward keeps my chunk
    y, gx = run(M.gather_from_tp, hid_chunk(Xr[r], r), G)
    assert torch.equal(y, torch.cat([hid_chunk(Xr[k], k) for k in range(n)], -1)), "gather_from_tp forward"
    assert torch.equal(gx, hid_chunk(G, r)), "gather_from_tp backward"
    checks += 1
    # scatter_to_sp: keep my sequence chunk; backward all-gathers along the sequence
    y, gx = run(M.scatter_to_sp, X, seq_chunk(Xr[r], r))
    assert torch.equal(y, seq_chunk(X, r)), "scatter_to_sp forward"
    assert torch.equal(gx, torch.cat([seq_chunk(Xr[k], k) for k in range(n)], 1)), "scatter_to_sp backward"
    checks += 1
    # gather_from_sp: all-gather sequence; backward reduce-scatters (sum over ranks, my chunk)
    y, gx = run(M.gather_from_sp, seq_chunk(X, r), Xr[r])
    assert torch.equal(y, X), "gather_from_sp forward"
    assert torch.allclose(gx, seq_chunk(sum(Xr), r)), "gather_from_sp backward"
    checks += 1
    # reduce_scatter_to_sp: sum over ranks, my sequence chunk; backward all-gathers
    y, gx = run(M.reduce_scatter_to_sp, Xr[r], seq_chunk(G, r))
    assert torch.allclose(y, seq_chunk(sum(Xr), r)), "reduce_scatter_to_sp forward"
    assert torch.equal(gx, G), "reduce_scatter_to_sp backward"
    checks += 1
    # conjugate pairs compose to the identity (forward) -- the property TP layers rely on
    assert torch.equal(M.gather_from_tp(M.scatter_to_tp(X, group), group), X)
    assert torch.equal(M.gather_from_sp(M.scatter_to_sp(X, group), group), X)
    checks += 1
    return checks


def test_autograd_functions_match_dense_math_on_2_ranks(dist_pool):
    assert dist_pool.run(2, "test_mappings:_check_all") == [8, 8]


def test_autograd_functions_match_dense_math_on_4_ranks(dist_pool):
    assert dist_pool.run(4, "test_mappings:_check_all") == [8] * 4


def test_single_process_functions_are_identities():
    import torch

    from trident.parallel.tensor import mappings as M

    x = torch.randn(2, 4, 6)
    for fn in (M.copy_to_tp, M.reduce_from_tp, M.scatter_to_tp, M.gather_from_tp, M.scatter_to_sp, M.gather_from_sp, M.reduce_scatter_to_sp):
        assert fn(x, None) is x
