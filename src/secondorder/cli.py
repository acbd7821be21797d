"""The ``secondorder`` command line.

``import secondorder`` already loads torch and the core; the experiments and the report (which
add Matplotlib, about a second) are imported only by the subcommands that need them, so
``secondorder --help`` does not wait for them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from secondorder import __version__
from secondorder._format import format_number
from secondorder.cli_experiments import add_commands
from secondorder.curvature import saddle_report
from secondorder.data import (
    DataError,
    find_fashion_mnist,
    from_arrays,
    load_fashion_mnist,
    two_class_2d,
)
from secondorder.diagnostics import gradient_test, hessian_test
from secondorder.models import logistic_regression, mlp
from secondorder.objective import ModelObjective
from secondorder.solvers import minimize

__all__ = ["main"]


def _dtype(name: str):
    table = {"float32": torch.float32, "float64": torch.float64}
    if name not in table:
        raise argparse.ArgumentTypeError(f"--dtype must be float32 or float64, got {name!r}")
    return table[name]


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.replace("x", ",").split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--widths must be comma-separated integers such as 784,300,10, got {text!r}"
        ) from None
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(
            f"--widths needs at least two positive widths, got {text!r}"
        )
    return widths


def _cli_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(X, y, number of classes) from --data and --samples (random data: Gaussian inputs with
    uniformly drawn labels, sized by --model and --widths)."""
    dtype = args.dtype
    gen = torch.Generator().manual_seed(args.seed)
    if args.data == "fashion-mnist":
        train = load_fashion_mnist(dtype=dtype).train
        return train.X[: args.samples], train.y[: args.samples], 10
    if args.data == "two-class-2d":
        train = two_class_2d(seed=args.seed, dtype=dtype).train
        return train.X[: args.samples], train.y[: args.samples], 2
    n_in = 2 if args.model == "logistic" else (args.widths[0] if args.widths else 20)
    n_classes = 2 if args.model == "logistic" else (args.widths[-1] if args.widths else 3)
    X = torch.randn(args.samples, n_in, generator=gen, dtype=dtype)
    y = torch.randint(0, n_classes, (args.samples,), generator=gen)
    data = from_arrays(X, y, n_classes=n_classes)
    return data.X, data.y, n_classes


def _build_problem(args: argparse.Namespace):
    """A ModelObjective from the --model/--data options shared by several subcommands, made
    by the experiments' model and objective builders (the command line supplies the data)."""
    # imported here: the experiments package loads Matplotlib (see the module doc)
    from secondorder.experiments.problems import make_model, model_objective

    X, y, n_classes = _cli_data(args)
    if args.model == "logistic":
        if n_classes != 2:
            raise SystemExit("error: --model logistic needs two classes (use --data two-class-2d)")
        table, widths, loss = {"kind": "logistic", "seed": args.seed}, None, "logistic"
    else:
        widths = args.widths or [X.shape[1], 32, n_classes]
        if widths[0] != X.shape[1] or widths[-1] != n_classes:
            raise SystemExit(
                f"error: --widths must start with the input width {X.shape[1]} and end with the "
                f"number of classes {n_classes}, got {widths}"
            )
        table = {"kind": "mlp", "activation": args.activation, "seed": args.seed}
        loss = args.loss
    model = make_model(table, widths, X.shape[1], args.dtype)
    return model_objective(model, loss, (X, y), l2=args.l2, dtype=args.dtype)


def _add_problem_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["logistic", "mlp"], default="mlp")
    p.add_argument("--widths", type=_widths, default=None, help="layer widths, e.g. 784,300,10")
    p.add_argument(
        "--activation",
        default="sigmoid",
        choices=["sigmoid", "tanh", "relu", "softplus", "identity"],
    )
    p.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "mse"])
    p.add_argument(
        "--data",
        default="random",
        choices=["random", "two-class-2d", "fashion-mnist"],
        help="random Gaussian inputs, the 2-D logistic-regression set, or Fashion-MNIST",
    )
    p.add_argument("--samples", type=int, default=200, help="number of samples to use")
    p.add_argument("--l2", type=float, default=0.0, help="λ of the L2 term λ/2·‖W‖²")
    p.add_argument("--dtype", type=_dtype, default="float64", help="float32 or float64")
    p.add_argument("--seed", type=int, default=0)


def _cmd_gradtest(args: argparse.Namespace) -> int:
    """Gradient test (eq. 31), and the Hessian Taylor test with --hessian."""
    if args.samples < 1:
        raise SystemExit("error: --samples must be a positive integer")
    objective = _build_problem(args)
    results = [gradient_test(objective, seed=args.seed)]
    if args.hessian:
        results.append(hessian_test(objective, seed=args.seed))
    for r in results:
        print(r.table())
        print()
    if args.plot:
        from secondorder.report.diagnostics_figures import plot_gradient_test

        for r in results:
            path = args.plot if len(results) == 1 else args.plot.replace(".", f"-{r.kind}.", 1)
            print(f"plot written to {plot_gradient_test(r, path)}")
    return 0 if all(r.passed for r in results) else 1


