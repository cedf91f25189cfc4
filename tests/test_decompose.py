import numpy as np
import pytest
import torch
from sklearn.decomposition import sparse_encode

from captum_gig import ConceptBasis, PFVDecomposer, alpha_max, l0_ratio, relative_l2
from captum_gig.decompose import lasso_objective


def problem(n=60, c=16, k=128, seed=0, relu_like=False):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(k, c, generator=g, dtype=torch.float64)
    if relu_like:  # mostly non-negative PFVs and concepts: the ill-conditioned case
        V = V.clamp_min(0) + 0.05
    U_true = torch.randn(n, k, generator=g, dtype=torch.float64) * (torch.rand(n, k, generator=g) < 0.04)
    X = U_true @ V + 0.05 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return X, V


@pytest.mark.parametrize("k, relu_like", [(16, False), (128, False), (128, True)])
@pytest.mark.parametrize("positive", [False, True])
def test_objective_matches_sklearn_lasso_cd(k, relu_like, positive):
    X, V = problem(k=k, relu_like=relu_like)
    offset = torch.randn(16, dtype=torch.float64)
    alpha = float(0.1 * alpha_max(ConceptBasis(V), X).median())
    dec = PFVDecomposer(ConceptBasis(V, offset), alpha=alpha, tol=1e-6, max_iter=5000, positive=positive)
    U = dec.transform(X + offset)
    U_sk = sparse_encode(X.numpy(), V.numpy(), algorithm="lasso_cd", alpha=alpha, max_iter=5000, positive=positive)
    U_sk = torch.from_numpy(U_sk)
    ours = lasso_objective(X, U, V, alpha).sum()
    theirs = lasso_objective(X, U_sk, V, alpha).sum()
    assert ours <= theirs * 1.001
    if positive:
        assert (U >= 0).all()
    agree = ((U != 0) == (U_sk.abs() > 1e-8)).double().mean()
    assert agree >= 0.97, f"zero patterns agree on only {agree:.3f} of coefficients"
    assert l0_ratio(U) >= float((U_sk.abs() <= 1e-8).double().mean()) - 0.02  # as sparse as sklearn's


def test_kkt_conditions_hold_at_solution():
    X, V = problem(k=128, relu_like=True, seed=2)
    alpha = 0.5
    U = PFVDecomposer(ConceptBasis(V), alpha=alpha, tol=1e-8, max_iter=20000).transform(X)
    corr = (X - U @ V) @ V.t()
    assert (corr.abs() <= alpha * (1 + 1e-3)).all()
    support = U != 0
    assert torch.allclose(corr[support], alpha * torch.sign(U[support]), rtol=1e-2, atol=1e-3)


def test_layouts_conv_and_tokens_agree_with_flat_pfvs():
    X, V = problem(n=2 * 3 * 4, k=64, seed=1)
    X = X.float()
    dec = PFVDecomposer(ConceptBasis(V.float(), torch.randn(16)), alpha=0.3)
    flat = dec.transform(X)
    conv = X.view(2, 3, 4, 16).permute(0, 3, 1, 2)  # (N, C, H, W)
    U_conv = dec.transform(conv)
    assert U_conv.shape == (2, 64, 3, 4)
    assert torch.allclose(U_conv.permute(0, 2, 3, 1).reshape(-1, 64), flat, atol=1e-5)
    tokens = X.view(2, 12, 16)
    assert torch.allclose(dec.transform(tokens).reshape(-1, 64), flat, atol=1e-5)
    assert torch.allclose(dec.transform(X[3]), flat[3], atol=1e-5)  # a single vector
    rec = dec.inverse_transform(U_conv)
    assert rec.shape == conv.shape
    assert torch.allclose(rec.permute(0, 2, 3, 1).reshape(-1, 16), flat @ V.float() + dec.basis.offset, atol=1e-4)


def test_score_is_rel_l2_and_l0_ratio():
    X, V = problem(k=64, seed=3)
    offset = torch.randn(16, dtype=torch.float64)
    dec = PFVDecomposer(ConceptBasis(V, offset), alpha=1.0)
    score = dec.score(X)
    U = dec.transform(X)
    X_hat = U @ V + offset
    rel = np.mean([float((x - xh).norm() / x.norm()) for x, xh in zip(X, X_hat)])
    assert score.rel_l2 == pytest.approx(rel, rel=1e-6)
    assert score.l0_ratio == pytest.approx(float((U == 0).double().mean()))
    assert float(relative_l2(X, X)) == 0.0


def test_numpy_in_numpy_out_and_chunking():
    X, V = problem(n=50, k=32)
    dec = PFVDecomposer(ConceptBasis(V), alpha=0.2, chunk_size=7)
    U_np = dec.fit(X.numpy()).transform(X.numpy())
    assert isinstance(U_np, np.ndarray) and U_np.shape == (50, 32)
    whole = PFVDecomposer(ConceptBasis(V), alpha=0.2).transform(X)
    assert np.allclose(U_np, whole.numpy(), atol=1e-6)
    assert isinstance(dec.inverse_transform(U_np), np.ndarray)


def test_zero_alpha_limit_and_large_alpha_zero():
    X, V = problem(n=10, k=16)
    basis = ConceptBasis(V)
    big = float(alpha_max(basis, X).max()) * 1.01
    assert (PFVDecomposer(basis, alpha=big).transform(X) == 0).all()


def test_channel_mismatch_and_bad_arguments():
    dec = PFVDecomposer(ConceptBasis(torch.randn(8, 4)), alpha=0.1)
    with pytest.raises(ValueError, match="4"):
        dec.transform(torch.randn(2, 5))
    with pytest.raises(ValueError, match="alpha"):
        PFVDecomposer(ConceptBasis(torch.randn(8, 4)), alpha=-1)
    with pytest.raises(ValueError, match="NaN"):
        dec.transform(torch.tensor([[1.0, float("inf"), 0, 0]]))
    with pytest.raises(TypeError, match="ConceptBasis"):
        PFVDecomposer(torch.randn(8, 4))
