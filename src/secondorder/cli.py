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
from pathlib import Path

import torch

from secondorder import __version__
from secondorder._format import format_number
from secondorder._progress import format_seconds
from secondorder.cli_experiments import Formatter, add_commands, guarded, progress_wanted
from secondorder.curvature import saddle_report
from secondorder.curvature.structure import analyse_mlp, theta_blocks
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
        if args.loss is not None:
            raise SystemExit(
                "error: --loss does not apply to --model logistic (its loss is the logistic loss)"
            )
        table, widths, loss = {"kind": "logistic", "seed": args.seed}, None, "logistic"
    else:
        widths = args.widths or [X.shape[1], 32, n_classes]
        if widths[0] != X.shape[1] or widths[-1] != n_classes:
            raise SystemExit(
                f"error: --widths must start with the input width {X.shape[1]} and end with the "
                f"number of classes {n_classes}, got {widths}"
            )
        table = {"kind": "mlp", "activation": args.activation, "seed": args.seed}
        loss = args.loss or "cross_entropy"
        if loss == "mse":  # squared error against one-hot targets of the class labels
            y = torch.nn.functional.one_hot(y, n_classes).to(args.dtype)
    model = make_model(table, widths, X.shape[1], args.dtype)
    return model_objective(model, loss, (X, y), l2=args.l2, dtype=args.dtype)


def _add_problem_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        choices=["logistic", "mlp"],
        default="mlp",
        help="logistic regression (two classes) or a multi-layer perceptron",
    )
    p.add_argument(
        "--widths",
        type=_widths,
        default=None,
        help="MLP layer widths, input to output, e.g. 784,300,10 (default: INPUT,32,CLASSES)",
    )
    p.add_argument(
        "--activation",
        default="sigmoid",
        choices=["sigmoid", "tanh", "relu", "softplus", "identity"],
        help="the MLP's hidden activation",
    )
    p.add_argument(
        "--loss",
        default=None,
        choices=["cross_entropy", "mse"],
        help="the MLP's loss: softmax cross-entropy on the labels, or squared error against "
        "one-hot targets (default: cross_entropy)",
    )
    p.add_argument(
        "--data",
        default="random",
        choices=["random", "two-class-2d", "fashion-mnist"],
        help="random Gaussian inputs, the 2-D logistic-regression set, or Fashion-MNIST",
    )
    p.add_argument("--samples", type=int, default=200, help="number of samples to use")
    p.add_argument("--l2", type=float, default=0.0, help="λ of the L2 term λ/2·‖W‖²")
    p.add_argument("--dtype", type=_dtype, default="float64", help="float32 or float64")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and random data")


def _plot_paths(plot: str, kinds: list[str]) -> list[Path]:
    """The file of each test's plot: ``plot`` itself for one test; for several,
    ``STEM-KIND.SUFFIX`` beside it (``grad.png`` → ``grad-gradient.png``, ``grad-hessian.png``)."""
    path = Path(plot)
    if len(kinds) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{kind}{path.suffix}") for kind in kinds]


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

        for r, path in zip(results, _plot_paths(args.plot, [r.kind for r in results])):
            print(f"plot written to {plot_gradient_test(r, str(path))}")
    return 0 if all(r.passed for r in results) else 1


