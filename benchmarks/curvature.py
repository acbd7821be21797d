"""Exact curvature timings: second-order backpropagation against autodiff and the peers.

Prints the measurements as they come and a final table

    quantity | ours | peer | ratio | target | met?

Not a test. Cases (float64, cross-entropy, random data): 784-32-10 sigmoid, N = 1000
(P = 25,450) and the 3-layer 784-32-16-10 sigmoid net; ``--quick`` shrinks them.

- Hessian diagonal: ours against BackPACK's DiagHessian (target: ≥ 5× faster).
- Layer blocks (the first layer's block, and all layer blocks): ours against BackPACK's HMP
  and curvlinops' HessianLinearOperator (restricted to the layer's parameters) applied to
  identity columns (target: ≥ 3× faster). HMP gives the weight and the bias blocks of a layer
  separately (it has no weight–bias cross term); both are counted.
- Full Hessian, at every thread count of ``--full-threads``: ours against the arithmetic floor
  N·P² multiply-adds at the float64 GEMM rate measured in the same run, interleaved with our
  runs (target: ≤ 2× the floor), and against the fastest autodiff route: Hessian-vector
  products with chunks of identity columns, the gradient's graph built once, batched by double
  backward with ``is_grads_batched``, by ``vmap`` over the pullback of ``vjp(grad)``, or by
  ``vmap(jvp(grad))``; every route and chunk size of ``--chunks`` is timed and the fastest
  taken. curvlinops' HessianLinearOperator @ I is reported too.
- HVP over gradient time for 784-300-10, N = 60,000, float32 (target: ≤ 3×).
- A LeNet-like CNN (Conv2d 1→8 5×5, ReLU, MaxPool, Conv2d 8→16 5×5, ReLU, MaxPool, Flatten,
  Linear 256→64, ReLU, Linear 64→10; P = 20,522; 256 images of 28×28, float64): the Hessian
  and GGN diagonals against BackPACK's DiagHessian and DiagGGNExact (target: ≥ 3× faster),
  and one K-FAC update (exact-GGN factors of the batch, expand, and their damped inverses)
  against curvlinops' KFACLinearOperator (type-2, expand) on the same batch, its factors
  computed and inverted (target: no slower, ratio ≥ 1).

Timings interleave ours and the peer (ours, peer, ours, peer, …) and keep the minimum of
``--repeat`` repetitions (``--heavy-repeat`` for the multi-second dense results). A peer (or
autodiff) whose whole run would take longer than ``--budget`` seconds is timed on a fraction of
its identity columns (whole chunks) and extrapolated; the table says so ("est."). Accuracy is
checked against Hessian-vector products by double backward on sampled rows (and against
BackPACK's diagonal).

    python benchmarks/curvature.py [--quick] [--threads 1] [--full-threads 1,2] [--repeat 10]
                                   [--heavy-repeat 2] [--peers-path DIR] [--budget 60]
                                   [--chunk 64] [--chunks 16,32,64,128,256]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from secondorder.curvature import hessian, hessian_blocks, hessian_diagonal, layer_hessians
from secondorder.curvature.autodiff import ROUTES, hessian_rows, prepare
from secondorder.models import Sigmoid, mlp
from secondorder.objective import ModelObjective

DEFAULT_PEERS = "/tmp/peers"


# -- timing -----------------------------------------------------------------------------------


def interleave(fns: dict[str, Callable], repeat: int, keep: Callable | None = None) -> dict:
    """Run the functions in turn, ``repeat`` rounds; the minimum time of each.

    ``keep(name, result)`` sees every result of the first round (for accuracy checks); later
    results are dropped at once (dense results are large).
    """
    best = dict.fromkeys(fns, math.inf)
    for r in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            out = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            if r == 0 and keep is not None:
                keep(name, out)
            del out
    return best


def gemm_rate(n: int) -> Callable[[], float]:
    """A timed float64 n×n matmul; the rate is n³ over its time."""
    a = torch.randn(n, n, dtype=torch.float64)
    b = torch.randn(n, n, dtype=torch.float64)
    a @ b
    return lambda: a @ b


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fmt_time(t: float | None) -> str:
    if t is None:
        return "—"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.1f} s" if t >= 10 else f"{t:.2f} s"


# -- the final table ----------------------------------------------------------------------------


@dataclass
class Row:
    quantity: str
    ours: float | None
    peer: float | None
    peer_note: str  # "BackPACK", "est. BackPACK", "floor", ...
    ratio: float | None  # in the sense of the target
    target: str
    met: bool | None


TABLE: list[Row] = []


def faster(quantity, ours, peer, peer_note, target=None):
    """A row whose ratio is peer/ours (ours is that many times faster); target: min ratio."""
    ratio = None if ours is None or peer is None else peer / ours
    met = None if ratio is None or target is None else ratio >= target
    tgt = "report" if target is None else f"≥ {target:g}×"
    TABLE.append(Row(quantity, ours, peer, peer_note, ratio, tgt, met))
    if ratio is not None:
        print(f"  → {quantity}: {fmt_time(ours)} vs {fmt_time(peer)} ({peer_note}): {ratio:.2f}×")


def at_most(quantity, ours, ref, ref_note, target):
    """A row whose ratio is ours/ref (ours costs that many refs); target: max ratio."""
    ratio = ours / ref
    TABLE.append(Row(quantity, ours, ref, ref_note, ratio, f"≤ {target:g}×", ratio <= target))
    print(f"  → {quantity}: {fmt_time(ours)} vs {fmt_time(ref)} ({ref_note}): {ratio:.2f}×")


def print_table(quick: bool = False) -> None:
    if quick:
        print("\n--quick: smaller problems than the targets are set for; 'met?' is indicative")
    print("\n| quantity | ours | peer | ratio | target | met? |\n|---|---:|---:|---:|---|---|")
    for r in TABLE:
        peer = "—" if r.peer is None else f"{fmt_time(r.peer)} ({r.peer_note})"
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}×"
        met = {True: "yes", False: "**no**", None: "—"}[r.met]
        if r.peer is None:
            peer = r.peer_note
        print(f"| {r.quantity} | {fmt_time(r.ours)} | {peer} | {ratio} | {r.target} | {met} |")
    print(
        "\nratio: peer / ours (ours is that many times faster) where the target reads ≥ or "
        "'report'; ours / reference (floor, gradient) where it reads ≤. 'est.': the peer's time "
        "extrapolated from a timed fraction of its identity columns (build + whole chunks)."
    )


# -- the problems ------------------------------------------------------------------------------


def make_case(widths, N, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    model = mlp(widths, "sigmoid", seed=seed, dtype=dtype)
    X = torch.rand(N, widths[0], generator=g, dtype=dtype)
    y = torch.randint(0, widths[-1], (N,), generator=g)
    return model, X, y


def torch_layers(model: nn.Sequential) -> nn.Sequential:
    """The same network (shared parameters) with torch.nn activations: the peers dispatch on
    module types."""
    return nn.Sequential(*[nn.Sigmoid() if isinstance(m, Sigmoid) else m for m in model])


def identity_chunk(n: int, start: int, size: int, dtype) -> torch.Tensor:
    """Rows start … start+size−1 of the n×n identity, shape (size, n)."""
    E = torch.zeros(size, n, dtype=dtype)
    E[:, start : start + size].fill_diagonal_(1.0)
    return E


@dataclass
class Columns:
    """A column-by-column method over several parameter groups: ``run(group, start, size)``
    applies it to identity columns; ``build()`` is the one-time setup."""

    name: str
    build: Callable[[], object]
    run: Callable[[object, int, int, int], torch.Tensor]
    sizes: list[int]  # columns per group

    def cost(self, state, chunk: int) -> float:
        """Time of one chunk of each group (first group: the best of two chunks)."""
        per = 0.0
        for g, n in enumerate(self.sizes):
            c = min(chunk, n)
            t = math.inf
            for _ in range(2 if g == 0 else 1):
                t0 = time.perf_counter()
                self.run(state, g, 0, c)
                t = min(t, time.perf_counter() - t0)
            per += t * math.ceil(n / c)
        return per


def column_timer(method: Columns, chunk: int, budget: float):
    """A timing function for ``method`` at ``chunk`` columns per product: the whole run when
    its estimate is within ``budget``, else a fraction extrapolated. Returns (fn, estimated?)
    where fn() returns the (possibly extrapolated) seconds."""
    t0 = time.perf_counter()
    state = method.build()
    t_build = time.perf_counter() - t0
    est = t_build + method.cost(state, chunk)
    if est <= budget:

        def whole():
            t0 = time.perf_counter()
            s = method.build()
            for g, n in enumerate(method.sizes):
                for a in range(0, n, chunk):
                    method.run(s, g, a, min(chunk, n - a))
            return time.perf_counter() - t0

        return whole, False

    def fraction():
        t0 = time.perf_counter()
        s = method.build()
        tb = time.perf_counter() - t0
        return tb + method.cost(s, chunk)

    return fraction, True


def timed_against(ours: Callable, peers: dict[str, tuple[Callable, bool]], repeat: int, keep=None):
    """Interleave ours (timed here) with peer timing functions (which return seconds)."""
    best = dict.fromkeys(["ours", *peers], math.inf)
    for r in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        out = ours()
        best["ours"] = min(best["ours"], time.perf_counter() - t0)
        if r == 0 and keep is not None:
            keep(out)
        del out
        for name, (fn, _) in peers.items():
            gc.collect()
            best[name] = min(best[name], fn())
    return best


# -- peers --------------------------------------------------------------------------------------


def have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def backpack_hmp(model, X, y, params: list[nn.Parameter]) -> Columns:
    """BackPACK's HMP on identity columns of each parameter's own block."""
    from backpack import backpack, extend
    from backpack.extensions import HMP

    net = extend(copy.deepcopy(torch_layers(model)))
    lossf = extend(nn.CrossEntropyLoss())
    index = [i for i, p in enumerate(model.parameters()) if any(p is q for q in params)]

    def build():
        net.zero_grad()
        with backpack(HMP()):
            lossf(net(X), y).backward()
        ps = list(net.parameters())
        return [ps[i] for i in index]

    def run(ps, g, start, size):
        p = ps[g]
        V = identity_chunk(p.numel(), start, size, X.dtype).view(size, *p.shape)
        return p.hmp(V)

    return Columns("BackPACK HMP", build, run, [p.numel() for p in params])


def curvlinops_hessian(model, X, y, groups: list[list[nn.Parameter]]) -> Columns:
    """curvlinops' HessianLinearOperator over each group of parameters, @ identity columns."""
    from curvlinops import HessianLinearOperator

    net = torch_layers(model)

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [
                HessianLinearOperator(
                    net,
                    nn.CrossEntropyLoss(),
                    ps,
                    [(X, y)],
                    check_deterministic=False,
                    num_data=len(X),
                )
                for ps in groups
            ]

    def run(ops, g, start, size):
        n = ops[g].shape[1]
        return ops[g] @ identity_chunk(n, start, size, X.dtype).T

    return Columns("curvlinops", build, run, [sum(p.numel() for p in ps) for ps in groups])


