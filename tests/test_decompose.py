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


def _solver(name, monkeypatch):
    """``working_set_gram``: the working-set solver with every correlation from the Gram matrix."""
    if name == "working_set_gram":
        from captum_gig import decompose

        monkeypatch.setattr(decompose, "GRAM_CORRELATIONS_BELOW", float("inf"))
        return "working_set"
    return name


@pytest.mark.parametrize("k, relu_like", [(16, False), (128, False), (128, True)])
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("solver", ["homotopy", "working_set", "working_set_gram", "fista"])
def test_objective_matches_sklearn_lasso_cd(k, relu_like, positive, solver, monkeypatch):
    solver = _solver(solver, monkeypatch)
    X, V = problem(k=k, relu_like=relu_like)
    offset = torch.randn(16, dtype=torch.float64)
    alpha = float(0.1 * alpha_max(ConceptBasis(V), X).median())
    dec = PFVDecomposer(ConceptBasis(V, offset), alpha=alpha, tol=1e-6, max_iter=5000, positive=positive, solver=solver)
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


@pytest.mark.parametrize("solver", ["homotopy", "working_set", "working_set_gram"])
def test_kkt_conditions_hold_at_solution(solver, monkeypatch):
    X, V = problem(k=128, relu_like=True, seed=2)
    alpha = 0.5
    dec = PFVDecomposer(ConceptBasis(V), alpha=alpha, tol=1e-8, max_iter=20000, solver=_solver(solver, monkeypatch))
    U = dec.transform(X)
    corr = (X - U @ V) @ V.t()
    assert (corr.abs() <= alpha * (1 + 1e-3)).all()
    support = U != 0
    assert torch.allclose(corr[support], alpha * torch.sign(U[support]), rtol=1e-2, atol=1e-3)


def test_layouts_conv_and_tokens_agree_with_flat_pfvs():
    X, V = problem(n=2 * 3 * 4, k=64, seed=1)
    X = X.float()
    dec = PFVDecomposer(ConceptBasis(V.float(), torch.randn(16)), alpha=0.3, solver="working_set")
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
    dec = PFVDecomposer(ConceptBasis(V, offset), alpha=1.0, solver="working_set")
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


# -- the exact solvers against the FISTA reference and in degenerate cases --------------


@pytest.mark.parametrize("solver", ["homotopy", "working_set"])
@pytest.mark.parametrize("positive", [False, True])
def test_exact_solvers_and_fista_agree(solver, positive):
    X, V = problem(n=16, c=8, k=64, relu_like=True, seed=4)  # overcomplete: K = 8 C
    basis = ConceptBasis(V)
    alpha = float(0.2 * alpha_max(basis, X).median())
    exact = PFVDecomposer(basis, alpha=alpha, tol=1e-9, positive=positive, solver=solver).transform(X)
    fista = PFVDecomposer(basis, alpha=alpha, tol=1e-6, max_iter=20000, positive=positive, solver="fista").transform(X)
    o_ex, o_f = lasso_objective(X, exact, V, alpha), lasso_objective(X, fista, V, alpha)
    assert (o_ex <= o_f * (1 + 1e-9)).all() and torch.allclose(o_ex, o_f, rtol=1e-5)  # the same optimum
    assert ((exact != 0) == (fista.abs() > 1e-6)).double().mean() >= 0.98
    with pytest.raises(ValueError, match="solver"):
        PFVDecomposer(basis, solver="lars")


def test_homotopy_path_events_match_sklearn_lars():
    """The path's end is sklearn's LARS-Lasso solution (an independent homotopy implementation)."""
    from sklearn.linear_model import lars_path

    X, V = problem(n=6, c=12, k=40, seed=8)
    alpha = 0.4
    U = PFVDecomposer(ConceptBasis(V), alpha=alpha, tol=1e-12, solver="homotopy").transform(X)
    for row in range(X.shape[0]):
        # sklearn scales the penalty by the number of samples (here: channels)
        _, _, coefs = lars_path(V.t().numpy(), X[row].numpy(), method="lasso", alpha_min=alpha / V.shape[1])
        assert torch.allclose(U[row], torch.from_numpy(coefs[:, -1]), atol=1e-8)


