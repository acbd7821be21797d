"""Time to test accuracy on Fashion-MNIST: our methods against the optimisers users reach for.

The problems: the seed study's 784-300-10 sigmoid MLP (``--task 1L``) or its 784-300-100-10
twin (``2L``), and a small convolutional network (``cnn``: Conv2d 1→16 3×3 padding 1, ReLU,
MaxPool 2, Conv2d 16→32 3×3 padding 1, ReLU, MaxPool 2, Flatten, Linear 1568→10; 20,490
parameters; the 784 pixels reshaped to 1×28×28 inside the network by ``nn.Unflatten``, so
every row sees the same data tensors), on the 60,000 Fashion-MNIST training images, softmax
cross-entropy plus λ/(2m)·‖W‖² (λ = 0.01, m = 60,000, on weights and kernels, biases not
penalised), float32, every row from the same initial weights (the MLPs' from
``secondorder.models.mlp``, the CNN's PyTorch's default initialisation under the seed).
Targets: 85% and 88% test accuracy for the MLPs, 90% and 91% for the CNN. Each row runs until
its wall-clock budget (``--budget`` seconds; default 60 for the MLPs, 300 for the CNN) is
spent or the last target is reached; every N steps (N per row, twice that on the CNN) it
pauses the clock and measures the test accuracy on the 10,000 test images and the training
objective (on all training images for the MLPs, on the first 10,000 for the CNN, whose
forward pass costs more; that evaluation is not timed).

    python benchmarks/time_to_accuracy.py                       # 1L and 2L, 60 s a row
    python benchmarks/time_to_accuracy.py --task cnn            # the CNN, 300 s a row
    python benchmarks/time_to_accuracy.py --task all            # 1L, 2L and the CNN
    python benchmarks/time_to_accuracy.py --quick               # a smoke test (about a minute)
    python benchmarks/time_to_accuracy.py --task 1L --rows lbfgs,torch-adam --budget 120
    python benchmarks/time_to_accuracy.py --resume              # skip rows already measured
    python benchmarks/time_to_accuracy.py --widths 300,1000,3000   # seconds per epoch by width

Columns: wall time and epochs to the two targets (— when not reached), the best test accuracy
within the budget, evaluations (f and ∇f evaluations, plus curvature products, for full-batch
rows; epochs for mini-batch rows), the extra peak memory of the row (each row runs in a fresh
subprocess: the rise of its maximum RSS over its state after loading the data and building
the problem, or ``torch.cuda.max_memory_allocated`` above the start on CUDA), and seconds per
epoch. An epoch is a pass over the training images through value/gradient evaluations (a
full-batch evaluation is one, a mini-batch step b/m); curvature products (Newton-CG's
Gauss–Newton products on its subsample, K-FAC's factors) are not counted in it but are in the
time.

Rows (the table ``ROWS``; one entry each, options and sweep grids editable there; ``tasks``
says where a row runs unless ``--rows`` names it). Other people's optimisers, each in a plain
loop on shuffled mini-batches of ``--batch-size`` with its learning rate (and, for K-FAC, its
damping) chosen by a recorded sweep, every other option its library's default unless stated:
torch.optim.Adam, AdamW (decoupled weight decay 0.01, its default) and SGD (Nesterov, momentum
0.9); torch.optim.Muon on the weight matrices and the convolution kernels (each kernel seen as
its out_channels × (in_channels·kh·kw) matrix, as Muon's authors flatten them; torch's Muon
takes 2-D tensors only, so it updates 2-D views sharing the kernels' storage) with
torch.optim.AdamW (lr 1e-3) on the biases; pytorch-optimizer's SOAP, Shampoo (preconditioners
recomputed every 10 steps: every step costs a matrix root per dimension) and Kron (PSGD); and
ASDL's K-FAC (``asdl.KfacGradientMaker``, Monte-Carlo Fisher, curvature and inverses every 10
steps, with torch.optim.SGD momentum 0.9, as ASDL's examples train). Full-batch peers (MLPs
only): torch.optim.LBFGS driven by one ``step(closure)`` per iteration and with ``max_iter=20``
per call; scipy's L-BFGS-B (through ``secondorder.scipy_bridge``, on a float64 copy as its
users do); pytorch-minimize's L-BFGS. A peer whose package is missing is skipped with a note.
Ours: through ``secondorder.solvers.minimize``, L-BFGS, NLCG and Newton-CG with Gauss–Newton
products on a 10% curvature subsample (MLPs only), Adam and SGD on mini-batches (the learning
rate the torch.optim sweep chose), K-FAC (Monte-Carlo factors, batches of 1,000; on the CNN
also with ``approximation="reduce"``; EKFAC), Hessian-free, and SQN (MLPs only), where
``minimize`` has those methods; ``secondorder.optim.KFAC`` in a plain loop
(``opt.zero_grad(); F.cross_entropy(model(X), y).backward(); opt.step()``, the L2 term as its
``weight_decay``) with its defaults on batches of 1,000, and on the CNN also with the recipe
for ReLU CNNs (batches of ``--batch-size``, ``kl_clip=1e-2``, ``factor_every=10``,
``rescale=False``, damping swept); and ``secondorder.optim.KFACPreconditioner`` with
torch.optim.SGD (``loss.backward(); precond.step(); sgd.step()``).

``--seeds N`` reruns the headline rows — the best peer and our best, by time to the last
target — with N − 1 further seeds and prints the median time to each target with its spread
and a verdict only where the spreads do not overlap.

Output (``--out``, default benchmarks/results/time_to_accuracy): ``<task>.json`` with every
row's checkpoint curve and the sweeps, written after each row (``--resume`` reuses rows and
sweeps measured with the same settings), ``accuracy_time_<task>.png`` and
``accuracy_epochs_<task>.png``, and for ``--widths`` ``widths_<task>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

L2, L2_M = 0.01, 60_000
#: the hidden widths of each task (the CNN has none: its layers are fixed, see ``cnn``)
TASKS: dict[str, tuple[int, ...]] = {"1L": (300,), "2L": (300, 100), "cnn": ()}
MLP_TASKS = ("1L", "2L")
TARGETS = (0.85, 0.88)
TASK_TARGETS: dict[str, tuple[float, ...]] = {"1L": TARGETS, "2L": TARGETS, "cnn": (0.90, 0.91)}
#: default seconds a row and a sweep candidate, by task
TASK_BUDGETS: dict[str, tuple[float, float]] = {
    "1L": (60.0, 15.0),
    "2L": (60.0, 15.0),
    "cnn": (300.0, 60.0),
}
#: checkpoints on the CNN come every this many times a row's interval (its evaluation is dear)
TASK_EVERY: dict[str, int] = {"cnn": 2}
#: the CNN's training objective at checkpoints: on this many training images (all for the MLPs)
CNN_LOSS_SAMPLES = 10_000
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "time_to_accuracy"
#: a row option with this value takes ``--batch-size``
BATCH = "--batch-size"


# -- settings --------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything a measurement depends on (a stored row is reused only when these match)."""

    task: str = "1L"
    budget: float = 60.0
    sweep_budget: float = 15.0
    sweep_candidates: int | None = None  # None: every candidate of a row's sweep
    n_train: int | None = None  # None: all training images
    n_test: int | None = None
    device: str = "cpu"
    threads: int = 0
    batch_size: int = 128
    seed: int = 0
    targets: tuple[float, ...] | None = None  # None: the task's (TASK_TARGETS)
    data: str = "fashion-mnist"  # or "synthetic" (tests: blobs, no files needed)
    hidden: tuple[int, ...] | None = None  # None: the task's widths

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = TASK_TARGETS[self.task]
        self.targets = tuple(self.targets)

    def key(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["hidden"] = list(self.widths)
        return d

    @property
    def widths(self) -> tuple[int, ...]:
        return self.hidden if self.hidden is not None else TASKS[self.task]


def describe(task: str, widths) -> str:
    """The network in words, for headings and figure titles."""
    if task == "cnn":
        return "CNN conv 16, conv 32, linear 1568-10 (ReLU, max-pool)"
    return "-".join(map(str, [784, *widths, 10])) + " sigmoid"


# -- the problem -----------------------------------------------------------------------------------


def synthetic_splits(n_train: int, n_test: int, seed: int = 0):
    """Ten Gaussian blobs in 784 dimensions (pixels-like values): a stand-in for tests."""
    from secondorder.data.dataset import Dataset, Splits

    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.0, 1.0, size=(10, 784))

    def draw(n: int) -> Dataset:
        y = rng.integers(0, 10, size=n)
        X = centres[y] + 1.5 * rng.standard_normal((n, 784))
        return Dataset(torch.tensor(X, dtype=torch.float32), torch.tensor(y), 10, "blobs")

    return Splits(draw(n_train), None, draw(n_test))


def _l2_penalty(model: nn.Module) -> torch.Tensor:
    return sum((p**2).sum() for n, p in model.named_parameters() if n.endswith("weight"))