def _curvature_estimate(objective, theta: torch.Tensor, dense_limit: int) -> str:
    """What the saddle report will cost, from the size of θ and one timed Hessian-vector
    product (each Lanczos step is one)."""
    P = objective.n_params
    item = 8  # eigenvalues are computed in float64
    v = torch.randn(P, dtype=theta.dtype, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    objective.hvp(theta, v)
    t_hvp = time.perf_counter() - t0
    struct, _ = analyse_mlp(objective.model)
    sizes = [P] + [b - a for _, a, b in theta_blocks(objective.model, struct)]
    lanczos = [n for n in sizes if n > dense_limit]
    dense = [n for n in sizes if n <= dense_limit]
    steps = sum(min(n, 300) for n in lanczos)
    memory = max([min(n, 300) * n * item for n in lanczos] + [2 * n * n * item for n in dense])
    time_s = steps * t_hvp
    parts = []
    if dense:
        parts.append(f"dense eigh up to {max(dense)}×{max(dense)}")
    if lanczos:
        parts.append(
            f"Lanczos on {len(lanczos)} operator(s), ≤ {steps} Hessian-vector products of "
            f"{t_hvp:.2g}s each"
        )
    return (
        f"{P:,} parameters, {objective.n_samples:,} samples: {', '.join(parts)}; "
        f"estimate up to {format_seconds(time_s)} (dense Hessians extra) and "
        f"{memory / 2**20:,.0f} MiB"
    )


def _cmd_curvature(args: argparse.Namespace) -> int:
    """Convexity / saddle report (Appendix C) at the initial or a trained point."""
    if args.samples < 1:
        raise SystemExit("error: --samples must be a positive integer")
    progress = progress_wanted(args)
    objective = _build_problem(args)
    theta = objective.initial_theta()
    if args.train_iters:
        res = minimize(
            objective, theta, method="lbfgs", max_iter=args.train_iters, progress=progress
        )
        theta = res.theta
        print(
            f"trained {res.nit} L-BFGS iterations: f = {format_number(float(res.f), 6)}, "
            f"|g| = {format_number(float(res.grad_norm), 3)} ({res.message})\n"
        )
    print(
        f"saddle report: {_curvature_estimate(objective, theta, args.dense_limit)}", file=sys.stderr
    )
    report = saddle_report(
        objective.model,
        objective.X,
        objective.y,
        loss=objective.loss.name,
        l2=objective.l2_coefficient,
        theta=theta,
        seed=args.seed,
        dense_limit=args.dense_limit,
        progress=progress,
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
        print(f"secondorder: error: {err}", file=sys.stderr)
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


def _subparser(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, formatter_class=Formatter)


def _add_derivative_commands(sub) -> None:
    """``gradtest`` and ``curvature``: the commands that build a model from the options."""
    p = _subparser(
        sub,
        "gradtest",
        "gradient test (eq. 31) and Hessian Taylor test with measured convergence order",
        "Check the gradient (and with --hessian the Hessian-vector product) of a model's "
        "objective by Taylor tests: the error must fall with order 2 (3 for the Hessian) as "
        "the step shrinks. Exits 1 when a test fails.",
    )
    _add_problem_options(p)
    p.add_argument("--hessian", action="store_true", help="also run the Hessian-vector test")
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="write a log-log plot to FILE (.png or .svg); with --hessian two files beside it, "
        "STEM-gradient.SUFFIX and STEM-hessian.SUFFIX, and none under FILE itself",
    )
    p.set_defaults(func=_cmd_gradtest)

    p = _subparser(
        sub,
        "curvature",
        "convexity / saddle report: sign of σ″·∂L/∂X per layer, smallest eigenvalues, verdict",
        "Report, at the initial point (or after --train-iters L-BFGS iterations), the sign "
        "of σ″(Z)·∂L/∂X per activation layer, the extreme eigenvalues of the Hessian and of "
        "every layer block (dense up to --dense-limit parameters, else Lanczos), and a verdict. "
        "An estimate of the time and memory is printed first; progress on a terminal.",
    )
    _add_problem_options(p)
    p.add_argument(
        "--train-iters",
        type=int,
        default=0,
        help="first train this many L-BFGS iterations, then report at that point",
    )
    p.add_argument(
        "--dense-limit",
        type=int,
        default=3000,
        help="dense eigendecomposition up to this many parameters, Lanczos above (0: never)",
    )
    p.add_argument(
        "--plot", default=None, metavar="FILE", help="write the spectrum plot to FILE (.png/.svg)"
    )
    _add_progress_option(p)
    p.set_defaults(func=_cmd_curvature)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secondorder",
        description="Second-order optimisation and exact curvature for neural networks: run "
        "experiment specs into resumable run directories and report them, test derivatives, "
        "and diagnose the curvature of a network. `secondorder COMMAND --help` describes a "
        "command.",
        epilog="Fashion-MNIST is looked for in $SECONDORDER_DATA (a directory with the four idx "
        "files), /usr/share/datasets/fashion-mnist and ~/.cache/secondorder/fashion-mnist.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"secondorder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_derivative_commands(sub)

    p = _subparser(
        sub,
        "data",
        "find Fashion-MNIST, downloading it when missing",
        "Find the four Fashion-MNIST files (in --root, else $SECONDORDER_DATA, "
        "/usr/share/datasets/fashion-mnist and the user cache), download them (SHA-256 "
        "checked) when missing, and print what was found.",
    )
    p.add_argument(
        "--root",
        default=None,
        help="a directory holding the four idx files (default: "
        "$SECONDORDER_DATA, /usr/share/datasets/fashion-mnist, ~/.cache/secondorder/fashion-mnist, "
        "in that order)",
    )
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    p.set_defaults(func=_cmd_data)

    p = _subparser(
        sub,
        "demo",
        "a short tour: derivative tests and a logistic-regression fit",
        "A tour of a few seconds: the gradient test on logistic regression and a small MLP, "
        "then logistic regression on the 2-D set fitted by six solvers, with iterations, "
        "evaluations, loss, accuracy and time.",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    p.set_defaults(func=_cmd_demo)

    add_commands(sub)
    return parser


def _add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr (default: when stderr is a terminal)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse, run the command; the library's own errors and failures of
    the system (a full disk, a file that cannot be written) end in one line on stderr and a
    non-zero status, while anything else (a bug) keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
