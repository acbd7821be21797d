"""Exact curvature timings: second-order backpropagation against autodiff and the peers.

Prints a table; not a test. Cases (float64, cross-entropy, random data):

- 784-32-10 sigmoid, N = 1000 (P = 25,450) and a 3-layer 784-32-16-10 sigmoid net;
  rows: our full Hessian, layer blocks and diagonal; the fastest autodiff route for the full
  Hessian (chunked Hessian-vector products with identity columns, batched by double backward
  or by vmap(jvp(grad)); estimated from a timed fraction of the chunks when the whole would
  take more than 60 s); BackPACK (DiagHessian; HMP on identity columns for the first weight
  block) and curvlinops (HessianLinearOperator @ identity columns) when importable; and the
  arithmetic floor N·P² multiply-adds at the float64 GEMM rate measured in the same run.
- Hessian-vector product time over gradient time for 784-300-10, N = 60,000, float32.

    python benchmarks/curvature.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import time
import warnings

import torch
from torch import nn

from secondorder.curvature import hessian, hessian_blocks, hessian_diagonal, layer_hessians
from secondorder.curvature.autodiff import hessian_rows, prepare
from secondorder.models import Sigmoid, mlp
from secondorder.objective import ModelObjective

ROWS: list[tuple[str, str, str, str]] = []


def row(case: str, what: str, seconds: float | None, note: str = "") -> None:
    t = "—" if seconds is None else f"{seconds:10.3f}"
    ROWS.append((case, what, t, note))
    print(f"  {what:<44} {t:>10}  {note}", flush=True)


def clock(fn, repeat: int = 1):
    best, out = math.inf, None
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def gemm_rate(n: int) -> float:
    """Multiply-adds per second of a float64 n×n matmul (best of 3)."""
    a = torch.randn(n, n, dtype=torch.float64)
    b = torch.randn(n, n, dtype=torch.float64)
    a @ b
    t, _ = clock(lambda: a @ b, repeat=3)
    return n**3 / t


def make_case(widths, N, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    model = mlp(widths, "sigmoid", seed=seed, dtype=dtype)
    X = torch.rand(N, widths[0], generator=g, dtype=dtype)
    y = torch.randint(0, widths[-1], (N,), generator=g)
    return model, X, y


def autodiff_full(model, X, y, chunk: int, budget: float, H_check=None):
    """Fastest autodiff route for the full Hessian: (seconds, estimated?, route, max error)."""
    problem = prepare(model, X, y, "cross_entropy", 0.0)
    P = problem.n_params
    n_chunks = math.ceil(P / chunk)
    fn = problem.objective()
    best = None
    for route in ("reverse", "forward"):
        try:
            t_build, (rows, _) = clock(lambda route=route: hessian_rows(fn, problem.theta, route))
        except RuntimeError as exc:
            print(f"    route {route}: unavailable ({exc})")
            continue
        times = []
        for c in range(min(3, n_chunks)):
            E = torch.zeros(min(chunk, P - c * chunk), P, dtype=X.dtype)
            E[:, c * chunk : c * chunk + E.shape[0]].fill_diagonal_(1.0)
            t, _ = clock(lambda E=E, rows=rows: rows(E))
            times.append(t)
        per = sum(times[1:]) / max(len(times) - 1, 1) if len(times) > 1 else times[0]
        est = t_build + per * n_chunks
        print(f"    route {route}: {per:.3f} s per {chunk} columns → {est:.1f} s estimated")
        if best is None or est < best[0]:
            best = (est, route, rows)
    est, route, rows = best
    if est <= budget:
        H = torch.empty(P, P, dtype=X.dtype)

        def run():
            for a in range(0, P, chunk):
                E = torch.zeros(min(chunk, P - a), P, dtype=X.dtype)
                E[:, a : a + E.shape[0]].fill_diagonal_(1.0)
                H[a : a + E.shape[0]] = rows(E)
            return H

        t, H = clock(run)
        err = None if H_check is None else float((H - H_check).abs().max())
        return t, False, route, err
    return est, True, route, None


def torch_layers(model: nn.Sequential) -> nn.Sequential:
    """The same network with torch.nn activations (the peers dispatch on module types)."""
    return nn.Sequential(*[nn.Sigmoid() if isinstance(m, Sigmoid) else m for m in model])


def backpack_rows(case, model, X, y, ours_diag, chunk, budget):
    try:
        from backpack import backpack, extend
        from backpack.extensions import HMP, DiagHessian
    except ImportError:
        row(case, "BackPACK DiagHessian", None, "skipped: backpack-for-pytorch not installed")
        row(case, "BackPACK HMP, first weight block", None, "skipped: not installed")
        return
    m = extend(copy.deepcopy(torch_layers(model)))  # extend() hooks the modules it gets
    lossf = extend(nn.CrossEntropyLoss())

    def diag():
        m.zero_grad()
        with backpack(DiagHessian()):
            lossf(m(X), y).backward()
        return torch.cat([p.diag_h.reshape(-1) for p in m.parameters()])

    t, d = clock(diag)
    err = float((d - ours_diag).abs().max() / ours_diag.abs().max())
    row(case, "BackPACK DiagHessian", t, f"max rel. diff to ours {err:.1e}")
    W1 = m[0].weight
    n = W1.numel()
    m.zero_grad()
    with backpack(HMP()):
        lossf(m(X), y).backward()
    V = torch.zeros(chunk, n, dtype=X.dtype)
    V[:, :chunk].fill_diagonal_(1.0)
    V = V.view(chunk, *W1.shape)
    W1.hmp(V)
    t, _ = clock(lambda: W1.hmp(V))
    est = t * math.ceil(n / chunk)
    row(case, "BackPACK HMP, first weight block", est, f"estimated from {chunk} columns")


def curvlinops_rows(case, model, X, y, chunk):
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        row(case, "curvlinops HessianLinearOperator @ I", None, "skipped: not installed")
        return
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = HessianLinearOperator(torch_layers(model), nn.CrossEntropyLoss(), params, [(X, y)])
    P = sum(p.numel() for p in params)
    E = torch.zeros(P, chunk, dtype=X.dtype)
    E[:chunk].fill_diagonal_(1.0)
    op @ E[:, :2]
    t, _ = clock(lambda: op @ E)
    row(
        case,
        "curvlinops HessianLinearOperator @ I",
        t * math.ceil(P / chunk),
        f"estimated from {chunk} columns (full Hessian)",
    )
    n1 = params[0].numel()
    row(
        case,
        "curvlinops, first weight block",
        t * math.ceil(n1 / chunk),
        f"estimated: {n1} columns",
    )


def exact_case(name, widths, N, rate, args):
    print(f"\n{name}: {'-'.join(map(str, widths))} sigmoid, N = {N}, float64", flush=True)
    model, X, y = make_case(widths, N)
    P = sum(p.numel() for p in model.parameters())
    print(f"  P = {P:,}; dense Hessian {P * P * 8 / 2**30:.2f} GiB")
    t_diag, d = clock(lambda: hessian_diagonal(model, X, y), repeat=3)
    # the first dense result of a process pays for first-touching fresh pages: report both
    t_full_first, H = clock(lambda: hessian(model, X, y))
    del H
    # the machine may be shared: measure the GEMM rate right next to our timing
    n_gemm = 1500 if args.quick else 3000
    r_before = gemm_rate(n_gemm)
    t_full, H = clock(lambda: hessian(model, X, y))
    rate = 0.5 * (r_before + gemm_rate(n_gemm))
    floor = N * P * P / rate
    H_check = H if args.quick else None
    del H
    gc.collect()
    t_layers, lb = clock(lambda: layer_hessians(model, X, y))
    del lb
    t_first, _ = clock(lambda: hessian_blocks(model, X, y, pairs=[(0, 0)]))
    gc.collect()
    print("  autodiff routes:")
    t_ad, est, route, err = autodiff_full(model, X, y, args.chunk, args.budget, H_check)
    del H_check
    gc.collect()
    row(
        name,
        "ours: full Hessian",
        t_full,
        f"{t_full / floor:.2f}× floor (first call in the process: {t_full_first:.1f} s)",
    )
    row(name, "ours: layer blocks (all layers)", t_layers)
    row(name, "ours: first-layer block", t_first)
    row(name, "ours: diagonal", t_diag)
    note = f"route {route}; " + ("estimated" if est else "measured")
    if err is not None:
        note += f"; max |H_autodiff − H_ours| = {err:.1e}"
    row(name, "autodiff: full Hessian (HVP chunks)", t_ad, note)
    row(
        name,
        "floor: N·P² multiply-adds at GEMM rate",
        floor,
        f"{rate / 1e9:.1f} G mult-add/s, measured around our full Hessian",
    )
    row(name, "ratio autodiff / ours (full Hessian)", None, f"{t_ad / t_full:.1f}×")
    backpack_rows(name, model, X, y, d, args.chunk, args.budget)
    curvlinops_rows(name, model, X, y, args.chunk)


def hvp_case(args):
    N = 6000 if args.quick else 60000
    name = f"HVP 784-300-10 N={N} f32"
    print(f"\n{name} (random data)", flush=True)
    model, X, y = make_case([784, 300, 10], N, dtype=torch.float32)
    obj = ModelObjective(model, "cross_entropy", (X, y), l2=0.01)
    theta = obj.initial_theta()
    obj.value_and_grad(theta)
    t_grad, _ = clock(lambda: obj.value_and_grad(theta), repeat=3)
    v = torch.randn_like(theta)
    t_build, product = clock(lambda: obj.hvp_at(theta))
    product(v)
    t_hvp, _ = clock(lambda: product(v), repeat=3)
    X_, y_ = obj.X, obj.y

    def f(t):
        out = obj._forward(t, X_)
        return obj.loss.per_sample(out, y_).mean() + obj._regulariser(t)

    grad_f = torch.func.grad(f)
    t_fwd, _ = clock(lambda: torch.func.jvp(grad_f, (theta,), (v,))[1], repeat=2)
    row(name, "gradient (value_and_grad)", t_grad)
    row(name, "HVP graph build (grad, create_graph)", t_build, f"{t_build / t_grad:.2f}× gradient")
    row(name, "HVP by double backward, per product", t_hvp, f"{t_hvp / t_grad:.2f}× gradient")
    row(name, "HVP by jvp(grad) (forward-over-reverse)", t_fwd, f"{t_fwd / t_grad:.2f}× gradient")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="exact curvature timings (prints a table)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute or so")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--chunk", type=int, default=64, help="identity columns per HVP batch")
    parser.add_argument(
        "--budget", type=float, default=60.0, help="run autodiff fully below this many seconds"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rate = gemm_rate(1500 if args.quick else 4000)
    print(f"float64 GEMM: {rate / 1e9:.1f} G multiply-adds/s")
    if args.quick:
        exact_case("2-layer", [196, 32, 10], 200, rate, args)
        exact_case("3-layer", [196, 16, 8, 10], 200, rate, args)
    else:
        exact_case("2-layer", [784, 32, 10], 1000, rate, args)
        exact_case("3-layer", [784, 32, 16, 10], 1000, rate, args)
    hvp_case(args)
    print("\n| case | quantity | time [s] | note |\n|---|---|---:|---|")
    for case, what, t, note in ROWS:
        print(f"| {case} | {what} | {t.strip()} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