def torch_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The objective as a user writes it: mean cross-entropy + λ/(2m)·‖W‖²."""
    return nn.functional.cross_entropy(model(X), y) + L2 / (2 * L2_M) * _l2_penalty(model)


def cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The CNN task's network on flat 784-pixel rows (``secondorder.models.cnn``'s defaults),
    PyTorch's default initialisation drawn under ``seed``."""
    from secondorder.models import cnn as small_cnn

    return small_cnn(seed=seed, dtype=dtype)


class Problem:
    """The data on the device, the initial weights, and the (untimed) checkpoint evaluation."""

    def __init__(self, s: Settings) -> None:
        from secondorder.data import load_fashion_mnist

        self.settings, self.device = s, torch.device(s.device)
        if s.data == "synthetic":
            data = synthetic_splits(s.n_train or 600, s.n_test or 200, s.seed)
        else:
            data = load_fashion_mnist(dtype=torch.float32, progress=False)
        n, nt = s.n_train or len(data.train), s.n_test or len(data.test)
        self.X, self.y = (t[:n].to(self.device) for t in (data.train.X, data.train.y))
        self.X_test, self.y_test = (t[:nt].to(self.device) for t in (data.test.X, data.test.y))
        self.m = len(self.X)
        self.sizes = [self.X.shape[1], *s.widths, 10]
        self.conv = s.task == "cnn"
        # the CNN: checkpoints evaluate in chunks, the objective on the first 10,000 images
        self.chunk = 1000 if self.conv else None
        self.n_loss = min(self.m, CNN_LOSS_SAMPLES) if self.conv else self.m
        self._eval_model = self.model()
        self.theta0 = nn.utils.parameters_to_vector(self._eval_model.parameters()).detach().clone()
        # one-time costs (first autograd pass, kernel set-up) before any clock starts
        warm = self.model()
        torch_loss(warm, self.X[:128], self.y[:128]).backward()
        self.evaluate(self.theta0)

    def model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The network with the common initial weights."""
        from secondorder.models import mlp

        if self.conv:
            return cnn(self.settings.seed, dtype).to(self.device)
        return mlp(self.sizes, "sigmoid", seed=self.settings.seed, dtype=dtype).to(self.device)

    def objective(
        self,
        batch_size: int | None = None,
        curvature_fraction: float | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        """Our ModelObjective: full batch, or one mini-batch per iteration, epoch by epoch."""
        from secondorder.objective import ModelObjective
        from secondorder.sampling import make_sampler

        sampler = curvature = None
        seed = self.settings.seed
        if batch_size is not None:
            b = min(batch_size, self.m)
            sampler = make_sampler("epoch", self.m, batch_size=b, seed=seed)
        if curvature_fraction is not None:
            size = max(1, min(self.m, round(curvature_fraction * self.m)))
            curvature = make_sampler("subsample", self.m, size=size, seed=seed)
        X = self.X.to(dtype)
        return ModelObjective(
            self.model(dtype),
            "cross_entropy",
            (X, self.y),
            l2=L2,
            l2_convention="per-sample",
            l2_m=L2_M,
            sampler=sampler,
            curvature_sampler=curvature,
        )

    def _outputs(self, model: nn.Module, X: torch.Tensor) -> torch.Tensor:
        if self.chunk is None:
            return model(X)
        return torch.cat([model(part) for part in X.split(self.chunk)])

    def evaluate(self, theta: torch.Tensor) -> tuple[float, float]:
        """(test accuracy, training objective) at θ."""
        model = self._eval_model
        with torch.no_grad():
            nn.utils.vector_to_parameters(
                theta.detach().to(self.device, torch.float32), model.parameters()
            )
            out = self._outputs(model, self.X_test)
            acc = float((out.argmax(1) == self.y_test).double().mean())
            if self.chunk is None:
                loss = float(torch_loss(model, self.X, self.y))
            else:
                X, y = self.X[: self.n_loss], self.y[: self.n_loss]
                ce = nn.functional.cross_entropy(self._outputs(model, X), y)
                loss = float(ce + L2 / (2 * L2_M) * _l2_penalty(model))
        return acc, loss


# -- the clock and the checkpoints -----------------------------------------------------------------


class Clock:
    """Wall time since ``start`` less the paused (checkpoint) intervals."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.t0 = time.perf_counter()
        self.excluded = 0.0

    def start(self) -> None:
        self.sync()
        self.t0, self.excluded = time.perf_counter(), 0.0

    def now(self, sync: bool = True) -> float:
        if sync:
            self.sync()
        return time.perf_counter() - self.t0 - self.excluded

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.excluded += time.perf_counter() - t


class Recorder:
    """Checkpoints of one row: every ``every`` steps, at the budget, and at the end.

    ``step`` returns True when the row must stop: the budget is spent, the last target is
    reached, ``max_epochs`` epochs are done (when given: tests), or the training objective is
    no longer finite.
    """

    def __init__(
        self,
        problem: Problem,
        budget: float,
        every: int,
        targets=TARGETS,
        stop_at_target: bool = True,
        max_epochs: float | None = None,
    ) -> None:
        self.problem, self.budget, self.every = problem, budget, max(1, int(every))
        self.targets, self.stop_at_target = tuple(targets), stop_at_target
        self.max_epochs = max_epochs
        self.clock = Clock(problem.device)
        self.curve: list[dict] = []
        self.steps = 0
        self.status = "running"
        self.last: dict = {}

    def start(self, theta: torch.Tensor, epochs: float = 0.0, evals: dict | None = None) -> None:
        self.clock.start()
        self.checkpoint(theta, epochs, evals or {})

    def checkpoint(self, theta: torch.Tensor, epochs: float, evals: dict) -> None:
        t = self.clock.now()
        with self.clock.paused():
            acc, loss = self.problem.evaluate(theta)
            point = {
                "step": self.steps,
                "time": t,
                "epochs": float(epochs),
                "accuracy": acc,
                "loss": loss,
                **evals,
            }
            if self.curve and self.curve[-1]["step"] == self.steps:
                self.curve[-1] = point
            else:
                self.curve.append(point)
            if not math.isfinite(loss):
                self.status = "diverged"
            elif self.stop_at_target and acc >= max(self.targets):
                self.status = "target"
            elif t >= self.budget:
                self.status = "budget"
            elif self.max_epochs is not None and epochs >= self.max_epochs:
                self.status = "epochs"

    def step(self, theta_fn: Callable[[], torch.Tensor], epochs: float, evals: dict) -> bool:
        """After a step: a checkpoint when due; True when the row must stop."""
        self.steps += 1
        self.last = {"theta_fn": theta_fn, "epochs": epochs, "evals": evals}
        over = self.clock.now(sync=False) >= self.budget
        if self.max_epochs is not None and epochs >= self.max_epochs:
            over = True
        if over or self.steps % self.every == 0:
            self.checkpoint(theta_fn(), epochs, evals)
        return self.status != "running"

    def finish(self, status: str | None = None) -> None:
        """The last point, when the row ended between checkpoints (e.g. its solver stopped)."""
        if self.last and self.curve[-1]["step"] != self.steps:
            self.checkpoint(self.last["theta_fn"](), self.last["epochs"], self.last["evals"])
        if self.status == "running":
            self.status = status or "stopped"


# -- the rows' runners -----------------------------------------------------------------------------


class MuonWithAdamW:
    """torch.optim.Muon on every weight matrix and convolution kernel, torch.optim.AdamW on the
    rest (the biases), as one optimiser with ``zero_grad`` and ``step``.

    torch's Muon takes 2-D tensors only: a kernel (out, in, kh, kw) is handed to it as a 2-D view
    (out, in·kh·kw) of the same storage, its gradient viewed the same way before each step, so
    Muon orthogonalises the flattened kernel and updates the kernel in place.
    """

    def __init__(self, model: nn.Module, lr: float, adamw_lr: float = 1e-3, **muon_options) -> None:
        self.model = model
        weights = [p for p in model.parameters() if p.ndim >= 2]
        self.views = [(p, p if p.ndim == 2 else p.detach().view(p.shape[0], -1)) for p in weights]
        self.muon = torch.optim.Muon([v for _, v in self.views], lr=lr, **muon_options)
        rest = [p for p in model.parameters() if p.ndim < 2]
        self.adamw = torch.optim.AdamW(rest, lr=adamw_lr) if rest else None

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)
        for p, v in self.views:
            if v is not p:
                v.grad = None

    def step(self) -> None:
        for p, v in self.views:
            if v is not p and p.grad is not None:
                v.grad = p.grad.view(v.shape)
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()