def _cmd_curvature(args: argparse.Namespace) -> int:
    """Convexity / saddle report (Appendix C) at the initial or a trained point."""
    if args.samples < 1:
        raise SystemExit("error: --samples must be a positive integer")
    objective = _build_problem(args)
    theta = objective.initial_theta()
    if args.train_iters:
        res = minimize(objective, theta, method="lbfgs", max_iter=args.train_iters)
        theta = res.theta
        print(
            f"trained {res.nit} L-BFGS iterations: f = {format_number(float(res.f), 6)}, "
            f"|g| = {format_number(float(res.grad_norm), 3)} ({res.message})\n"
        )
    report = saddle_report(
        objective.model,
        objective.X,
        objective.y,
        loss=objective.loss.name,
        l2=objective.l2_coefficient,
        theta=theta,
        seed=args.seed,
    )
    print(report.to_text())
    if args.plot:
        from secondorder.report.diagnostics_figures import plot_saddle_report

        print(f"\nspectrum plot written to {plot_saddle_report(report, args.plot)}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    try:
        where = find_fashion_mnist(args.root)
        if where is None:
            if args.no_download:
                raise DataError(
                    "Fashion-MNIST not found (looked in $SECONDORDER_DATA, "
                    "/usr/share/datasets/fashion-mnist and the user cache)"
                )
            print("Fashion-MNIST not found locally: downloading it")
        splits = load_fashion_mnist(args.root, download=not args.no_download)
        where = find_fashion_mnist(args.root)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = splits.train.class_counts().tolist()
    print(
        f"Fashion-MNIST in {where}: {len(splits.train)} training images "
        f"({min(counts)}-{max(counts)} per class), {len(splits.test)} test images"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """A short tour: derivative tests, then logistic regression fitted by several solvers."""
    f64 = torch.float64
    data = two_class_2d(seed=args.seed, dtype=f64)
    logistic = ModelObjective(logistic_regression(2, dtype=f64), "logistic", data.train)
    print("1. Gradient test (eq. 31) on logistic regression, float64")
    print(gradient_test(logistic, logistic.initial_theta() + 0.5).table())
    gen = torch.Generator().manual_seed(args.seed)
    X = torch.randn(300, 10, generator=gen, dtype=f64)
    y = torch.randint(0, 4, (300,), generator=gen)
    net = ModelObjective(
        mlp([10, 16, 4], "tanh", seed=args.seed, dtype=f64), "cross_entropy", (X, y), l2=0.01
    )
    r = gradient_test(net)
    print(
        "\n   MLP 10-16-4 (tanh, softmax cross-entropy): measured order "
        f"{format_number(r.order, 3)}\n"
    )
    print("2. Logistic regression on the 2-D data set (800 train / 100 validation points)")
    print(
        f"   {'method':<22} {'iters':>5} {'f evals':>7} {'train loss':>11} {'|g|':>9} "
        f"{'val acc':>7} {'time':>7}"
    )
    runs = [
        ("gd", {"line_search": "armijo", "max_iter": 500}),
        ("newton", {}),
        ("newton-cg", {}),
        ("nlcg", {}),
        ("bfgs", {}),
        ("lbfgs", {}),
    ]
    for method, options in runs:
        obj = ModelObjective(logistic_regression(2, dtype=f64), "logistic", data.train)
        start = time.perf_counter()
        res = minimize(obj, obj.initial_theta(), method=method, gtol=1e-8, **options)
        elapsed = time.perf_counter() - start
        acc = obj.accuracy(res.theta, data.test.X, data.test.y)
        label = method + (" (armijo)" if method == "gd" else "")
        print(
            f"   {label:<22} {res.nit:>5} {res.nfev:>7} {format_number(float(res.f), 6):>11} "
            f"{format_number(float(res.grad_norm), 2):>9} {format_number(acc, 3):>7} "
            f"{format_number(elapsed, 3):>6}s"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secondorder",
        description="Second-order optimisation and exact curvature for neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"secondorder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "gradtest",
        help="gradient test (eq. 31) and Hessian Taylor test with measured convergence order",
    )
    _add_problem_options(p)
    p.add_argument("--hessian", action="store_true", help="also run the Hessian-vector test")
    p.add_argument("--plot", default=None, help="write a log-log plot to this PNG/SVG path")
    p.set_defaults(func=_cmd_gradtest)

    p = sub.add_parser(
        "curvature",
        help="convexity / saddle report: sign of σ″·∂L/∂X per layer, smallest eigenvalues, verdict",
    )
    _add_problem_options(p)
    p.add_argument(
        "--train-iters",
        type=int,
        default=0,
        help="first train this many L-BFGS iterations, then report at that point",
    )
    p.add_argument("--plot", default=None, help="write the spectrum plot to this PNG/SVG path")
    p.set_defaults(func=_cmd_curvature)

    p = sub.add_parser("data", help="find Fashion-MNIST, downloading it when missing")
    p.add_argument("--root", default=None, help="a directory holding the four idx files")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("demo", help="a short tour: derivative tests and a logistic-regression fit")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