def test_repeated_pfvs_are_solved_once_with_the_same_coefficients(monkeypatch):
    import captum_gig.decompose as decompose

    X, V = problem(n=10, c=8, k=64, relu_like=True, seed=9)
    repeated = torch.cat([X, X[:3].repeat(20, 1), X])  # a flat background: many equal PFVs
    seen = []
    real = decompose._homotopy
    monkeypatch.setattr(decompose, "_homotopy", lambda Xc, *a, **k: seen.append(Xc.shape[0]) or real(Xc, *a, **k))
    dec = PFVDecomposer(ConceptBasis(V), alpha=0.3, tol=1e-10, solver="homotopy")
    U = dec.transform(repeated)
    assert seen == [10]  # only the distinct PFVs reach the solver
    alone = dec.transform(X)
    assert torch.equal(U[:10], alone) and torch.equal(U[10:70], alone[:3].repeat(20, 1)) and torch.equal(U[70:], alone)


@pytest.mark.parametrize("positive", [False, True])
def test_alpha_at_or_above_alpha_max_gives_zeros(positive):
    X, V = problem(n=12, k=64, seed=5)
    basis = ConceptBasis(V)
    a_max = alpha_max(basis, X)
    U = PFVDecomposer(basis, alpha=float(a_max.max()), positive=positive).transform(X)
    assert (U == 0).all()
    # per row: zero exactly where the row's own alpha_max is <= alpha, non-zero elsewhere
    alpha = float(a_max.median())
    U = PFVDecomposer(basis, alpha=alpha, tol=1e-8, solver="working_set").transform(X)
    assert torch.equal((U != 0).any(1), a_max > alpha * (1 + 1e-9))


def test_duplicate_concepts_reach_the_optimum():
    X, V = problem(n=30, c=12, k=48, relu_like=True, seed=6)
    V = torch.cat([V, V[:16], 2 * V[:4]])  # exact and scaled duplicates: a singular Gram matrix
    basis = ConceptBasis(V)
    alpha = float(0.1 * alpha_max(basis, X).median())
    U = PFVDecomposer(basis, alpha=alpha, tol=1e-8, solver="working_set").transform(X)
    corr = (X - U @ V) @ V.t()
    assert (corr.abs() <= alpha * (1 + 1e-4)).all()
    U_sk = torch.from_numpy(sparse_encode(X.numpy(), V.numpy(), algorithm="lasso_cd", alpha=alpha, max_iter=20000))
    assert lasso_objective(X, U, V, alpha).sum() <= lasso_objective(X, U_sk, V, alpha).sum() * (1 + 1e-6)


def test_no_pfvs_and_float32_agrees_with_float64():
    X, V = problem(n=12, c=16, k=128, relu_like=True, seed=7)
    for solver in ("homotopy", "working_set", "fista"):
        dec = PFVDecomposer(ConceptBasis(V), alpha=0.3, solver=solver)
        empty = dec.transform(torch.zeros(0, 16, dtype=torch.float64))
        assert empty.shape == (0, 128) and empty.dtype == torch.float64
        assert dec.transform(torch.zeros(0, 16, 2, 2, dtype=torch.float64)).shape == (0, 128, 2, 2)
    U64 = PFVDecomposer(ConceptBasis(V), alpha=0.3, tol=1e-8, solver="working_set").transform(X)
    U32 = PFVDecomposer(ConceptBasis(V.float()), alpha=0.3, tol=1e-5, solver="working_set").transform(X.float())
    assert U32.dtype == torch.float32
    o64 = lasso_objective(X, U64, V, 0.3)
    o32 = lasso_objective(X, U32.double(), V, 0.3)
    assert torch.allclose(o32, o64, rtol=1e-4)
    assert (o64 <= o32 * (1 + 1e-7)).all()  # float64 is at least as good