class PreconditionedSGD:
    """``secondorder.optim.KFACPreconditioner`` with torch.optim.SGD: ``loss.backward();
    precond.step(); sgd.step()``."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.9,
        **precond_options,
    ) -> None:
        from secondorder.optim import KFACPreconditioner

        self.precond = KFACPreconditioner(model, **precond_options)
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def zero_grad(self) -> None:
        self.sgd.zero_grad()

    def step(self) -> None:
        self.precond.step()
        self.sgd.step()


def make_optimizer(name: str, model: nn.Module, lr: float, **kwargs):
    """The optimiser a row names: ``torch.optim.<Name>``, ``"Muon"`` (``MuonWithAdamW``),
    ``"pytorch_optimizer.<Name>"``, ``"secondorder.KFAC"`` or ``"secondorder.KFACPreconditioner"``
    (with SGD, ``PreconditionedSGD``)."""
    if name == "Muon":
        return MuonWithAdamW(model, lr, **kwargs)
    if name == "secondorder.KFAC":
        from secondorder.optim import KFAC

        return KFAC(model, lr=lr, **kwargs)
    if name == "secondorder.KFACPreconditioner":
        return PreconditionedSGD(model, lr, **kwargs)
    if name.startswith("pytorch_optimizer."):
        import pytorch_optimizer

        return getattr(pytorch_optimizer, name.split(".", 1)[1])(
            model.parameters(), lr=lr, **kwargs
        )
    return getattr(torch.optim, name)(model.parameters(), lr=lr, **kwargs)


def _batches(problem: Problem, batch_size: int) -> Iterator[torch.Tensor]:
    """Indices of shuffled mini-batches, epoch after epoch (the same for every row)."""
    gen = torch.Generator().manual_seed(problem.settings.seed)
    m, b = problem.m, min(batch_size, problem.m)
    while True:
        perm = torch.randperm(m, generator=gen).to(problem.device)
        yield from perm.split(b)


def run_torch_minibatch(
    problem: Problem,
    rec: Recorder,
    optimizer: str,
    lr: float,
    batch_size: int,
    l2: str = "loss",
    **kwargs,
) -> str:
    """A plain training loop: shuffled mini-batches, ``zero_grad``, loss, backward, step.

    ``l2="loss"``: the loss is the objective (cross-entropy + λ/(2m)·‖W‖²); ``"weight_decay"``:
    the loss is the plain cross-entropy and the optimiser's ``weight_decay`` is λ/m (the same
    objective, its L2 term applied by the optimiser, as ``secondorder.optim.KFAC``'s users do).
    """
    model = problem.model()
    nn.utils.vector_to_parameters(problem.theta0.clone(), model.parameters())
    if l2 == "weight_decay":
        kwargs["weight_decay"] = L2 / L2_M
    opt = make_optimizer(optimizer, model, lr, **kwargs)
    m, seen = problem.m, 0
    theta = lambda: nn.utils.parameters_to_vector(model.parameters())  # noqa: E731
    rec.start(theta())
    for idx in _batches(problem, batch_size):
        X, y = problem.X[idx], problem.y[idx]
        opt.zero_grad()
        if l2 == "weight_decay":
            loss = nn.functional.cross_entropy(model(X), y)
        else:
            loss = torch_loss(model, X, y)
        loss.backward()
        opt.step()
        seen += len(idx)
        if rec.step(theta, seen / m, {"steps": rec.steps + 1}):
            return ""
    return ""


def run_asdl(
    problem: Problem,
    rec: Recorder,
    lr: float,
    batch_size: int,
    damping: float = 1e-3,
    momentum: float = 0.9,
    interval: int = 10,
    grad_maker: str = "KfacGradientMaker",
    **config,
) -> str:
    """ASDL's way: a ``GradientMaker`` computes the preconditioned gradient and any torch.optim
    optimiser (here SGD with momentum) steps; the curvature and its inverse are refreshed every
    ``interval`` steps. ASDL evaluates the loss with ``reduction="sum"`` on curvature steps and
    divides by the batch size, so the loss function takes ``reduction``."""
    import asdl

    model = problem.model()
    nn.utils.vector_to_parameters(problem.theta0.clone(), model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    cfg = asdl.PreconditioningConfig(
        data_size=batch_size,
        damping=damping,
        preconditioner_upd_interval=interval,
        curvature_upd_interval=interval,
        **config,
    )
    maker = getattr(asdl, grad_maker)(model, cfg)
    coef = L2 / (2 * L2_M)

    def loss_fn(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        ce = nn.functional.cross_entropy(out, y, reduction=reduction)
        return ce + (len(y) if reduction == "sum" else 1.0) * coef * _l2_penalty(model)

    m, seen = problem.m, 0
    theta = lambda: nn.utils.parameters_to_vector(model.parameters())  # noqa: E731
    rec.start(theta())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its module hooks' deprecation notices
        for idx in _batches(problem, batch_size):
            cfg.data_size = len(idx)
            opt.zero_grad(set_to_none=True)
            out = maker.setup_model_call(model, problem.X[idx])
            maker.setup_loss_call(loss_fn, out, problem.y[idx])
            maker.forward_and_backward()
            opt.step()
            seen += len(idx)
            if rec.step(theta, seen / m, {"steps": rec.steps + 1}):
                return ""
    return ""


def run_torch_lbfgs(problem: Problem, rec: Recorder, max_iter: int = 1, **kwargs) -> str:
    """torch.optim.LBFGS on the full batch, one ``step(closure)`` per checkpoint step."""
    model = problem.model()
    nn.utils.vector_to_parameters(problem.theta0.clone(), model.parameters())
    opt = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, **kwargs)
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        opt.zero_grad()
        loss = torch_loss(model, problem.X, problem.y)
        loss.backward()
        return loss

    theta = lambda: nn.utils.parameters_to_vector(model.parameters())  # noqa: E731
    rec.start(theta())
    while True:
        opt.step(closure)
        if rec.step(theta, evals, {"nfev": evals}):
            return ""


def run_scipy(
    problem: Problem, rec: Recorder, method: str = "L-BFGS-B", dtype: str = "float64", **options
) -> str:
    """scipy.optimize.minimize through ``secondorder.scipy_bridge``; stopped by the callback."""
    from secondorder.scipy_bridge import scipy_minimize

    objective = problem.objective(dtype=getattr(torch, dtype))
    started = False

    def callback(info: dict) -> bool:
        nonlocal started
        evals = {"nfev": info["nfev"]}
        if not started:  # the bridge's row 0: the start, already evaluated
            started = True
            rec.checkpoint(info["theta"], info["nfev"], evals)
            return False
        return rec.step(lambda: info["theta"], info["nfev"], evals)

    rec.clock.start()
    res = scipy_minimize(
        objective, problem.theta0.to(getattr(torch, dtype)), method, callback=callback, **options
    )
    rec.finish(res.status)
    return res.message


def _functional_loss(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    """θ ↦ loss through ``torch.func.functional_call``: how a torchmin user writes it."""
    model = problem.model()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        out = torch.func.functional_call(model, params, (problem.X,))
        w2 = sum((params[n] ** 2).sum() for n in names if n.endswith("weight"))
        return nn.functional.cross_entropy(out, problem.y) + L2 / (2 * L2_M) * w2

    return f


def run_torchmin(problem: Problem, rec: Recorder, method: str = "l-bfgs", **options) -> str:
    """pytorch-minimize's ``minimize`` on the full batch; its callback stops it."""
    import torchmin

    loss, evals = _functional_loss(problem), 0

    def fun(theta: torch.Tensor) -> torch.Tensor:
        nonlocal evals
        evals += 1
        return loss(theta)

    def callback(x: torch.Tensor) -> bool:
        return rec.step(lambda: x, evals, {"nfev": evals})

    rec.start(problem.theta0)
    res = torchmin.minimize(
        fun,
        problem.theta0.clone(),
        method=method,
        max_iter=10**9,
        options=options,
        callback=callback,
    )
    rec.finish("stopped")
    return str(getattr(res, "message", ""))


def run_ours(
    problem: Problem,
    rec: Recorder,
    method: str,
    batch_size: int | None = None,
    curvature_fraction: float | None = None,
    **options,
) -> str:
    """``secondorder.solvers.minimize``; the callback checkpoints and stops it."""
    from secondorder.solvers import minimize

    objective = problem.objective(batch_size, curvature_fraction)
    per_eval = min(batch_size, problem.m) / problem.m if batch_size else 1.0

    def callback(info: dict) -> bool:
        evals = {"nfev": info["nfev"], "nhev": info.get("nhev", 0)}
        epochs = info["nfev"] * per_eval
        if info["k"] == 0:
            rec.checkpoint(info["theta"], epochs, evals)
            return False
        return rec.step(lambda: info["theta"], epochs, evals)

    options.setdefault("gtol", None)
    rec.clock.start()
    res = minimize(
        objective, problem.theta0.clone(), method, max_iter=10**9, callback=callback, **options
    )
    rec.finish(res.status)
    return res.message


# -- the rows --------------------------------------------------------------------------------------


def _needs_module(module: str, install: str) -> Callable[[], str | None]:
    """A note when ``module`` cannot be imported (the row is then skipped)."""

    def check() -> str | None:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed ({install})"
        return None

    return check


_needs_torchmin = _needs_module("torchmin", "pip install --no-deps pytorch-minimize")
_needs_pytorch_optimizer = _needs_module("pytorch_optimizer", "pip install pytorch-optimizer")
_needs_asdl = _needs_module("asdl", "pip install asdfghjkl")


