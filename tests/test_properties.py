"""Property-based tests (hypothesis): line searches meet their conditions or say they failed,
the L-BFGS two-loop matrix is symmetric positive definite, the idx reader gives only its own
error on any bytes, and the spec validator gives only SpecError on any TOML-like values."""

import contextlib
import gzip
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from secondorder.data.dataset import DataError  # noqa: E402
from secondorder.data.idx import read_idx  # noqa: E402
from secondorder.experiments.schema import SpecError  # noqa: E402
from secondorder.experiments.spec import spec_from_dict  # noqa: E402
from secondorder.solvers.linesearch import armijo, strong_wolfe  # noqa: E402
from secondorder.solvers.quasinewton import two_loop  # noqa: E402

D = torch.float64
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- (a) line searches ---------------------------------------------------------------------
def _smooth_problem(seed: int, n: int, wiggle: float, scale: float):
    """f(x) = ½xᵀAx + bᵀx + Σ a_i sin(ω_i x_i) (A SPD) at a random x₀, and a descent direction
    d = −Mg (M SPD) rescaled by ``scale``."""
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, n))
    A = torch.as_tensor(Q @ Q.T + 0.1 * np.eye(n))
    b = torch.as_tensor(rng.standard_normal(n))
    a = torch.as_tensor(wiggle * rng.standard_normal(n))
    w = torch.as_tensor(rng.uniform(0.5, 5.0, n))

    def f(x):
        return 0.5 * x @ (A @ x) + b @ x + (a * torch.sin(w * x)).sum()

    x0 = torch.as_tensor(rng.standard_normal(n) * 2.0)
    t = x0.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(f(t), t)
    R = rng.standard_normal((n, n))
    M = torch.as_tensor(R @ R.T + 0.05 * np.eye(n))
    d = -scale * (M @ g0)
    return f, x0, d


def _f_and_slope(f, x, d):
    t = x.detach().clone().requires_grad_(True)
    v = f(t)
    (g,) = torch.autograd.grad(v, t)
    return float(v.detach()), float(g @ d)


problems = st.tuples(
    st.integers(0, 2**31 - 1),
    st.integers(1, 6),
    st.floats(0.0, 3.0),
    st.floats(1e-3, 1e3),
)


@FAST
@given(problem=problems, alpha0=st.floats(1e-3, 1e2), c1=st.floats(1e-5, 0.3))
def test_armijo_meets_sufficient_decrease_or_reports_failure(problem, alpha0, c1):
    f, x0, d = _smooth_problem(*problem)
    f0, slope0 = _f_and_slope(f, x0, d)
    assume(slope0 < -1e-10)
    res = armijo(f, x0, d, alpha0=alpha0, c1=c1)
    f_new, _ = _f_and_slope(f, res.theta, d)
    assert f_new == pytest.approx(res.f, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(res.theta, x0 + res.alpha * d)
    if res.wolfe:  # the condition the search claims
        assert f_new <= f0 + c1 * res.alpha * slope0 + 1e-12 * max(1.0, abs(f0))
    elif res.success:  # the best point seen, lower than the start (or flat to rounding)
        assert f_new <= f0 + 32 * 2.2e-16 * abs(f0) and "not met" in res.message + "approximate"
    else:
        assert res.alpha == 0.0 and torch.equal(res.theta, x0) and "failed" in res.message


@FAST
@given(problem=problems, alpha0=st.floats(1e-3, 1e2), c=st.floats(0.0, 1.0))
def test_strong_wolfe_meets_both_conditions_or_reports_failure(problem, alpha0, c):
    f, x0, d = _smooth_problem(*problem)
    f0, slope0 = _f_and_slope(f, x0, d)
    assume(slope0 < -1e-10)
    c1 = 1e-4
    c2 = 0.1 + 0.8 * c  # in [0.1, 0.9]
    res = strong_wolfe(f, x0, d, alpha0=alpha0, c1=c1, c2=c2)
    f_new, slope = _f_and_slope(f, res.theta, d)
    tol = 1e-12 * max(1.0, abs(f0))
    if res.wolfe:
        assert f_new <= f0 + c1 * res.alpha * slope0 + tol
        assert abs(slope) <= c2 * abs(slope0) * (1 + 1e-9) + 1e-12
    elif res.success:
        assert f_new <= f0 + 32 * 2.2e-16 * abs(f0)
        assert res.message  # says which condition it gave up on
    else:
        assert res.alpha == 0.0 and torch.equal(res.theta, x0) and "failed" in res.message


# -- (b) the L-BFGS two-loop recursion -----------------------------------------------------
@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 8),
    m=st.integers(0, 8),
    gamma=st.floats(1e-2, 1e2),
)
def test_the_two_loop_matrix_is_symmetric_positive_definite(seed, n, m, gamma):
    rng = np.random.default_rng(seed)
    S, Y, rho = [], [], []
    for _ in range(m):
        s = torch.as_tensor(rng.standard_normal(n) * 10.0 ** rng.uniform(-1, 1))
        y = torch.as_tensor(rng.standard_normal(n) * 10.0 ** rng.uniform(-1, 1))
        sy = float(s @ y)
        if sy < 0:
            y = -y
            sy = -sy
        # pairs well inside s·y > 0: nearly orthogonal s, y make H as ill-conditioned as
        # float64 resolves (cond 1e16), where rounding alone can flip the smallest eigenvalue
        if sy <= 0.05 * float(s.norm() * y.norm()):
            continue
        S.append(s)
        Y.append(y)
        rho.append(1.0 / sy)
    H = torch.stack([two_loop(e.clone(), S, Y, rho, gamma) for e in torch.eye(n, dtype=D)], 1)
    scale = float(H.abs().max())
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-9 * scale)
    ev = torch.linalg.eigvalsh(0.5 * (H + H.T))
    assert float(ev[0]) > 0
    g = torch.as_tensor(rng.standard_normal(n))
    d = -two_loop(g.clone(), S, Y, rho, gamma)
    assert float(g @ d) < 0  # a descent direction