def backpack_diag(model, X, y) -> Callable[[], torch.Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    net = extend(copy.deepcopy(torch_layers(model)))
    lossf = extend(nn.CrossEntropyLoss())

    def diag():
        net.zero_grad()
        with backpack(DiagHessian()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lossf(net(X), y).backward()
        return torch.cat([p.diag_h.reshape(-1) for p in net.parameters()])

    return diag


# -- autodiff ---------------------------------------------------------------------------------


def autodiff_columns(problem, route: str) -> Columns:
    fn = problem.objective()
    P = problem.n_params

    def build():
        return hessian_rows(fn, problem.theta, route)[0]

    def run(rows, g, start, size):
        return rows(identity_chunk(P, start, size, problem.dtype))

    return Columns(f"autodiff {route}", build, run, [P])


def fastest_autodiff(problem, chunks: list[int]) -> tuple[str, int, float]:
    """Time every HVP route at every chunk size (whole chunks, best of two); the fastest."""
    P = problem.n_params
    best = None
    for route in [r for r in ROUTES if r != "loop"]:
        cols = autodiff_columns(problem, route)
        try:
            t0 = time.perf_counter()
            rows = cols.build()
            t_build = time.perf_counter() - t0
        except RuntimeError as exc:
            print(f"    autodiff route {route}: unavailable ({exc})")
            continue
        for c in chunks:
            c = min(c, P)
            t = math.inf
            for _ in range(2):
                t0 = time.perf_counter()
                cols.run(rows, 0, 0, c)
                t = min(t, time.perf_counter() - t0)
            est = t_build + t * math.ceil(P / c)
            print(f"    autodiff {route:>7}, {c:>4} columns a product: {est:8.1f} s estimated")
            if best is None or est < best[2]:
                best = (route, c, est)
    return best


def sampled_rows(problem, rows_idx: torch.Tensor) -> torch.Tensor:
    """Rows of the Hessian by double backward (one batched product)."""
    rows, _ = hessian_rows(problem.objective(), problem.theta, "reverse")
    E = torch.zeros(len(rows_idx), problem.n_params, dtype=problem.dtype)
    E[torch.arange(len(rows_idx)), rows_idx] = 1.0
    return rows(E)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# -- the cases ----------------------------------------------------------------------------------


def exact_case(name: str, widths, N: int, args) -> None:
    print(f"\n{name}: {'-'.join(map(str, widths))} sigmoid, N = {N}, float64", flush=True)
    model, X, y = make_case(widths, N)
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    P1 = params[0].numel() + params[1].numel()
    print(f"  P = {P:,}; dense Hessian {P * P * 8 / 2**30:.2f} GiB")
    problem = prepare(model, X, y, "cross_entropy", 0.0)
    g = torch.Generator().manual_seed(1)
    check_idx = torch.randperm(P, generator=g)[:32]
    first_idx = torch.randperm(P1, generator=g)[:32]
    H_rows = sampled_rows(problem, torch.cat([check_idx, first_idx]))
    bp, cl = have("backpack"), have("curvlinops")
    R, RH = args.repeat, args.heavy_repeat

    with threads(args.threads):
        # -- the diagonal
        fns = {"ours": lambda: hessian_diagonal(model, X, y)}
        if bp:
            fns["BackPACK"] = backpack_diag(model, X, y)
        res: dict = {}
        best = interleave(fns, R, keep=lambda k, v: res.__setitem__(k, v))
        d = res["ours"]
        err = rel_err(d[check_idx], H_rows[:32, :].gather(1, check_idx[:, None])[:, 0])
        note = f"vs double-backward HVPs on 32 sampled entries: max rel. err {err:.1e}"
        if bp:
            note += f"; vs BackPACK (all entries) {rel_err(res['BackPACK'], d):.1e}"
        print(f"  diagonal accuracy: {note}")
        print(f"  ours: diagonal {fmt_time(best['ours'])}")
        faster(
            f"{name}: Hessian diagonal vs BackPACK DiagHessian",
            best["ours"],
            best.get("BackPACK"),
            "BackPACK" if bp else "not installed",
            5,
        )

        # -- the first layer's block and all layer blocks
        layer_params = [params[i : i + 2] for i in range(0, len(params), 2)]
        for what, ours_fn, groups in (
            ("first-layer block", lambda: hessian_blocks(model, X, y, pairs=[(0, 0)]), [0]),
            ("all layer blocks", lambda: layer_hessians(model, X, y), range(len(layer_params))),
        ):
            peers: dict[str, tuple[Callable, bool]] = {}
            methods = []
            if bp:
                methods.append(
                    backpack_hmp(model, X, y, [p for k in groups for p in layer_params[k]])
                )
            if cl:
                methods.append(curvlinops_hessian(model, X, y, [layer_params[k] for k in groups]))
            for m in methods:
                peers[m.name] = column_timer(m, args.chunk, args.budget)

            def check(out, what=what):
                B = out[(0, 0)] if isinstance(out, dict) else out[0]
                e = rel_err(B[first_idx], H_rows[32:, :P1])
                print(f"  {what} accuracy vs double-backward HVPs (32 sampled rows): {e:.1e}")

            best = timed_against(ours_fn, peers, RH, keep=check)
            print(f"  ours: {what} {fmt_time(best['ours'])}")
            for m in methods:
                est = peers[m.name][1]
                label = ("est. " if est else "") + m.name
                faster(f"{name}: {what} vs {m.name} @ I", best["ours"], best[m.name], label, 3)
            for missing, ok in (("BackPACK HMP", bp), ("curvlinops", cl)):
                if not ok:
                    faster(
                        f"{name}: {what} vs {missing} @ I", best["ours"], None, "not installed", 3
                    )
            gc.collect()

    # -- the full Hessian, at each thread count
    for nt in args.full_threads:
        with threads(nt):
            print(f"  full Hessian, {nt} thread(s): choosing the autodiff route", flush=True)
            route, chunk, sweep_est = fastest_autodiff(problem, args.chunks)
            ad = column_timer(autodiff_columns(problem, route), chunk, args.budget)
            ad_key = f"autodiff ({route}, {chunk} columns)"
            peers = {ad_key: ad}
            if cl:
                peers["curvlinops"] = column_timer(
                    curvlinops_hessian(model, X, y, [params]), args.chunk, args.budget
                )
            gemm = gemm_rate(1000 if args.quick else 3000)
            n_g = 1000 if args.quick else 3000
            peers["gemm"] = (lambda gemm=gemm: min_time(gemm), False)

            def check(H):
                e = rel_err(H[torch.cat([check_idx, first_idx])], H_rows)
                print(f"  full Hessian accuracy vs double-backward HVPs (64 sampled rows): {e:.1e}")

            best = timed_against(lambda: hessian(model, X, y), peers, RH, keep=check)
            if ad[1]:  # estimated: the sweep's estimate is one more repetition of the same
                best[ad_key] = min(best[ad_key], sweep_est)
            rate = n_g**3 / best.pop("gemm")
            floor = N * P * P / rate
            print(
                f"  ours: full Hessian {fmt_time(best['ours'])} ({nt} thread(s)); "
                f"GEMM {rate / 1e9:.1f} G mult-add/s → floor {fmt_time(floor)}"
            )
            touch = first_touch(P, X.dtype)
            print(
                f"  allocating and first writing a P×P result: {fmt_time(touch)}, a cost every "
                "dense route pays; 30× the fastest autodiff route would leave "
                f"{fmt_time(best[ad_key] / 30)}"
            )
            tag = f"{nt} thread{'s' if nt > 1 else ''}"
            at_most(
                f"{name}: full Hessian vs floor N·P² at GEMM rate ({tag})",
                best["ours"],
                floor,
                f"floor, {rate / 1e9:.1f} G/s",
                2,
            )
            for key, (_, est) in peers.items():
                if key == "gemm":
                    continue
                label = ("est. " if est else "") + key
                faster(
                    f"{name}: full Hessian vs {key.split(' (')[0]} @ I ({tag})",
                    best["ours"],
                    best[key],
                    label,
                )
            gc.collect()


def first_touch(P: int, dtype: torch.dtype) -> float:
    """Seconds to allocate a P×P matrix and write it once (the page faults of fresh memory)."""
    gc.collect()
    t = time.perf_counter()
    A = torch.empty(P, P, dtype=dtype)
    A.fill_(0.0)
    seconds = time.perf_counter() - t
    del A
    gc.collect()
    return seconds


def min_time(fn: Callable, repeat: int = 2) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def hvp_case(args) -> None:
    N = 6000 if args.quick else 60000
    name = f"784-300-10, N = {N}, float32"
    print(f"\n{name}: HVP against gradient (random data)", flush=True)
    model, X, y = make_case([784, 300, 10], N, dtype=torch.float32)
    obj = ModelObjective(model, "cross_entropy", (X, y), l2=0.01)
    theta = obj.initial_theta()
    v = torch.randn_like(theta)
    with threads(args.threads):
        obj.value_and_grad(theta)
        product = obj.hvp_at(theta)
        product(v)
        best = interleave(
            {
                "gradient": lambda: obj.value_and_grad(theta),
                "hvp": lambda: product(v),
                "build+hvp": lambda: obj.hvp_at(theta)(v),
            },
            args.repeat,
        )
    print(
        f"  gradient {fmt_time(best['gradient'])}; HVP {fmt_time(best['hvp'])} per product "
        f"(graph built once), {fmt_time(best['build+hvp'])} with the build"
    )
    at_most(f"{name}: HVP / gradient time", best["hvp"], best["gradient"], "gradient", 3)
    at_most(
        f"{name}: (graph build + HVP) / gradient time",
        best["build+hvp"],
        best["gradient"],
        "gradient",
        3,
    )


def lenet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).double()


def backpack_cnn_diagonal(model, X, y, extension: str) -> Callable[[], torch.Tensor]:
    """BackPACK's DiagHessian or DiagGGNExact of the mean cross-entropy, flattened."""
    from backpack import backpack, extend
    from backpack import extensions as ext

    net = extend(copy.deepcopy(model))
    lossf = extend(nn.CrossEntropyLoss())
    attr = {"DiagHessian": "diag_h", "DiagGGNExact": "diag_ggn_exact"}[extension]

    def diag():
        net.zero_grad()
        with backpack(getattr(ext, extension)()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lossf(net(X), y).backward()
        return torch.cat([getattr(p, attr).reshape(-1) for p in net.parameters()])

    return diag


def our_kfac_update(model, X, y) -> Callable[[], list]:
    """Exact-GGN factors of the batch and their damped inverses, through the K-FAC engine."""
    from secondorder.curvature.kfac import KFACEngine, kfac_layers, kfac_statistics

    obj = ModelObjective(model, "cross_entropy", (X, y))
    theta = obj.initial_theta()
    layers, _ = kfac_layers(model)

    def update():
        engine = KFACEngine(layers, ema=0.0)
        engine.update(kfac_statistics(obj, theta, layers=layers).factors)
        engine.refresh(1e-3)
        return engine.state

    return update


def curvlinops_kfac_update(model, X, y) -> Callable[[], object]:
    """curvlinops' KFACLinearOperator (type-2, expand) on the batch, factors computed and
    inverted (its inverse operator applied once forces the inversion)."""
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)

    def update():
        op = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            params,
            [(X, y)],
            fisher_type="type-2",
            kfac_approx="expand",
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
        inv = KFACInverseLinearOperator(op, damping=1e-3)
        return inv @ v

    return update


def cnn_case(args) -> None:
    """The LeNet-like CNN of the module doc: diagonals against BackPACK, K-FAC against
    curvlinops."""
    from secondorder.curvature import ggn_diagonal

    N = 64 if args.quick else 256
    print(f"\n== CNN (LeNet-like, P = 20,522), N = {N}, float64 ==")
    model = lenet()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (N,), generator=g)
    with threads(args.threads):
        for name, ours_fn, ext in (
            ("CNN Hessian diagonal", hessian_diagonal, "DiagHessian"),
            ("CNN GGN diagonal", ggn_diagonal, "DiagGGNExact"),
        ):
            ours = ours_fn(model, X, y)
            if not have("backpack"):
                faster(name, min_time(lambda f=ours_fn: f(model, X, y), args.repeat), None, "")
                continue
            peer = backpack_cnn_diagonal(model, X, y, ext)
            print(f"  {name}: max |ours − BackPACK| / max |BackPACK| = {rel_err(ours, peer()):.1e}")
            t = interleave({"ours": lambda f=ours_fn: f(model, X, y), "peer": peer}, args.repeat)
            faster(name, t["ours"], t["peer"], f"BackPACK {ext}", 3.0)
        ours = our_kfac_update(model, X, y)
        if have("curvlinops"):
            t = interleave({"ours": ours, "peer": curvlinops_kfac_update(model, X, y)}, args.repeat)
            faster("CNN K-FAC factors + inverses", t["ours"], t["peer"], "curvlinops KFAC", 1.0)
        else:
            faster("CNN K-FAC factors + inverses", min_time(ours, args.repeat), None, "")