def _needs_muon() -> str | None:
    return None if hasattr(torch.optim, "Muon") else "this torch has no torch.optim.Muon"


def _needs_method(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        from secondorder.solvers.registry import REGISTRY

        return None if name in REGISTRY else f"minimize has no method {name!r} yet"

    return check


ALL_TASKS = tuple(TASKS)
#: a sweep's candidate: (learning rate, damping), None where the row's own option stays
Candidate = tuple[float | None, float | None]


@dataclass(frozen=True)
class RowSpec:
    """One row: its runner and options, checkpoint interval and, for a fixed step, the sweep."""

    name: str  # for --rows and the JSON
    label: str  # for the table and the legends
    run: Callable[..., str]
    opts: dict = field(default_factory=dict)
    every: int = 5  # checkpoint every this many steps (iterations, mini-batches, step() calls)
    sweep: tuple[float, ...] = ()  # learning rates tried, the best by time to the first target
    sweep_damping: tuple[float, ...] = ()  # damping values tried, every pair with the lrs
    #: per task, (learning rates, damping values) in place of the two above
    task_sweeps: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(
        default_factory=dict
    )
    lr_from: str | None = None  # take the lr another row's sweep chose, when it has one
    needs: Callable[[], str | None] | None = None  # a note why the row cannot run, or None
    reference: bool = False  # someone else's optimiser (dashed in the figures)
    tasks: tuple[str, ...] = ALL_TASKS  # where it runs unless --rows names it

    @property
    def minibatch(self) -> bool:
        return self.opts.get("batch_size") is not None

    def grid(self, task: str) -> list[Candidate]:
        """The sweep's candidates on ``task``: every (lr, damping) pair, lr first."""
        lrs, dampings = self.task_sweeps.get(task, (self.sweep, self.sweep_damping))
        if not lrs and not dampings:
            return []
        return list(itertools.product(lrs or (None,), dampings or (None,)))

    def every_on(self, task: str) -> int:
        return self.every * TASK_EVERY.get(task, 1)


_FULL = {"gtol": None}
_MLP = MLP_TASKS
_LBFGS_TORCH = {
    "history_size": 10,
    "line_search_fn": "strong_wolfe",
    "tolerance_grad": 0.0,
    "tolerance_change": 0.0,
}
_KFAC_OURS = {
    "method": "kfac",
    "kind": "mc",
    "batch_size": 1000,
    "factor_samples": 250,
    "damping": 1e-4,
    "inv_every": 10,
    "line_search": None,
    "lr": 1.0,
}
#: secondorder.optim.KFAC in the plain loop: its L2 term as weight decay, its default step length
_KFAC_LOOP = {"optimizer": "secondorder.KFAC", "l2": "weight_decay", "lr": 1.0}
#: the damping of minimize's K-FAC rows: tried on every task (1e-4 was the MLPs' setting)
_KFAC_DAMPING = (1e-4, 1e-3, 1e-2, 1e-1)
#: the damping of the K-FAC rows in training loops (ASDL's and ours), the same grids for each:
#: the MLPs', and the CNN's (whose K-FAC steps diverge below 1e-2)
_LOOP_DAMPING = (1e-3, 1e-2, 1e-1)
_LOOP_DAMPING_CNN = (1e-2, 1e-1, 1.0)
#: the learning rates of the K-FAC rows with SGD (momentum 0.9): ASDL's and our preconditioner
_SGD_KFAC_LR, _SGD_KFAC_LR_CNN = (0.01, 0.03, 0.1), (0.003, 0.01, 0.03)
ROWS: list[RowSpec] = [
    # -- other people's optimisers -----------------------------------------------------------
    RowSpec(
        "torch-adam",
        "torch.optim.Adam",
        run_torch_minibatch,
        {"optimizer": "Adam", "batch_size": BATCH},
        every=50,
        sweep=(1e-3, 3e-3, 1e-2),
        reference=True,
    ),
    RowSpec(
        "torch-adamw",
        "torch.optim.AdamW (weight decay 0.01)",
        run_torch_minibatch,
        {"optimizer": "AdamW", "batch_size": BATCH},
        every=50,
        sweep=(1e-3, 3e-3, 1e-2),
        reference=True,
    ),
    RowSpec(
        "torch-sgd",
        "torch.optim.SGD (Nesterov 0.9)",
        run_torch_minibatch,
        {"optimizer": "SGD", "momentum": 0.9, "nesterov": True, "batch_size": BATCH},
        every=50,
        sweep=(0.03, 0.1, 0.3),
        task_sweeps={"cnn": ((0.01, 0.03, 0.1), ())},
        reference=True,
    ),
    RowSpec(
        "torch-muon",
        "torch.optim.Muon (weights, kernels flattened) + AdamW",
        run_torch_minibatch,
        {"optimizer": "Muon", "batch_size": BATCH},
        every=50,
        sweep=(0.005, 0.02, 0.05),
        needs=_needs_muon,
        reference=True,
    ),
    RowSpec(
        "soap",
        "pytorch-optimizer SOAP",
        run_torch_minibatch,
        {"optimizer": "pytorch_optimizer.SOAP", "batch_size": BATCH},
        every=50,
        sweep=(1e-3, 3e-3, 1e-2),
        needs=_needs_pytorch_optimizer,
        reference=True,
    ),
    RowSpec(
        "shampoo",
        "pytorch-optimizer Shampoo (roots every 10 steps)",
        run_torch_minibatch,
        {
            "optimizer": "pytorch_optimizer.Shampoo",
            "preconditioning_compute_steps": 10,
            "batch_size": BATCH,
        },
        every=50,
        sweep=(1e-3, 3e-3, 1e-2, 3e-2),
        needs=_needs_pytorch_optimizer,
        reference=True,
    ),
    RowSpec(
        "kron",
        "pytorch-optimizer Kron (PSGD)",
        run_torch_minibatch,
        {"optimizer": "pytorch_optimizer.Kron", "batch_size": BATCH},
        every=50,
        sweep=(1e-3, 3e-3, 1e-2, 3e-2),
        needs=_needs_pytorch_optimizer,
        reference=True,
    ),
    RowSpec(
        "asdl-kfac",
        "ASDL K-FAC + SGD (momentum 0.9)",
        run_asdl,
        {"grad_maker": "KfacGradientMaker", "interval": 10, "batch_size": BATCH},
        every=50,
        sweep=_SGD_KFAC_LR,
        sweep_damping=_LOOP_DAMPING,
        task_sweeps={"cnn": (_SGD_KFAC_LR_CNN, _LOOP_DAMPING_CNN)},
        needs=_needs_asdl,
        reference=True,
    ),
    RowSpec(
        "torch-lbfgs",
        "torch.optim.LBFGS, step() per iteration",
        run_torch_lbfgs,
        {"max_iter": 1, **_LBFGS_TORCH},
        every=5,
        reference=True,
        tasks=_MLP,
    ),
    RowSpec(
        "torch-lbfgs-20",
        "torch.optim.LBFGS, max_iter=20 per step()",
        run_torch_lbfgs,
        {"max_iter": 20, **_LBFGS_TORCH},
        every=1,
        reference=True,
        tasks=_MLP,
    ),
    RowSpec(
        "scipy-lbfgsb",
        "scipy L-BFGS-B (float64)",
        run_scipy,
        {
            "method": "L-BFGS-B",
            "dtype": "float64",
            "maxcor": 10,
            "maxiter": 10**9,
            "maxfun": 10**9,
            "gtol": 0.0,
            "ftol": 0.0,
        },
        every=5,
        reference=True,
        tasks=_MLP,
    ),
    RowSpec(
        "torchmin-lbfgs",
        "pytorch-minimize L-BFGS",
        run_torchmin,
        {
            "method": "l-bfgs",
            "history_size": 10,
            "line_search": "strong-wolfe",
            "gtol": 0.0,
            "xtol": 0.0,
        },
        every=5,
        needs=_needs_torchmin,
        reference=True,
        tasks=_MLP,
    ),
    # -- ours ----------------------------------------------------------------------------------
    RowSpec(
        "lbfgs",
        "secondorder L-BFGS (m = 10)",
        run_ours,
        {"method": "lbfgs", "memory": 10, **_FULL},
        every=5,
        tasks=_MLP,
    ),
    RowSpec(
        "nlcg",
        "secondorder NLCG (PR+)",
        run_ours,
        {"method": "nlcg", "variant": "pr+", **_FULL},
        every=5,
        tasks=_MLP,
    ),
    RowSpec(
        "newton-cg",
        "secondorder Newton-CG (Gauss–Newton, 10% subsample)",
        run_ours,
        {
            "method": "newton-cg",
            "curvature": "ggn",
            "curvature_fraction": 0.1,
            "cg_max_iter": 50,
            **_FULL,
        },
        every=1,
        tasks=_MLP,
    ),
    RowSpec(
        "adam",
        "secondorder Adam",
        run_ours,
        {"method": "adam", "batch_size": BATCH},
        every=50,
        sweep=(1e-3, 3e-3, 1e-2),
        lr_from="torch-adam",
    ),
    RowSpec(
        "sgd",
        "secondorder SGD (Nesterov 0.9)",
        run_ours,
        {"method": "sgd", "momentum": 0.9, "nesterov": True, "batch_size": BATCH},
        every=50,
        sweep=(0.03, 0.1, 0.3),
        task_sweeps={"cnn": ((0.01, 0.03, 0.1), ())},
        lr_from="torch-sgd",
    ),
    RowSpec(
        "kfac",
        "secondorder K-FAC (MC, b = 1000)",
        run_ours,
        _KFAC_OURS,
        every=5,
        sweep_damping=_KFAC_DAMPING,
    ),
    RowSpec(
        "kfac-reduce",
        "secondorder K-FAC (MC, b = 1000, conv reduce)",
        run_ours,
        {**_KFAC_OURS, "approximation": "reduce"},
        every=5,
        sweep_damping=_KFAC_DAMPING,
        tasks=("cnn",),
    ),
    RowSpec(
        "ekfac",
        "secondorder EKFAC (MC, b = 1000)",
        run_ours,
        {**_KFAC_OURS, "ekfac": True},
        every=5,
        sweep_damping=_KFAC_DAMPING,
    ),
    RowSpec(
        "kfac-optim",
        "secondorder.optim.KFAC, defaults (plain loop, b = 1000)",
        run_torch_minibatch,
        {**_KFAC_LOOP, "batch_size": 1000},
        every=5,
    ),
    RowSpec(
        "kfac-optim-cnn",
        "secondorder.optim.KFAC, CNN recipe (b = 128, kl_clip 1e-2, factor_every 10)",
        run_torch_minibatch,
        {**_KFAC_LOOP, "batch_size": BATCH, "kl_clip": 1e-2, "factor_every": 10, "rescale": False},
        every=50,
        sweep_damping=(3e-3, 1e-2, 3e-2),
        tasks=("cnn",),
    ),
    RowSpec(
        "kfac-precond",
        "secondorder KFACPreconditioner + SGD (momentum 0.9)",
        run_torch_minibatch,
        {"optimizer": "secondorder.KFACPreconditioner", "batch_size": BATCH},
        every=50,
        sweep=_SGD_KFAC_LR,
        sweep_damping=_LOOP_DAMPING,
        task_sweeps={"cnn": (_SGD_KFAC_LR_CNN, _LOOP_DAMPING_CNN)},
    ),
    RowSpec(
        "hessian-free",
        "secondorder Hessian-free (b = 6000, curvature 1000)",
        run_ours,
        {
            "method": "hessian-free",
            "batch_size": 6000,
            "curvature_fraction": 1 / 60,
            "max_cg": 50,
            **_FULL,
        },
        every=1,
        needs=_needs_method("hessian-free"),
    ),
    RowSpec(
        "sqn",
        "secondorder SQN (b = 1000, curvature 1000)",
        run_ours,
        {"method": "sqn", "batch_size": 1000, "curvature_fraction": 1 / 60, "lr": 0.5},
        every=20,
        needs=_needs_method("sqn"),
        tasks=_MLP,
    ),
]


def row_by_name(name: str) -> RowSpec:
    for r in ROWS:
        if r.name == name:
            return r
    raise ValueError(f"unknown row {name!r}; rows: {', '.join(r.name for r in ROWS)}")


def rows_of(task: str) -> list[str]:
    """The rows that run on ``task`` when ``--rows`` is not given."""
    return [r.name for r in ROWS if task in r.tasks]


def resolved_opts(
    row: RowSpec, s: Settings, lr: float | None, damping: float | None = None
) -> dict:
    """The row's options with ``--batch-size``, the learning rate and the damping filled in."""
    opts = {k: (s.batch_size if v == BATCH else v) for k, v in row.opts.items()}
    if lr is not None:
        opts["lr"] = lr
    if damping is not None:
        opts["damping"] = damping
    return opts


# -- one measurement -------------------------------------------------------------------------------


@dataclass
class Job:
    """One run of one row: what a worker subprocess is told."""

    settings: Settings
    row: str
    lr: float | None
    budget: float
    every: int | None = None  # None: the row's own interval (on this task)
    stop_at_target: bool = True
    damping: float | None = None  # None: the row's own damping, if it has one
    max_epochs: float | None = None  # stop after this many epochs too (tests)

    @property
    def interval(self) -> int:
        return self.every or row_by_name(self.row).every_on(self.settings.task)

    def key(self) -> dict:
        row = row_by_name(self.row)
        opts = resolved_opts(row, self.settings, self.lr, self.damping)
        return {
            "settings": self.settings.key(),
            "opts": _jsonable(opts),
            "budget": self.budget,
            "every": self.interval,
            "stop_at_target": self.stop_at_target,
            **({} if self.max_epochs is None else {"max_epochs": self.max_epochs}),
        }


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _proc_status_kib(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _peak_memory_start(device: torch.device) -> tuple[str, float]:
    """Where the row starts: GPU memory allocated, or the resident set with its peak reset.

    Loading the data peaks above the steady state; on Linux writing 5 to
    /proc/self/clear_refs resets the peak (VmHWM) to the current RSS, so the row's own peak
    is not hidden under the loader's. Elsewhere the rise of ru_maxrss (which may hide it).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda", float(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = _proc_status_kib("VmRSS")
        if rss is not None:
            return "hwm", rss * 1024.0
    except OSError:
        pass
    return "maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # kB (Linux)


def _peak_memory_rise(device: torch.device, start: tuple[str, float]) -> float:
    how, base = start
    if how == "cuda":
        return float(torch.cuda.max_memory_allocated(device)) - base
    if how == "hwm":
        return (_proc_status_kib("VmHWM") or 0.0) * 1024.0 - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - base


_PROBLEMS: dict[str, Problem] = {}


def _problem(s: Settings) -> Problem:
    """The problem of these settings, built once per process (data loading is slow)."""
    key = json.dumps(s.key(), sort_keys=True)
    if key not in _PROBLEMS:
        _PROBLEMS.clear()
        _PROBLEMS[key] = Problem(s)
    return _PROBLEMS[key]


def measure(job: Job, problem: Problem | None = None, isolated: bool = False) -> dict:
    """Run ``job`` here; the record (curve, status, memory when ``isolated``)."""
    s = job.settings
    if s.threads:
        torch.set_num_threads(s.threads)
    problem = problem or _problem(s)
    row = row_by_name(job.row)
    opts = resolved_opts(row, s, job.lr, job.damping)
    mem0 = _peak_memory_start(problem.device) if isolated else None
    rec = Recorder(problem, job.budget, job.interval, s.targets, job.stop_at_target, job.max_epochs)
    t = time.perf_counter()
    try:
        message = row.run(problem, rec, **copy.deepcopy(opts))
        rec.finish()
    except Exception as e:  # a failing row is reported, the benchmark goes on
        # an optimiser that failed on its own non-finite weights diverged
        rec.status = "diverged" if _nonfinite(rec) else "error"
        message = f"{type(e).__name__}: {e}"
    memory = _peak_memory_rise(problem.device, mem0) if isolated else None
    return {
        "row": row.name,
        "label": row.label,
        "lr": job.lr,
        "damping": job.damping,
        "opts": _jsonable(opts),
        "key": job.key(),
        "status": rec.status,
        "message": message,
        "curve": rec.curve,
        "peak_memory_bytes": memory,
        "wall_s": time.perf_counter() - t,
        "summary": summarise(rec.curve, s.targets),
    }


def _nonfinite(rec: Recorder) -> bool:
    """Whether the row's last parameters, or the training objective there, are not finite
    (a last checkpoint is taken there; its loss tells)."""
    if not rec.last:
        return False
    try:
        theta = rec.last["theta_fn"]()
        if not bool(torch.isfinite(theta).all()):
            return True
        rec.checkpoint(theta, rec.last["epochs"], rec.last["evals"])
    except Exception:
        return False
    return rec.status == "diverged"


def measure_in_subprocess(job: Job) -> dict:
    """``measure`` in a fresh interpreter: rows do not share allocator state or peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        jobfile, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        d = asdict(job)
        jobfile.write_text(json.dumps(d))
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(jobfile), str(out)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout)[-2000:]
            return {
                "row": job.row,
                "label": row_by_name(job.row).label,
                "lr": job.lr,
                "damping": job.damping,
                "key": job.key(),
                "status": "error",
                "message": tail,
                "curve": [],
                "peak_memory_bytes": None,
                "summary": summarise([], job.settings.targets),
            }
        return json.loads(out.read_text())


def _worker(jobfile: str, out: str) -> None:
    d = json.loads(Path(jobfile).read_text())
    s = d.pop("settings")
    s["targets"] = tuple(s["targets"])
    s["hidden"] = None if s["hidden"] is None else tuple(s["hidden"])
    job = Job(Settings(**s), **d)
    Path(out).write_text(json.dumps(measure(job, isolated=True)))


def summarise(curve: list[dict], targets=TARGETS) -> dict:
    """Time and epochs to each target (first checkpoint at or above it), best accuracy, …"""
    out: dict = {}
    for tgt in targets:
        hit = next((p for p in curve if p["accuracy"] >= tgt), None)
        out[f"time_to_{tgt:g}"] = None if hit is None else hit["time"]
        out[f"epochs_to_{tgt:g}"] = None if hit is None else hit["epochs"]
    last = curve[-1] if curve else {}
    out["best_accuracy"] = max((p["accuracy"] for p in curve), default=None)
    out["time"], out["epochs"] = last.get("time"), last.get("epochs")
    out["nfev"], out["nhev"], out["steps"] = last.get("nfev"), last.get("nhev"), last.get("step")
    ep = out["epochs"]
    out["seconds_per_epoch"] = out["time"] / ep if ep else None
    return out


# -- sweeps, rows, the results file ----------------------------------------------------------------


class ResultsFileError(ValueError):
    """A results file this script cannot read back (damaged, or not one of its own)."""


def _results_problem(data, row_keys=("key", "curve", "summary", "status", "label")) -> str:
    """Why ``data`` is not a results block of this script ('' when it is one)."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    if not isinstance(data.get("settings"), dict):
        return "no settings"
    for kind, need in (("rows", row_keys), ("sweeps", ("key", "chosen", "candidates"))):
        table = data.get(kind, {})
        if not isinstance(table, dict):
            return f"{kind!r} is not an object"
        for name, rec in table.items():
            if not isinstance(rec, dict) or any(k not in rec for k in need):
                return f"{kind}[{name!r}] lacks {[k for k in need if k not in (rec or {})]}"
    skipped = data.get("skipped", {})
    if not isinstance(skipped, dict) or not all(isinstance(v, str) for v in skipped.values()):
        return "'skipped' is not an object of notes"
    return ""


def read_results(path: Path, kind: str = "results") -> dict | None:
    """The results file at ``path`` (None when there is none), every block checked; a file
    that is not one of this script's is refused naming it, before anything is measured."""
    if not path.exists():
        return None
    where = f"{path}: not a {kind} file of this benchmark"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ResultsFileError(f"{where} ({type(err).__name__}: {err})") from None
    blocks = [data, *(data.get("other_settings", []) if isinstance(data, dict) else [])]
    if isinstance(data, dict) and not isinstance(data.get("other_settings", []), list):
        raise ResultsFileError(f"{where} ('other_settings' is not a list)")
    check = _widths_problem if kind == "widths" else _results_problem
    for block in blocks:
        why = check(block)
        if why:
            raise ResultsFileError(f"{where} ({why}); move it away or choose another --out")
    return data


def _keyed_by_settings(old: dict | None, settings: dict, empty: dict) -> dict:
    """The block of ``settings`` on top (from the file when stored there, else ``empty``),
    with every other settings' block kept under ``other_settings``."""
    blocks = [] if old is None else [old, *old.get("other_settings", [])]
    mine = next((b for b in blocks if b.get("settings") == settings), None)
    others = [
        {k: v for k, v in b.items() if k != "other_settings"} for b in blocks if b is not mine
    ]
    top = dict(empty) if mine is None else {**empty, **mine}
    top["settings"] = settings
    top.pop("other_settings", None)
    if others:
        top["other_settings"] = others
    return top


class Results:
    """``<task>.json``: rows, sweeps and skipped rows of these settings, written after every
    change; the rows of other settings stay in the file, under ``other_settings``."""

    def __init__(self, path: Path, settings: Settings, resume: bool) -> None:
        self.path, self.resume = path, resume
        empty = {"environment": environment(settings), "rows": {}, "sweeps": {}, "skipped": {}}
        self.data = _keyed_by_settings(read_results(path), settings.key(), empty)
        self.data["environment"] = environment(settings)

    def stored(self, kind: str, name: str, key: dict) -> dict | None:
        rec = self.data[kind].get(name)
        return rec if self.resume and rec is not None and rec.get("key") == key else None

    def put(self, kind: str, name: str, record) -> None:
        self.data[kind][name] = record
        if kind != "skipped":
            self.data["skipped"].pop(name, None)
        _write_json(self.path, self.data)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _widths_problem(data) -> str:
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    if not isinstance(data.get("settings"), dict):
        return "no settings"
    cells = data.get("cells", {})
    if not isinstance(cells, dict):
        return "'cells' is not an object"
    for name, cell in cells.items():
        need = ("key", "summary", "status")
        if not isinstance(cell, dict) or any(k not in cell for k in need):
            return f"cells[{name!r}] lacks {[k for k in need if k not in (cell or {})]}"
    return ""


def environment(s: Settings) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": s.threads or torch.get_num_threads(),
        "device": s.device,
    }
    if s.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _sweep_rank(record: dict, targets) -> tuple:
    t = record["summary"].get(f"time_to_{targets[0]:g}")
    best = record["summary"].get("best_accuracy") or 0.0
    return (math.inf if t is None else t, -best)