# -- (c) the idx parser --------------------------------------------------------------------
def _valid_idx(rng) -> bytes:
    dims = tuple(int(k) for k in rng.integers(1, 5, size=rng.integers(1, 4)))
    code, dtype = [(0x08, ">u1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")][
        rng.integers(0, 5)
    ]
    head = bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return head + np.zeros(dims, dtype=dtype).tobytes()


def _read_checked(data: bytes):
    """read_idx on ``data`` in a fresh file: its result or its DataError, and the peak of
    the traced allocations during the call."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        path.write_bytes(data)
        tracemalloc.start()
        try:
            out = read_idx(path)
        except DataError as exc:
            out = exc
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    return out, peak


def _bound(data: bytes) -> int:
    """What a file of these bytes can hold: its length, or 1032 bytes per gzip byte."""
    return len(data) * (1032 if data[:2] == b"\x1f\x8b" else 1) + (2 << 20)


@FAST
@given(data=st.binary(max_size=300))
def test_random_bytes_give_an_array_or_the_library_error(data):
    out, peak = _read_checked(data)
    assert isinstance(out, (np.ndarray, DataError))
    assert peak <= _bound(data)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    gz=st.booleans(),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    cut=st.integers(-8, 8),
)
def test_mutated_valid_files_give_an_array_or_the_library_error(seed, gz, edits, cut):
    rng = np.random.default_rng(seed)
    data = bytearray(_valid_idx(rng))
    if gz:
        data = bytearray(gzip.compress(bytes(data)))
    for pos, byte in edits:
        data[pos % len(data)] = byte
    data = data[:cut] if cut < 0 else data + bytes(cut)
    out, peak = _read_checked(bytes(data))
    assert isinstance(out, (np.ndarray, DataError))
    if isinstance(out, DataError):
        assert "/f" in str(out)  # names the file
    assert peak <= _bound(bytes(data))


# -- (d) the spec validator ----------------------------------------------------------------
toml_scalars = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
SPEC_KEYS = [
    "name", "max_iter", "checkpoint_every", "data", "model", "sampler", "solvers", "sweep",
    "metrics", "report", "dtype", "device", "seed", "loss", "l2", "parts", "quick",
]  # fmt: skip


def _base_spec() -> dict:
    return {
        "name": "logit",
        "max_iter": 5,
        "data": {"kind": "two-class-2d", "n_train": 20, "n_test": 5},
        "model": {"kind": "logistic"},
        "sampler": {"kind": "fixed", "batch_size": 5},
        "solvers": [{"name": "L-BFGS", "method": "lbfgs"}, {"method": "newton"}],
    }


def _paths(d, prefix=()):
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, (*prefix, i))


def _set(d, path, value):
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _validates_or_spec_error(raw):
    """A Spec or a SpecError; any other exception fails the test."""
    with contextlib.suppress(SpecError):
        spec_from_dict(raw)


@FAST
@given(raw=st.dictionaries(st.sampled_from(SPEC_KEYS) | st.text(max_size=8), toml_values))
def test_random_specs_give_only_spec_errors(raw):
    _validates_or_spec_error(raw)


@FAST
@given(
    picks=st.lists(st.tuples(st.integers(0, 10**6), toml_values), min_size=1, max_size=3),
    extra=st.dictionaries(st.text(max_size=8), toml_values, max_size=2),
)
def test_mutated_valid_specs_give_only_spec_errors(picks, extra):
    raw = _base_spec()
    for pick, value in picks:
        paths = [p for p in _paths(raw) if p]
        _set(raw, paths[pick % len(paths)], value)
    raw.update({k: v for k, v in extra.items() if k not in raw})
    _validates_or_spec_error(raw)


def test_the_base_spec_is_valid():
    """The mutations above start from a valid spec (else they would test nothing deep)."""
    assert spec_from_dict(_base_spec()).cells()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sweep": 1}, "sweep: expected a table"),
        ({"metrics": 0}, "metrics: expected a list of strings"),
        ({"metrics": [0]}, "metrics: expected a list of strings"),
        ({"seeds": 3}, "seeds: expected a list of integers"),
        ({"model": {"kind": []}}, "model.kind: expected a string"),
        ({"data": {"kind": {"a": 1}}}, "data.kind: expected a string"),
    ],
)
def test_values_of_the_wrong_type_found_by_the_properties_are_spec_errors(change, message):
    raw = {**_base_spec(), **change}
    with pytest.raises(SpecError, match=message):
        spec_from_dict(raw)