@pytest.mark.parametrize("dtype, rounding", [(torch.float16, 1e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("solver", ["homotopy", "working_set", "fista"])
def test_half_precision_pfvs_match_their_float32_solution(dtype, rounding, solver):
    # squared norms of PFVs overflow float16 (its max is 65504): half inputs are solved in float32
    X, V = problem(n=20, c=16, k=128, relu_like=True, seed=3)
    Xh, Vh = (30 * X).to(dtype), (30 * V).to(dtype)  # PFV norms of ~300, as in real conv layers
    U = PFVDecomposer(ConceptBasis(Vh), alpha=3.0, solver=solver).transform(Xh)
    assert U.dtype == dtype and torch.isfinite(U).all()
    U32 = PFVDecomposer(ConceptBasis(Vh.float()), alpha=3.0, solver=solver).transform(Xh.float())
    Xr, Vr = Xh.double(), Vh.double()  # the problem as the half-precision inputs state it
    got, want = lasso_objective(Xr, U.double(), Vr, 3.0), lasso_objective(Xr, U32.double(), Vr, 3.0)
    assert (got <= want * (1 + rounding)).all()  # only the rounding of the coefficients to half


def test_auto_solver_picks_the_homotopy_for_few_channels(monkeypatch):
    import captum_gig.decompose as decompose

    used = []
    for name in ("_homotopy", "_working_set", "_fista"):
        real = getattr(decompose, name)
        monkeypatch.setattr(decompose, name, lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    PFVDecomposer(ConceptBasis(torch.randn(64, 8)), alpha=0.5).transform(torch.randn(4, 8))
    assert used == ["_homotopy"]
    used.clear()
    wide, X = ConceptBasis(torch.randn(1024, 160)), torch.randn(4, 160)
    PFVDecomposer(wide, alpha=float(0.5 * alpha_max(wide, X).min())).transform(X)
    assert used[0] == "_working_set"


def test_sparse_reconstruction_equals_the_dense_product():
    from captum_gig.decompose import sparse_times

    X, V = problem(n=80, k=256, seed=3)
    U = PFVDecomposer(ConceptBasis(V), alpha=0.3, solver="working_set").transform(X)
    assert 0 < float((U != 0).double().mean()) < 0.1  # sparse: the CSR product
    assert torch.allclose(sparse_times(U, V), U @ V, atol=1e-10)
    dense = torch.randn(5, 256, dtype=torch.float64)  # dense: the ordinary product
    assert torch.allclose(sparse_times(dense, V), dense @ V)
    wanted = U.clone().requires_grad_(True)  # gradients: the ordinary product, which has them
    sparse_times(wanted, V).sum().backward()
    assert torch.allclose(wanted.grad, V.sum(1).expand_as(U))


@pytest.mark.parametrize("noise", [0.0, 1e-7, 1e-6, 1e-5])
def test_homotopy_with_near_copies_of_concepts_stays_at_the_lasso_solution(noise):
    # two concepts one direction (a basis with a duplicated cluster) make the active Gram singular: the path
    # must not blow up into huge cancelling coefficients (it did: |u| ~ 1e5 at noise 1e-7)
    g = torch.Generator().manual_seed(0)
    V = torch.nn.functional.normalize(torch.randn(150, 32, generator=g), dim=1)
    V[100:150] = V[0:50] + noise * torch.randn(50, 32, generator=g)
    basis = ConceptBasis(V, torch.zeros(32))
    X = (torch.rand(300, 150, generator=g) < 0.03).float() @ V + 0.1 * torch.randn(300, 32, generator=g)
    U = PFVDecomposer(basis, alpha=0.3, solver="homotopy").transform(X)
    assert float(U.abs().max()) < 10
    # the Lasso's optimality conditions (an independent certificate): |corr| <= alpha, = alpha sign(u) on the support
    corr = (X - U @ V).double() @ V.double().t()
    assert float(corr.abs().max()) <= 0.3 * (1 + 1e-3)
    on = U != 0
    assert float((corr[on] - 0.3 * U[on].sign()).abs().max()) <= 0.3 * 1e-3


def test_working_set_rows_whose_newton_steps_stall_are_solved_by_the_homotopy(monkeypatch):
    import captum_gig.decompose as decompose

    # near-copies of concepts: the restricted Newton solves on them stall, as on ResNet50 layers
    g = torch.Generator().manual_seed(4)
    base = torch.nn.functional.normalize(torch.randn(24, 12, generator=g, dtype=torch.float64), dim=1)
    V = torch.cat([base, base + 1e-4 * torch.randn(24, 12, generator=g, dtype=torch.float64)])
    X = torch.randn(64, 8, generator=g, dtype=torch.float64) @ base[:8] * 3
    used = []
    for name in ("_homotopy", "_fista"):
        real = getattr(decompose, name)
        monkeypatch.setattr(decompose, name, lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    alpha = 0.05
    U = PFVDecomposer(ConceptBasis(V), alpha=alpha, tol=1e-10, solver="working_set").transform(X)
    assert used and used[0] == "_homotopy"  # the stalled rows went to the exact path
    corr = (X - U @ V) @ V.t()
    assert (corr.abs() <= alpha * (1 + 1e-3)).all()  # KKT: no concept violates
    support = U != 0
    assert torch.allclose(corr[support], alpha * torch.sign(U[support]), rtol=1e-2, atol=1e-3)
    ref = PFVDecomposer(ConceptBasis(V), alpha=alpha, tol=1e-12, max_iter=100000, solver="fista").transform(X)
    assert (lasso_objective(X, U, V, alpha) <= lasso_objective(X, ref, V, alpha) * (1 + 1e-3)).all()