def _candidate_text(lr: float | None, damping: float | None) -> str:
    parts = ([] if lr is None else [f"lr={lr:g}"]) + (
        [] if damping is None else [f"damping={damping:g}"]
    )
    return " ".join(parts)


def choose_tuning(
    row: RowSpec, s: Settings, results: Results, run: Callable[[Job], dict]
) -> Candidate:
    """The (learning rate, damping) of a tuned row: another row's learning rate, or the best
    candidate of its own sweep (every candidate recorded)."""
    if row.lr_from and row.lr_from in results.data["sweeps"]:
        return results.data["sweeps"][row.lr_from]["chosen"], None
    grid = row.grid(s.task)
    candidates = grid[: s.sweep_candidates] if s.sweep_candidates else grid
    key = {
        "candidates": [lr for lr, _ in candidates],
        "budget": s.sweep_budget,
        "settings": s.key(),
        "opts": _jsonable(resolved_opts(row, s, None)),
    }
    if any(d is not None for _, d in candidates):
        key["dampings"] = [d for _, d in candidates]
    done = results.stored("sweeps", row.name, key)
    if done is not None:
        return done["chosen"], done.get("chosen_damping")
    records = []
    for lr, damping in candidates:
        rec = run(Job(s, row.name, lr, s.sweep_budget, damping=damping))
        records.append(rec)
        print(
            f"    sweep {row.name} {_candidate_text(lr, damping)}: "
            f"{_brief(rec['summary'], s.targets)} ({rec['status']})",
            flush=True,
        )
    best = min(records, key=lambda r: _sweep_rank(r, s.targets))
    sweep = {"key": key, "chosen": best["lr"], "candidates": records}
    if "dampings" in key:
        sweep["chosen_damping"] = best["damping"]
    results.put("sweeps", row.name, sweep)
    chosen = _candidate_text(best["lr"], best.get("damping"))
    print(f"    sweep {row.name}: {chosen} chosen", flush=True)
    return best["lr"], best.get("damping")


