"""What a step of ``secondorder.optim.KFAC`` costs, part by part, beside a torch.optim.Adam step.

Each line times whole training steps (``zero_grad``, forward, loss, ``backward``, ``step``) of
one configuration on the same batches of Fashion-MNIST, after a warm-up, and the differences
between lines give the parts:

- Adam: the forward and backward passes plus Adam's update (the first-order loop's step);
- K-FAC, preconditioning only: factors and inverses frozen after the warm-up
  (``factor_every`` and ``inv_every`` never due), no step scaling: the hooks' bookkeeping and
  G⁻¹ ∇W A⁻¹ per layer;
- + KL clip: the clip's Δᵀg;
- + quadratic model (``rescale``): one forward-mode replay on ``factor_samples`` samples;
- + factors every step: the curvature backward pass at the end of the forward pass and the
  factor products (A, G and their running averages);
- + inverses every step: the damped Cholesky inverses (amortised over ``inv_every`` steps
  in a run).

K-FAC runs with lr 1e-3 here: a step's cost does not depend on its length, and a run that
diverged would skip its non-finite steps and time less than it trains.

    python benchmarks/kfac_step_cost.py --task cnn               # the benchmark CNN, b = 128
    python benchmarks/kfac_step_cost.py --task 1L --batch-size 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_to_accuracy as race  # noqa: E402

from secondorder.optim import KFAC  # noqa: E402

NEVER = 10**9
#: (label, KFAC options) in the order the parts add up
CONFIGS = [
    ("K-FAC, preconditioning only", {"rescale": False, "kl_clip": None, "frozen": True}),
    ("+ KL clip", {"rescale": False, "kl_clip": 1e-2, "frozen": True}),
    ("+ quadratic model (rescale)", {"rescale": True, "kl_clip": 1e-2, "frozen": True}),
    ("+ factors every step", {"rescale": True, "kl_clip": 1e-2, "inv_every": NEVER}),
    ("+ inverses every step", {"rescale": True, "kl_clip": 1e-2, "inv_every": 1}),
]


def timed_steps(make_opt, model_fn, X, y, batch: int, steps: int, warmup: int) -> float:
    """Milliseconds per step over ``steps`` steps after ``warmup`` (the same batches)."""
    model = model_fn()
    opt = make_opt(model)
    n = len(X)
    batches = [torch.arange(i * batch, (i + 1) * batch) % n for i in range(warmup + steps)]
    for k, idx in enumerate(batches):
        if k == warmup:
            if hasattr(opt, "_pre") and getattr(opt, "frozen", False):
                opt._pre.factor_every = NEVER  # the factors and inverses stay as they are
                opt._pre.steps = 1
            t = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    return (time.perf_counter() - t) / steps * 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("1L", "2L", "cnn"), default="cnn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--damping", type=float, default=1e-2)
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.threads < 1:
        ap.error("--batch-size, --steps and --threads must be positive")
    torch.set_num_threads(args.threads)
    problem = race.Problem(race.Settings(task=args.task, threads=args.threads))
    X, y = problem.X, problem.y

    def model_fn():
        model = problem.model()
        torch.nn.utils.vector_to_parameters(problem.theta0.clone(), model.parameters())
        return model

    warmup = 12
    adam = timed_steps(
        lambda m: torch.optim.Adam(m.parameters(), 3e-3),
        model_fn, X, y, args.batch_size, args.steps, warmup,
    )  # fmt: skip
    print(
        f"{args.task}, batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}"
    )
    print("\n| step | ms / step | × Adam | part (ms) |\n|---|---:|---:|---:|")
    print(f"| torch.optim.Adam | {adam:.2f} | 1.00 | — |")
    last = None
    for label, opts in CONFIGS:
        opts = dict(opts)
        frozen = opts.pop("frozen", False)

        def make(m, opts=opts, frozen=frozen):
            # a small step: every step is taken (a diverging run would skip steps and time less)
            opt = KFAC(m, lr=1e-3, damping=args.damping, weight_decay=race.L2 / race.L2_M, **opts)
            opt.frozen = frozen
            return opt

        ms = timed_steps(make, model_fn, X, y, args.batch_size, args.steps, warmup)
        part = "—" if last is None else f"{ms - last:+.2f}"
        print(f"| {label} | {ms:.2f} | {ms / adam:.2f} | {part} |")
        last = ms


if __name__ == "__main__":
    main()