def add_peers_path(path: str | None) -> None:
    if path is None:
        path = DEFAULT_PEERS if os.path.isdir(DEFAULT_PEERS) else None
    if path is not None and path not in sys.path:
        sys.path.insert(0, path)


def int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="exact curvature timings (prints a table)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute or two")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--full-threads",
        type=int_list,
        default=None,
        help="thread counts for the full Hessian rows (default: 1,2 capped at the cores)",
    )
    parser.add_argument(
        "--repeat", type=int, default=10, help="interleaved repetitions, minimum kept"
    )
    parser.add_argument(
        "--heavy-repeat",
        type=int,
        default=2,
        help="repetitions of the multi-second dense results (blocks, full Hessian)",
    )
    parser.add_argument(
        "--peers-path",
        default=None,
        help=f"directory holding backpack and curvlinops (default: {DEFAULT_PEERS} if present)",
    )
    parser.add_argument(
        "--chunk", type=int, default=64, help="identity columns per product for the peers"
    )
    parser.add_argument(
        "--chunks",
        type=int_list,
        default=[16, 32, 64, 128, 256],
        help="chunk sizes tried for the autodiff routes",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="run a peer whole below this many seconds, else extrapolate a timed fraction",
    )
    args = parser.parse_args(argv)
    add_peers_path(args.peers_path)
    cores = os.cpu_count() or 1
    if args.full_threads is None:
        args.full_threads = sorted({1, min(2, cores)})
    print(
        f"torch {torch.__version__}; {cores} cores; threads {args.threads} "
        f"(full Hessian: {args.full_threads}); repeat {args.repeat}, heavy {args.heavy_repeat}"
    )
    for mod in ("backpack", "curvlinops"):
        print(f"  {mod}: {'importable' if have(mod) else 'not importable (rows skipped)'}")
    if args.quick:
        exact_case("196-32-10", [196, 32, 10], 200, args)
        exact_case("196-32-16-10", [196, 32, 16, 10], 200, args)
    else:
        exact_case("784-32-10", [784, 32, 10], 1000, args)
        exact_case("784-32-16-10", [784, 32, 16, 10], 1000, args)
    hvp_case(args)
    cnn_case(args)
    print_table(args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