def _brief(summary: dict, targets) -> str:
    t = summary.get(f"time_to_{targets[0]:g}")
    best = summary.get("best_accuracy")
    reach = "not reached" if t is None else f"{t:.1f} s"
    return f"{targets[0]:.0%} {reach}, best {best:.4f}" if best is not None else "no result"


def _rank(rec: dict, targets) -> tuple:
    """Faster to the last target, then to the first, then the higher best accuracy first."""
    sm = rec["summary"]
    times = [sm.get(f"time_to_{t:g}") for t in (targets[-1], targets[0])]
    return (*[math.inf if t is None else t for t in times], -(sm.get("best_accuracy") or 0.0))


def headline_rows(results: dict, targets) -> dict[str, str]:
    """The best row of other people's optimisers and our best row: {"peer": name, "ours": name}."""
    out = {}
    for side, reference in (("peer", True), ("ours", False)):
        recs = [
            (name, rec)
            for name, rec in results["rows"].items()
            if row_by_name(name).reference == reference and rec.get("curve")
        ]
        if recs:
            out[side] = min(recs, key=lambda nr: _rank(nr[1], targets))[0]
    return out


def run_seeds(s: Settings, results: Results, run: Callable[[Job], dict], seeds: int) -> None:
    """The headline rows (best peer, our best) again with seeds s.seed + 1, …, with the
    learning rate and damping their sweeps chose: other initial weights and batch orders."""
    store = results.data.setdefault("seeds", {})
    for name in headline_rows(results.data, s.targets).values():
        rec = results.data["rows"][name]
        for k in range(1, seeds):
            ks = Settings(**{**asdict(s), "seed": s.seed + k})
            job = Job(ks, name, rec.get("lr"), s.budget, damping=rec.get("damping"))
            cell = f"{name}@{ks.seed}"
            if results.resume and store.get(cell, {}).get("key") == job.key():
                print(f"  {cell}: stored (--resume)", flush=True)
                continue
            out = run(job)
            store[cell] = {k2: out[k2] for k2 in ("key", "status", "summary", "lr", "damping")}
            results.put("seeds", cell, store[cell])
            print(f"  {cell}: {_brief(out['summary'], s.targets)} ({out['status']})", flush=True)


