"""The sparse-adapter add-on (kernels/sparse) against its fp32 reference (a dense delta per token, naive.py) and
against PEFT's and torch's own forms of the same delta: torch.sparse_coo_tensor densified, as PEFT's SHiRA
get_delta_weight builds it."""

from __future__ import annotations

import pytest
import torch

from linrec.kernels.sparse import SparseMapping, sparse_add_, sparse_csr
from linrec.kernels.sparse.naive import dense_delta, sparse_add_reference


def random_delta(out_features: int, in_features: int, nnz: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=g)[:nnz].sort().values
    return flat, torch.randn(nnz, generator=g)


def test_csr_equals_torch_coo_densified():
    flat, values = random_delta(24, 40, 50, seed=0)
    rows, cols = flat // 40, flat % 40
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (24, 40)).to_dense()
    assert torch.equal(sparse_csr(flat, values, 24, 40).to_dense(), coo)
    assert torch.equal(dense_delta(flat, values, 24, 40), coo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_groups_equal_the_reference_and_leave_other_rows_alone(dtype):
    """Three groups over nine tokens of four sequences (lengths 3, 1, 4, 1): adapter X on sequences 0 and 3,
    Y on sequence 2, nothing on 1; one projection key is X's only."""
    out_features, in_features = 20, 32
    xs = {name: random_delta(out_features, in_features, 30, seed) for name, seed in (("X", 1), ("Y", 2))}
    deltas = {name: {"proj": sparse_csr(f, v, out_features, in_features)} for name, (f, v) in xs.items()}
    deltas["X"]["only_x"] = deltas["X"]["proj"]
    seq_lens = [3, 1, 4, 1]
    mapping = SparseMapping.build(seq_lens, [deltas["X"], None, deltas["Y"], deltas["X"]])
    assert mapping is not None and mapping.num_tokens == 9
    assert [(s, e) for s, e, _ in mapping.groups] == [(0, 3), (4, 8), (8, 9)]  # X's two sequences: two runs
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, in_features, generator=g).to(dtype)
    y = torch.randn(9, out_features, generator=g).to(dtype)
    dense = {name: dense_delta(f, v, out_features, in_features) for name, (f, v) in xs.items()}
    per_token = [dense["X"]] * 3 + [None] + [dense["Y"]] * 4 + [dense["X"]]
    expected = sparse_add_reference(y, x, per_token)
    got = y.clone()
    sparse_add_(got, x, "proj", mapping)
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-5 if dtype == torch.float32 else tol, rtol=tol)
    assert torch.equal(got[3], y[3])  # the base row: bit for bit
    # a key only X's deltas hold: Y's rows and the base row untouched
    got = y.clone()
    sparse_add_(got, x, "only_x", mapping)
    assert torch.equal(got[3:8], y[3:8])
    assert not torch.equal(got[:3], y[:3])


def test_one_run_for_consecutive_sequences_of_one_adapter():
    flat, values = random_delta(8, 16, 10, seed=4)
    deltas = {"p": sparse_csr(flat, values, 8, 16)}
    mapping = SparseMapping.build([2, 3], [deltas, deltas])
    assert [(s, e) for s, e, _ in mapping.groups] == [(0, 5)]  # consecutive sequences: one run
    x, y = torch.randn(5, 16), torch.randn(5, 8)
    got = y.clone()
    sparse_add_(got, x, "p", mapping)
    torch.testing.assert_close(got, y + x @ dense_delta(flat, values, 8, 16).T, atol=1e-6, rtol=0)


def test_no_sparse_sequence_builds_no_mapping_and_bad_shapes_are_refused():
    assert SparseMapping.build([1, 2], [None, None]) is None
    with pytest.raises(ValueError, match="expected 2 sequences' deltas, got 1"):
        SparseMapping.build([1, 2], [None])
    deltas = {"p": sparse_csr(*random_delta(8, 16, 10, seed=5), 8, 16)}
    mapping = SparseMapping.build([2], [deltas])
    with pytest.raises(ValueError, match=r"expected a delta \[9, 16\], got \(8, 16\)"):
        sparse_add_(torch.zeros(2, 9), torch.zeros(2, 16), "p", mapping)
    with pytest.raises(ValueError, match="over the mapping's 2 tokens"):
        sparse_add_(torch.zeros(3, 8), torch.zeros(3, 16), "p", mapping)
