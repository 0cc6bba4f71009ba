"""Range bases (QR of the long side): project mode at full thin rank equals Algorithm 1."""

from __future__ import annotations

import pytest
import torch

from core.factorize import factorize
from core.factors import RangeBasis
from core.range_basis import range_basis, range_basis_batch, stores_complement
from tests.core.reference_algorithm1 import algorithm1
from tests.core.synthetic import random_matrix, relative_error

# (m, n): tall and wide, with the range basis stored (long - p >= p) or its complement
SHAPES = [(96, 40), (40, 96), (96, 64), (64, 96), (48, 48)]


def _alg1(w: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = algorithm1({"m.lora.up.weight": up, "m.lora.down.weight": down}, {"m.weight": w})
    return out["m.lora.up.weight"], out["m.lora.down.weight"]


@pytest.mark.parametrize("shape", SHAPES)
def test_projections_equal_algorithm_1(shape: tuple[int, int]) -> None:
    m, n = shape
    w = random_matrix(m, n, seed=m + n)
    up, down = random_matrix(m, 8, seed=1), random_matrix(8, n, seed=2)
    basis = range_basis(w, digest="d")
    ref_up, ref_down = _alg1(w, up, down)
    got_up, got_down = basis.project_up(up), basis.project_down(down)
    assert relative_error(got_up, ref_up) < 1e-5
    assert relative_error(got_down, ref_down) < 1e-5
    if m == n:
        assert basis.side == "none" and basis.basis is None and basis.method == "identity"
        assert got_up is up and got_down is down  # nothing computed: the identity
        return
    long_side_moved = got_up if m > n else got_down
    short_side = got_down if m > n else got_up
    original = up if m > n else down
    assert relative_error(long_side_moved, original) > 0.1  # the projection did something
    assert short_side is (down if m > n else up)  # the square side is left as it is
    assert basis.method == "qr" and basis.digest == "d"
    assert basis.complement == stores_complement(shape)
    q = basis.basis
    assert q is not None and q.dtype == torch.float32
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-5)


def test_complement_is_stored_where_it_is_smaller() -> None:
    assert stores_complement((2048, 1280)) and stores_complement((1280, 2048))
    assert not stores_complement((2048, 640)) and not stores_complement((256, 2048))
    assert not stores_complement((64, 64))
    tall = range_basis(random_matrix(96, 64, seed=3))
    assert tall.complement and tall.basis is not None and tall.basis.shape == (96, 32)


def test_rank_deficient_weights_fall_back_to_the_svd() -> None:
    low = random_matrix(96, 6, seed=4) @ random_matrix(6, 40, seed=5)  # rank 6 < 40
    near = factorize(random_matrix(96, 40, seed=6))
    s = near.S.clone()
    s[-1] = s[0] * 1e-7  # numerically rank-deficient in float32
    near_low = (near.U * s) @ near.V.T
    fine = random_matrix(96, 40, seed=7)
    bases = range_basis_batch([low, near_low, fine])
    assert [b.method for b in bases] == ["svd", "svd", "qr"]
    up, down = random_matrix(96, 4, seed=8), random_matrix(4, 96, seed=9)
    for w, basis in zip((low, near_low), bases[:2], strict=True):
        ref_up, _ = _alg1(w, up, random_matrix(4, 40, seed=9))
        assert not basis.complement and basis.basis is not None
        assert relative_error(basis.project_up(up), ref_up) < 1e-5  # the SVD's own U
    wide = range_basis(low.T.contiguous())  # the same on the right side
    assert wide.method == "svd" and wide.side == "right"
    _, ref_down = _alg1(low.T.contiguous(), random_matrix(40, 4, seed=10), down)
    assert relative_error(wide.project_down(down), ref_down) < 1e-5


def test_float16_weights_are_computed_in_float32() -> None:
    w = random_matrix(80, 32, seed=10).half()
    basis = range_basis(w)
    assert basis.basis is not None and basis.basis.dtype == torch.float32
    same = range_basis(w.float())
    assert torch.equal(basis.basis, same.basis)


def test_basis_from_complete_factors_and_validation() -> None:
    w = random_matrix(30, 50, seed=11)
    factors = factorize(w, digest="x")
    from_svd = RangeBasis.from_factors(factors)
    assert from_svd.side == "right" and from_svd.method == "svd" and from_svd.digest == "x"
    down = random_matrix(3, 50, seed=12)
    assert relative_error(from_svd.project_down(down), range_basis(w).project_down(down)) < 1e-5
    with pytest.raises(ValueError, match="complete"):
        RangeBasis.from_factors(factorize(w, rank=4))
    with pytest.raises(ValueError, match="side"):
        RangeBasis((30, 50), "left", torch.zeros(30, 30))
    with pytest.raises(ValueError, match="must be"):
        RangeBasis((30, 50), "right", torch.zeros(50, 20))
    with pytest.raises(ValueError, match="square"):
        RangeBasis.identity((3, 4))
    assert RangeBasis.identity((4, 4)).nbytes == 0


def test_batch_checks() -> None:
    with pytest.raises(ValueError, match="at least one"):
        range_basis_batch([])
    with pytest.raises(ValueError, match="one shape"):
        range_basis_batch([torch.ones(4, 3), torch.ones(3, 4)])


@pytest.mark.gpu
def test_cuda_bases_equal_cpu_bases() -> None:
    ws = [random_matrix(96, 40, seed=s).half() for s in range(3)]
    up = random_matrix(96, 4, seed=20)
    cpu, gpu = range_basis_batch(ws), range_basis_batch(ws, device="cuda")
    for a, b in zip(cpu, gpu, strict=True):
        assert b.basis is not None and b.basis.device.type == "cpu"
        assert relative_error(b.project_up(up), a.project_up(up)) < 1e-5