def _spread(values: list[float | None]) -> tuple[float | None, float | None, float | None]:
    """Median, least and greatest; a run that missed the target counts as infinitely slow."""
    vals = sorted(math.inf if v is None else v for v in values)
    if not vals:
        return None, None, None
    return float(np.median(vals)), vals[0], vals[-1]


def seeds_table(results: dict, targets) -> str:
    """Median (least–greatest) time to each target over the seeds of the headline rows, their
    ratio, and a verdict only where the spreads do not overlap."""
    heads = headline_rows(results, targets)
    if len(heads) < 2 or not results.get("seeds"):
        return ""
    base = results["settings"]["seed"]
    runs = {}
    for side, name in heads.items():
        recs = [results["rows"][name]] + [
            v for k, v in results["seeds"].items() if k.rsplit("@", 1)[0] == name
        ]
        runs[side] = (name, recs)

    def cell(v):
        return "—" if v is None or v == math.inf else f"{v:.1f}"

    lines = [
        "| | row | seeds | "
        + " | ".join(f"s to {t:.0%}: median (least–greatest)" for t in targets)
        + " |",
        "|---|---|---:|" + "---:|" * len(targets),
    ]
    spreads = {}
    for side, (name, recs) in runs.items():
        row = []
        for t in targets:
            med, lo, hi = _spread([r["summary"].get(f"time_to_{t:g}") for r in recs])
            spreads[side, t] = (med, lo, hi)
            row.append(f"{cell(med)} ({cell(lo)}–{cell(hi)})")
        label = "best peer" if side == "peer" else "ours"
        seeds = f"{base}–{base + len(recs) - 1}"
        lines.append(f"| {label} | {row_by_name(name).label} | {seeds} | " + " | ".join(row) + " |")
    verdicts = []
    for t in targets:
        (om, olo, ohi), (pm, plo, phi) = spreads["ours", t], spreads["peer", t]
        ratio = om / pm if om not in (None, math.inf) and pm not in (None, 0, math.inf) else None
        if ohi < plo:
            verdict = "ours faster on every seed"
            if ohi <= plo / 2:
                verdict += ", in at most half the time"
        elif olo > phi:
            verdict = "the peer faster on every seed"
        else:
            verdict = "the spreads overlap: no verdict"
        text = "—" if ratio is None else f"{ratio:.2f}×"
        verdicts.append(f"- {t:.0%}: ours/peer median time {text}; {verdict}")
    return "\n".join(lines + [""] + verdicts)


def run_rows(
    s: Settings,
    names: list[str],
    results: Results,
    run: Callable[[Job], dict],
    sweep_run: Callable[[Job], dict] | None = None,
) -> None:
    """Every selected row of one task: skip notes, sweeps (``sweep_run``, default ``run``),
    the row, the results file saved after each."""
    for name in names:
        row = row_by_name(name)
        note = row.needs() if row.needs else None
        if note:
            print(f"  {name}: skipped — {note}", flush=True)
            results.data["rows"].pop(name, None)
            results.put("skipped", name, note)
            continue
        lr = damping = None
        if row.grid(s.task) or row.lr_from:
            lr, damping = choose_tuning(row, s, results, sweep_run or run)
        job = Job(s, name, lr, s.budget, damping=damping)
        if results.stored("rows", name, job.key()) is not None:
            print(f"  {name}: stored (--resume)", flush=True)
            continue
        rec = run(job)
        results.put("rows", name, rec)
        print(
            f"  {name}: {_brief(rec['summary'], s.targets)} ({rec['status']}"
            f"{'' if rec['status'] != 'error' else ': ' + rec['message'][-300:]})",
            flush=True,
        )


# -- tables and figures ----------------------------------------------------------------------------


