"""K-FAC's preconditioner for PyTorch training loops (:class:`KFACPreconditioner`): hooks that
record each layer's input and back-propagate the curvature vectors at the end of the forward
pass, and the step that preconditions every layer's ``.grad`` with the one K-FAC engine
(:mod:`secondorder.curvature.kfac`), averaging factors and sharing inverses across
``torch.distributed`` processes. See :mod:`secondorder.optim_kfac` for the contract and the
:class:`~secondorder.optim_kfac.KFAC` optimiser built on it.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from secondorder._validation import check_choice, check_positive, check_positive_int
from secondorder.curvature.kfac import (
    KFAC_APPROXIMATIONS,
    KFACEngine,
    KFACStatistics,
    LayerCapture,
    all_finite,
    backpropagate,
    check_factors_fit,
    factor_dtype,
    kfac_layers,
    output_vectors,
    statistics_from,
)
from secondorder.losses import Loss, get_loss

__all__ = ["KFACPreconditioner", "KFAC_OPTIMIZER_KINDS", "LOSS_REDUCTIONS", "unit_interval"]

KFAC_OPTIMIZER_KINDS = ("mc", "exact", "empirical")
LOSS_REDUCTIONS = ("mean", "sum")


def unit_interval(arg: str, value) -> float:
    value = check_positive(arg, value, allow_zero=True)
    if value >= 1:
        raise ValueError(f"{arg} must lie in [0, 1), got {value}")
    return value


class _Recorder:
    """The hooks: layer inputs (and, for "empirical", output gradients) and the curvature
    vectors back-propagated from the model's output at the end of each forward pass."""

    def __init__(self, owner: KFACPreconditioner) -> None:
        self.owner = owner
        self.capture = LayerCapture(owner.layers)
        self.pending: list[KFACStatistics] = []  # statistics of the forward passes so far
        self.output: Tensor | None = None
        self.output_grad: Tensor | None = None
        self.backward_seen = False
        self.forward_seen = False  # a forward pass with gradients since the last step
        self.nonfinite_output = False  # a forward pass since the last step gave inf or NaN
        self.handles = []
        self._reset_capture()
        for j, ly in enumerate(owner.layers):
            self.handles.append(ly.module.register_forward_hook(self._layer_hook(j)))
        self.handles.append(owner.model.register_forward_hook(self._output_hook))

    def _reset_capture(self) -> None:
        n = len(self.owner.layers)
        self.capture.inputs = [[] for _ in range(n)]
        self.capture.outputs = [[] for _ in range(n)]
        self.capture.grads = [[] for _ in range(n)]

    def _active(self, out) -> bool:
        return self.owner.enabled and torch.is_grad_enabled() and isinstance(out, Tensor)

    def _layer_hook(self, j: int):
        def hook(module, args, out):
            if not (self._active(out) and out.requires_grad and self.owner.factors_due):
                return
            self.capture.inputs[j].append(args[0].detach())
            self.capture.outputs[j].append(out)
            if self.owner.kind == "empirical":
                out.register_hook(lambda g: self.capture.grads[j].append(g.detach()))

        return hook

    def _output_hook(self, module, args, z):
        if not (self._active(z) and z.requires_grad):
            self._reset_capture()
            return
        self.forward_seen = True
        if not all_finite([z.detach()]):  # no targets to draw from NaN outputs: skip the step
            self.nonfinite_output = True
        elif self.owner.kind != "empirical" and self.capture.complete():
            # before the hook below: this backward pass is ours, not the user's
            self.pending.append(self.owner._curvature_statistics(self.capture, z))
        if self.owner.kind != "empirical":
            self._reset_capture()
        self.output, self.output_grad, self.backward_seen = z, None, False

        def seen(g):
            self.backward_seen = True
            self.output_grad = g.detach()

        z.register_hook(seen)

    def check_recorded(self) -> None:
        """Refuse a step with no forward pass recorded since the last one."""
        if not self.forward_seen:
            raise RuntimeError(
                "KFAC: no forward pass was recorded since the last step: compute the loss from "
                "model(X) with gradients enabled (and call loss.backward()) before step()"
            )

    def take(self) -> list[KFACStatistics]:
        """The statistics since the last step (for "empirical", from the backward pass)."""
        if self.owner.kind == "empirical" and self.capture.complete():
            if not all(self.capture.grads):
                raise RuntimeError(
                    "KFAC (kind='empirical') needs the output gradients of a backward pass: "
                    "call loss.backward() on a loss computed from model(X) before step()"
                )
            self.pending.append(self.owner._empirical_statistics(self.capture, self.output))
            self._reset_capture()
        out, self.pending = self.pending, []
        self.forward_seen = False
        if self.nonfinite_output:
            self.nonfinite_output = False
            return [None]  # marks the step's statistics as non-finite
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class KFACPreconditioner:
    """K-FAC's preconditioner for any ``torch.optim`` optimiser: after ``loss.backward()``,
    :meth:`step` replaces each parameter's ``.grad`` by (G ⊗ A + γ)⁻¹ ``.grad`` layer by layer
    (see the module doc).

    Args:
        model: the network; its trainable parameters must live in ``nn.Linear``,
            ``nn.Conv2d`` or ``nn.Conv1d`` layers (any graph), unless ``unsupported="gradient"``
            leaves the others' ``.grad`` unchanged.
        loss: the loss computed from the model's output (a name of
            ``secondorder.losses.LOSSES`` or a Loss): "mc" and "exact" read its output
            derivatives.
        damping: γ added to the curvature (> 0); the factored Tikhonov damping of
            :func:`~secondorder.curvature.kfac.damped_inverses`, or γ itself for EKFAC.
        kind: ``"mc"`` (Monte-Carlo Fisher, default), ``"exact"`` (Gauss–Newton) or
            ``"empirical"`` (the gradients of the user's own loss).
        ema: ρ of the running averages of A and G, in [0, 1).
        inv_every: refresh the inverses (or EKFAC's eigenbases) every this many steps.
        approximation: ``"expand"`` or ``"reduce"`` for convolutions' positions.
        ekfac: EKFAC's eigenbasis rescaling (George et al. 2018) instead of K-FAC's inverse.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss sums over the batch.
        unsupported: ``"error"`` or ``"gradient"`` (see :func:`~secondorder.curvature.kfac.
            kfac_layers`).
        seed: seed of the targets drawn for ``kind="mc"``.
        factor_every: update the factors from the forward passes of every this many steps
            (the other steps skip the hooks' work and precondition with the factors as they
            are).
        factor_samples: form the factors from the first this many samples of each batch
            (None: all of them); the curvature vectors are drawn for the whole batch.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | Loss = "cross_entropy",
        *,
        damping: float = 1e-3,
        kind: str = "mc",
        ema: float = 0.95,
        inv_every: int = 10,
        approximation: str = "expand",
        ekfac: bool = False,
        loss_reduction: str = "mean",
        unsupported: str = "error",
        seed: int = 0,
        factor_every: int = 1,
        factor_samples: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.loss = get_loss(loss)
        self.damping = check_positive("damping", damping)
        self.kind = check_choice("kind", kind, KFAC_OPTIMIZER_KINDS)
        self.ema = unit_interval("ema", ema)
        self.inv_every = check_positive_int("inv_every", inv_every)
        self.factor_every = check_positive_int("factor_every", factor_every)
        self.factor_samples = (
            None if factor_samples is None else check_positive_int("factor_samples", factor_samples)
        )
        self.approximation = check_choice("approximation", approximation, KFAC_APPROXIMATIONS)
        if not isinstance(ekfac, bool):
            raise TypeError(f"ekfac must be True or False, got {ekfac!r}")
        self.ekfac = ekfac
        self.loss_reduction = check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        self.seed = check_positive_int("seed", seed, allow_zero=True)
        self.layers, self.others = kfac_layers(model, unsupported=unsupported, purpose="KFAC")
        first = self.layers[0].parameters()[0]
        if first.is_meta:
            raise ValueError(
                "KFAC: the model's parameters are on the meta device and hold no values; "
                "materialise them first (model.to_empty(device=...) and initialise)"
            )
        check_factors_fit(self.layers, factor_dtype(first.dtype), first.device)
        self.model = model
        self.engine = KFACEngine(self.layers, ema=self.ema, ekfac=self.ekfac)
        self.steps = 0
        self.generator_state: Tensor | None = None
        self.enabled = True
        self._recorder = _Recorder(self)

    # -- statistics ------------------------------------------------------------------------------
    def _weights(self, n: int, like: Tensor) -> Tensor:
        """Per-sample weights 1/n (A is the inputs' mean second moment either way)."""
        return torch.full((n,), 1.0 / n, dtype=factor_dtype(like.dtype), device=like.device)

    def _scaled(self, stats: KFACStatistics, n: int) -> KFACStatistics:
        """A sum of n losses has n times the mean's curvature: G (and EKFAC's scales) × n."""
        if self.loss_reduction == "sum":
            for f in stats.factors:
                f.G = f.G * n
            stats.w = stats.w * n
        return stats

    def _generator(self, device) -> torch.Generator:
        gen = torch.Generator(device=device).manual_seed(self.seed)
        if self.generator_state is not None:
            gen.set_state(self.generator_state)
        return gen

    def _curvature_statistics(self, capture: LayerCapture, z: Tensor) -> KFACStatistics:
        """ "mc" or "exact": the vectors back-propagated now, while z's graph is alive."""
        if z.ndim != 2:
            raise ValueError(
                f"KFAC kind={self.kind!r} needs model outputs of shape (n, k), got {tuple(z.shape)}"
            )
        with torch.autocast(z.device.type, enabled=False):  # factors in float32 or wider
            return self._scaled(self._backpropagated(capture, z), len(z))

    def _backpropagated(self, capture: LayerCapture, z: Tensor) -> KFACStatistics:
        gen = None
        if self.kind == "mc":
            gen = self._generator(z.device)
        vectors = output_vectors(
            self.loss, z.float() if z.dtype in _HALF else z, self.kind, generator=gen
        )
        if gen is not None:
            self.generator_state = gen.get_state()
        with torch.enable_grad():  # the user's backward pass still needs the graph
            per_column = backpropagate(z, capture, [v.to(z.dtype) for v in vectors], retain=True)
        return self._statistics(capture, per_column, len(z), z)

    def _statistics(
        self,
        capture: LayerCapture,
        grads: list[list[list[Tensor]]],
        n: int,
        like: Tensor,
        scale: float = 1.0,
    ) -> KFACStatistics:
        """The factors (and EKFAC's per-sample gradients) of the first ``factor_samples`` of
        the n samples (rows along the first dimension of every layer call), weights 1/m, the
        output gradients multiplied by ``scale``."""
        m = n if self.factor_samples is None else min(n, self.factor_samples)
        if m < n:
            capture = LayerCapture(
                capture.layers,
                inputs=[[x[:m] for x in calls] for calls in capture.inputs],
                outputs=capture.outputs,
            )
        if m < n or scale != 1.0:
            grads = [[[g[:m] * scale for g in calls] for calls in cols] for cols in grads]
        return statistics_from(
            self.layers,
            capture,
            grads,
            self._weights(m, like),
            self.approximation,
            per_sample=self.ekfac,
        )

    def _empirical_statistics(self, capture: LayerCapture, z: Tensor | None) -> KFACStatistics:
        """ "empirical": the user's output gradients, per sample (×n for a mean loss)."""
        like = capture.inputs[0][0]
        n = like.shape[0]
        scale = float(n) if self.loss_reduction == "mean" else 1.0
        grads = [[list(calls)] for calls in capture.grads]
        with torch.autocast(like.device.type, enabled=False):
            stats = self._statistics(capture, grads, n, like, scale)
        return self._scaled(stats, n)

    def _check_reduction(self) -> None:
        """A cross-entropy "mean" whose ∂L/∂z exceeds 1/n is a sum: refused, saying so."""
        g = self._recorder.output_grad
        if g is None or self.loss_reduction != "mean" or self.loss.name != "cross_entropy":
            return
        n = g.shape[0]
        if float(g.abs().max()) * n > 1.0 + 1e-3:
            raise ValueError(
                "KFAC: loss_reduction='mean' but the loss's gradient ∂L/∂z has entries above "
                f"1/n = 1/{n}: the loss sums over the batch; pass loss_reduction='sum' or use "
                "the mean (F.cross_entropy's default reduction)"
            )

    @property
    def factors_due(self) -> bool:
        """Whether this step's forward passes update the factors (every ``factor_every``)."""
        return self.steps % self.factor_every == 0

    # -- the step ----------------------------------------------------------------------------------
    def gammas(self, weight_decay: list[float] | None = None) -> list[float]:
        """The damping of each layer: γ plus the L2 coefficient of its weight, if any."""
        if weight_decay is None:
            return [self.damping] * len(self.layers)
        return [self.damping + wd for wd in weight_decay]

    def update(self, weight_decay: list[float] | None = None) -> bool:
        """Fold the statistics recorded since the last step into the running factors and
        refresh the inverses when due; False (nothing changed) for a non-finite batch."""
        due = self.factors_due
        stats = self._recorder.take()
        self._check_reduction()
        if not due:  # the running factors and inverses as they are
            self.steps += 1
            return True
        if not stats:
            raise RuntimeError(
                "KFAC: no forward pass was recorded since the last step: compute the loss from "
                "model(X) with gradients enabled (and call loss.backward()) before step()"
            )
        if not all(s is not None and s.finite() for s in stats):
            warnings.warn(
                "KFAC: the batch gave a non-finite factor; the step was skipped (the running "
                "factors and the parameters unchanged)",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        factors = stats[0].factors
        if len(stats) > 1:  # several forward passes before a step: their mean
            for f in factors:
                f.A, f.G = f.A / len(stats), f.G / len(stats)
            for s in stats[1:]:
                for f, g in zip(factors, s.factors):
                    f.A += g.A / len(stats)
                    f.G += g.G / len(stats)
        self.engine.update(factors)
        gammas = self.gammas(weight_decay)
        if self.steps % self.inv_every == 0 or not self.engine.ready:
            self._refresh(gammas)
        if self.ekfac:
            for s in stats:
                self.engine.update_scales(s)
            if _world() > 1:  # every process preconditions with the same scales
                _mean_over_ranks([st["S_avg"] for st in self.engine.state])
        self.steps += 1
        return True

    def _refresh(self, gammas: list[float]) -> None:
        """Refresh the inverses; in a data-parallel run (``torch.distributed`` initialised,
        e.g. under DistributedDataParallel) the running factors are first averaged over the
        processes (one collective: the averages of running averages are the running averages
        of the averages), each process refreshes its share of the layers (layer j on rank
        j mod world) and one more collective gives every process all of them, bit for bit."""
        world = _world()
        if world == 1:
            self.engine.refresh(gammas)
            return
        import torch.distributed as dist

        state = self.engine.state
        _mean_over_ranks([t for st in state for t in (st["A"], st["G"])])
        rank = dist.get_rank()
        mine = [j for j in range(len(state)) if j % world == rank]
        self.engine.refresh(gammas, only=mine)
        first = state[0]["A"]
        parts = []
        for j, st in enumerate(state):
            for key, shape in self.engine.refreshed_shapes(j).items():
                t = st[key] if j in mine else first.new_zeros(shape)
                parts.append(t.reshape(-1))
        flat = torch.cat(parts)
        dist.all_reduce(flat)  # owners' values plus zeros: exact
        at = 0
        for j, st in enumerate(state):
            for key, shape in self.engine.refreshed_shapes(j).items():
                n = shape[0] * shape[1]
                st[key] = flat[at : at + n].view(shape).clone()
                at += n

    def precondition(self, grads: list[list[Tensor]], gammas: list[float]) -> list[list[Tensor]]:
        """Each layer's (weight, bias) gradients → (G ⊗ A + γ)⁻¹ applied to them."""
        mats = [ly.grad_matrix(g) for ly, g in zip(self.layers, grads)]
        steps = self.engine.precondition(mats, gammas)
        return [
            [t.to(g.dtype) for t, g in zip(ly.split_matrix(M), gs)]
            for ly, M, gs in zip(self.layers, steps, grads)
        ]

    @torch.no_grad()
    def step(self) -> None:
        """Precondition every K-FAC layer's ``.grad`` in place (after ``loss.backward()``)."""
        self._recorder.check_recorded()
        grads = []
        for ly in self.layers:
            ps = ly.parameters()
            if any(p.grad is None for p in ps):
                raise RuntimeError(
                    f"KFAC: layer {ly.label} has no .grad: call loss.backward() before step()"
                )
            grads.append([p.grad for p in ps])
        if not all_finite([g for gs in grads for g in gs]):
            self._recorder.take()
            warnings.warn(
                "KFAC: a non-finite gradient; the preconditioner skipped this step",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if not self.update():
            return
        for ly, new in zip(self.layers, self.precondition(grads, self.gammas())):
            for p, t in zip(ly.parameters(), new):
                p.grad.copy_(t)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "engine": self.engine.state_dict(),
            "steps": self.steps,
            "generator": None if self.generator_state is None else self.generator_state.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "engine" not in state:
            raise ValueError("not a KFACPreconditioner state (no 'engine' entry)")
        self.engine.load_state_dict(state["engine"])
        self.steps = int(state.get("steps", 0))
        gen = state.get("generator")
        self.generator_state = None if gen is None else gen.clone()

    def remove(self) -> None:
        """Remove the hooks from the model (the preconditioner is then unusable)."""
        self._recorder.remove()
        self.enabled = False


_HALF = (torch.float16, torch.bfloat16)


def _world() -> int:
    """The number of data-parallel processes (1 without an initialised process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _mean_over_ranks(tensors: list[Tensor]) -> None:
    """Replace each tensor by its mean over the processes, in one collective."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    at = 0
    for t in tensors:
        t.copy_(flat[at : at + t.numel()].view_as(t))
        at += t.numel()