def _fmt(x, spec: str = ".1f", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def _evals(rec: dict) -> str:
    s = rec["summary"]
    if row_by_name(rec["row"]).minibatch:
        return f"{_fmt(s['epochs'], '.2f')} epochs"
    nfev, nhev = s.get("nfev"), s.get("nhev")
    text = _fmt(nfev, "d")
    return text + (f" + {nhev} Gv" if nhev else "")


def _memory(rec: dict) -> str:
    b = rec.get("peak_memory_bytes")
    return "—" if b is None else f"{b / 2**20:.0f} MiB"


def _damping(rec: dict):
    d = rec.get("damping")
    return d if d is not None else (rec.get("opts") or {}).get("damping")


def markdown_table(results: dict, targets=TARGETS) -> str:
    """One line per stored row (in the order of ``ROWS``) and a line per skipped row."""
    t1, t2 = targets[0], targets[-1]
    head = (
        f"| method | lr | damping | s to {t1:.0%} | epochs to {t1:.0%} | s to {t2:.0%} | "
        f"epochs to {t2:.0%} | best acc | evaluations | peak memory | s / epoch |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in ROWS:
        rec = results["rows"].get(row.name)
        if rec is None:
            continue
        s = rec["summary"]
        best = _fmt(s["best_accuracy"], ".4f")
        if rec["status"] in ("error", "diverged"):
            best += f" ({rec['status']})"
        lines.append(
            f"| {rec['label']} | {_fmt(rec.get('lr'), 'g')} | {_fmt(_damping(rec), 'g')} | "
            f"{_fmt(s[f'time_to_{t1:g}'])} | "
            f"{_fmt(s[f'epochs_to_{t1:g}'], '.2f')} | {_fmt(s[f'time_to_{t2:g}'])} | "
            f"{_fmt(s[f'epochs_to_{t2:g}'], '.2f')} | {best} | {_evals(rec)} | "
            f"{_memory(rec)} | {_fmt(s['seconds_per_epoch'], '.3f')} |"
        )
    for name, note in results.get("skipped", {}).items():
        lines.append(f"| {row_by_name(name).label} | skipped: {note} |" + " |" * 9)
    return "\n".join(lines)


def sweep_table(results: dict, targets=TARGETS) -> str:
    lines = [
        f"| sweep | lr | damping | s to {targets[0]:.0%} | best acc | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, sw in results.get("sweeps", {}).items():
        chosen = (sw["chosen"], sw.get("chosen_damping"))
        for rec in sw["candidates"]:
            s = rec["summary"]
            mark = " (chosen)" if (rec["lr"], rec.get("damping")) == chosen else ""
            lines.append(
                f"| {name} | {_fmt(rec['lr'], 'g')} | {_fmt(rec.get('damping'), 'g')} | "
                f"{_fmt(s[f'time_to_{targets[0]:g}'])} "
                f"| {_fmt(s['best_accuracy'], '.4f')} | {rec['status']}{mark} |"
            )
    return "\n".join(lines)


def figures(results: dict, task: str, out: Path, targets=TARGETS) -> list[Path]:
    """Test accuracy against wall time (log x) and against epochs, every stored row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r, results["rows"][r.name]) for r in ROWS if r.name in results["rows"]]
    # ten distinct colours, then darker ones, and a marker cycle of another length: no two
    # of the first 100 rows share both colour and marker
    colours = [
        *plt.get_cmap("tab10").colors,
        *("black", "magenta", "navy", "darkred", "teal", "goldenrod", "indigo", "lime"),
    ]
    markers = "osv^DPX*h<>pd8"
    best = max((rec["summary"]["best_accuracy"] or 0.0 for _, rec in rows), default=1.0)
    paths = []
    for xkey, xlabel, fname in (
        ("time", "wall time (s, log scale; checkpoints not timed)", "time"),
        ("epochs", "epochs (passes over the training images, log scale)", "epochs"),
    ):
        fig, ax = plt.subplots(figsize=(11, 6))
        for i, (row, rec) in enumerate(rows):
            # log axes (mini-batch rows finish within a few epochs, full-batch ones take
            # tens): the start (step 0) has no place on them
            pts = [p for p in rec["curve"] if p["step"] > 0 and p[xkey] > 0]
            if not pts:
                continue
            ax.plot(
                [p[xkey] for p in pts],
                [p["accuracy"] for p in pts],
                color=colours[i % len(colours)],
                linestyle="--" if row.reference else "-",
                linewidth=1.8,
                marker=markers[i % len(markers)],
                markersize=4,
                markevery=max(1, len(pts) // 25),
                label=row.label,
            )
        for tgt in targets:
            ax.axhline(tgt, color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                f"{tgt:.0%}",
                (1.0, tgt),
                xycoords=("axes fraction", "data"),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=9,
            )
        ax.set_xscale("log")
        # the race is near the targets: rows far below them leave the frame (the table has them)
        ax.set_ylim(targets[0] - 0.1, min(1.0, max(best, targets[-1]) + 0.02))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(
            f"Fashion-MNIST {task}: {describe(task, results['settings']['hidden'])}\n"
            f"budget {results['settings']['budget']:g} s a row",
            fontsize=10,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.03, 0.5), fontsize=9, frameon=False)
        fig.tight_layout()
        path = out / f"accuracy_{fname}_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- how cost grows with the width -----------------------------------------------------------------


def width_rows(
    s: Settings,
    names: list[str],
    widths: list[int],
    budget: float,
    out: Path,
    resume: bool,
    run: Callable[[Job], dict],
) -> str:
    """Seconds per epoch of each row at each hidden width (2L: widths w and w/3)."""
    path = out / f"widths_{s.task}.json"
    data = _keyed_by_settings(read_results(path, "widths"), s.key(), {"cells": {}})
    cells: dict = data["cells"]
    for name in names:
        row = row_by_name(name)
        note = row.needs() if row.needs else None
        if note:
            print(f"  {name}: skipped — {note}")
            continue
        grid = row.grid(s.task)
        lr, damping = grid[len(grid) // 2] if grid else (None, None)
        for w in widths:
            hidden = (w,) if s.task == "1L" else (w, max(1, w // 3))
            ws = Settings(**{**asdict(s), "hidden": hidden})
            job = Job(ws, name, lr, budget, every=10**9, stop_at_target=False, damping=damping)
            cell = f"{name}@{w}"
            if resume and cells.get(cell, {}).get("key") == job.key():
                continue
            rec = run(job)
            cells[cell] = {
                "key": job.key(),
                "summary": rec["summary"],
                "status": rec["status"],
                "peak_memory_bytes": rec["peak_memory_bytes"],
            }
            print(
                f"  {name} width {w}: {_fmt(rec['summary']['seconds_per_epoch'], '.3g')} "
                f"s/epoch ({rec['status']})",
                flush=True,
            )
            _write_json(path, data)
    head = "| method | " + " | ".join(f"{w}: s / epoch" for w in widths) + " |"
    lines = [head, "|---|" + "---:|" * len(widths)]
    for name in names:
        vals = [
            cells.get(f"{name}@{w}", {}).get("summary", {}).get("seconds_per_epoch") for w in widths
        ]
        if any(v is not None for v in vals):
            lines.append(
                f"| {row_by_name(name).label} | " + " | ".join(_fmt(v, ".3g") for v in vals) + " |"
            )
    return "\n".join(lines)


# -- the command line ------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    """A finite number of seconds > 0 (an argparse type)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text}")
    return v


def _count(least: int) -> Callable[[str], int]:
    """An integer >= ``least`` (an argparse type)."""

    def parse_count(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {v}")
        return v

    return parse_count


#: the images Fashion-MNIST has: --n-train and --n-test may not ask for more
AVAILABLE = {"n_train": 60_000, "n_test": 10_000}


def _check_out(out: Path, tasks: list[str], widths: bool) -> str:
    """Why results cannot be written under ``out`` or read back from it ('' when they can):
    checked before anything is measured."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: exists and is not a directory"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        return f"--out {out}: cannot write there ({err.strerror or err})"
    for task in tasks:
        path = out / (f"widths_{task}.json" if widths else f"{task}.json")
        if path.exists() and not path.is_file():
            return f"--out: {path} exists and is not a file"
        try:
            read_results(path, "widths" if widths else "results")
        except ResultsFileError as err:
            return str(err)
    return ""


def task_list(task: str) -> list[str]:
    """The tasks a ``--task`` value names."""
    return {"both": list(MLP_TASKS), "all": list(ALL_TASKS)}.get(task, [task])


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, every one checked before anything is measured (an argparse error naming
    the flag otherwise), the output directory included."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--task",
        choices=("1L", "2L", "cnn", "both", "all"),
        default=None,
        help="network: 1L, 2L, cnn, both (1L and 2L) or all (default: both; 1L with --quick)",
    )
    ap.add_argument(
        "--budget",
        type=_seconds,
        default=None,
        help="seconds a row (default 60 for 1L and 2L, 300 for cnn)",
    )
    ap.add_argument(
        "--sweep-budget",
        type=_seconds,
        default=None,
        help="seconds a sweep candidate (default 15 for 1L and 2L, 60 for cnn)",
    )
    ap.add_argument(
        "--rows",
        default=None,
        help="comma-separated row names (default: every row of the task)",
    )
    ap.add_argument("--threads", type=_count(1), default=None, help="torch threads (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-size", type=_count(1), default=128, help="mini-batch size (128)")
    ap.add_argument("--n-train", type=_count(1), default=None, help="training images (all)")
    ap.add_argument("--n-test", type=_count(1), default=None, help="test images (all)")
    ap.add_argument("--seed", type=_count(0), default=0, help="initial weights and shuffling")
    ap.add_argument(
        "--seeds",
        type=_count(1),
        default=1,
        help="run the best peer and our best row with this many seeds (1: no reruns)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    ap.add_argument("--resume", action="store_true", help="skip rows already measured")
    ap.add_argument("--quick", action="store_true", help="smoke test: 5,000 images, 2 s a row")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run rows here, not in subprocesses (no memory column)",
    )
    ap.add_argument("--widths", default=None, help="e.g. 300,1000,3000: s/epoch by width")
    ap.add_argument(
        "--width-budget",
        type=_seconds,
        default=None,
        help="seconds a row at each width (default 10)",
    )
    ap.add_argument(
        "--data",
        choices=("fashion-mnist", "synthetic"),
        default="fashion-mnist",
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return args
    q = args.quick

    def given(value, default):
        return default if value is None else value

    args.task = given(args.task, "1L" if q else "both")
    # None: the task's default (TASK_BUDGETS)
    args.budget = given(args.budget, 2.0 if q else None)
    args.sweep_budget = given(args.sweep_budget, 1.0 if q else None)
    args.width_budget = given(args.width_budget, 2.0 if q else 10.0)
    args.n_train = given(args.n_train, 5000 if q else None)
    args.n_test = given(args.n_test, 2000 if q else None)
    if args.data == "fashion-mnist":
        for name, most in AVAILABLE.items():
            n = getattr(args, name)
            if n is not None and n > most:
                flag = "--" + name.replace("_", "-")
                ap.error(f"{flag}: Fashion-MNIST has {most:,} such images, got {n:,}")
    names = [r.name for r in ROWS]
    args.row_names = names if args.rows is None else [n.strip() for n in args.rows.split(",")]
    for n in args.row_names:
        if n not in names:
            ap.error(f"--rows: unknown row {n!r}; rows: {', '.join(names)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        ap.error(f"--device: expected cpu or cuda (e.g. cuda:0), got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device: expected cpu or cuda (e.g. cuda:0), got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    args.width_list = None
    if args.widths:
        try:
            args.width_list = [int(w) for w in args.widths.split(",")]
        except ValueError:
            ap.error(f"--widths must be comma-separated integers, got {args.widths!r}")
        if min(args.width_list) < 1:
            ap.error("--widths must be positive")
    tasks = task_list(args.task)
    if args.width_list and "cnn" in tasks:
        ap.error("--widths: the cnn task has no hidden widths (use --task 1L or 2L)")
    problem = _check_out(args.out, tasks, widths=bool(args.width_list))
    if problem:
        ap.error(problem)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        _worker(*args.worker)
        return
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    run = measure if args.in_process else measure_in_subprocess
    # --quick: the sweeps (which have no memory column) here, to keep the smoke test short
    sweep_run = measure if args.quick else run
    tasks = task_list(args.task)
    print(
        f"torch {torch.__version__}, {threads} threads, {args.device}; rows: "
        f"{'every row of each task' if args.rows is None else ', '.join(args.row_names)}",
        flush=True,
    )
    for task in tasks:
        budget, sweep_budget = TASK_BUDGETS[task]
        names = rows_of(task) if args.rows is None else args.row_names
        s = Settings(
            task=task,
            budget=budget if args.budget is None else args.budget,
            sweep_budget=sweep_budget if args.sweep_budget is None else args.sweep_budget,
            sweep_candidates=2 if args.quick else None,
            n_train=args.n_train,
            n_test=args.n_test,
            device=args.device,
            threads=threads,
            batch_size=args.batch_size,
            seed=args.seed,
            data=args.data,
        )
        sizes = describe(task, s.widths)
        if args.width_list:
            print(f"\n## {task} ({sizes}): seconds per epoch by hidden width", flush=True)
            print(
                width_rows(
                    s,
                    names,
                    args.width_list,
                    args.width_budget,
                    args.out,
                    args.resume,
                    run,
                )
            )
            continue
        print(f"\n## {task}: {sizes}, budget {s.budget:g} s a row", flush=True)
        results = Results(args.out / f"{task}.json", s, args.resume)
        run_rows(s, names, results, run, sweep_run)
        if args.seeds > 1:
            print(f"\n  the headline rows with {args.seeds} seeds", flush=True)
            run_seeds(s, results, run, args.seeds)
        print()
        print(markdown_table(results.data, s.targets))
        seeds = seeds_table(results.data, s.targets)
        if seeds:
            print()
            print(seeds)
        if results.data["sweeps"]:
            print()
            print(sweep_table(results.data, s.targets))
        for p in figures(results.data, task, args.out, s.targets):
            print(f"  wrote {p}")
        print(f"  wrote {results.path}")


if __name__ == "__main__":
    main()
