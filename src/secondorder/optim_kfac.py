"""K-FAC (Martens & Grosse 2015) as a ``torch.optim.Optimizer``: :class:`KFAC`.

For any network whose trainable parameters live in ``nn.Linear`` and ``nn.Conv2d`` layers
(whatever the graph: residual blocks, branches; with ``unsupported="gradient"`` other
parameters take the plain gradient step), each layer's Gauss–Newton (or Fisher) block is
approximated by G ⊗ A (:mod:`secondorder.curvature.kfac`; convolutions by KFC, with the
``approximation`` "expand" or "reduce"),
with running averages over steps, A ← ρA + (1 − ρ)A_k and G ← ρG + (1 − ρ)G_k (ρ = ``ema``;
the first step takes A_1, G_1 as they are), where on the batch of step k (n samples)

    A_k = (1/n) Σ_i ã_i ã_iᵀ,   ã = (a, 1) with a bias,   G_k = (1/n) Σ_i Σ_c g_ic g_icᵀ
    (for a dense layer on vectors; see :mod:`secondorder.curvature.kfac` for positions),

and g_ic is a per-sample gradient with respect to the layer's output s_i: for ``kind="mc"``
(default) of ℓ(z_i, ŷ_i) at targets ŷ_i drawn from the model (the Monte-Carlo Fisher), for
``"exact"`` the back-propagated columns c of a factor L Lᵀ = H_z of the loss Hessian (the
exact-GGN factorisation), for ``"empirical"`` of the returned loss itself, n·∂L/∂s_i (the
empirical Fisher; L is the batch mean, so n·∂L/∂s_i = ∂ℓ_i/∂s_i). These are the factors of
:func:`~secondorder.curvature.kfac.kfac_factors` with uniform weights 1/n. The update of layer l,
with W̃ = (W, b) and the damped inverses refreshed every ``inv_every`` steps, is

    Δ_l = (G + √γ/π I)⁻¹ (∇_W̃ L + λ (W, 0)) (A + π√γ I)⁻¹,   γ = damping + λ,
    b ← μ b + Δ,   W̃ ← W̃ − lr · b,

with λ = ``weight_decay`` (an L2 term on the weights, not the biases, whose curvature λI is
added to the damping), μ = ``momentum`` (heavy ball; μ = 0 is the plain step) and π as in
:func:`~secondorder.curvature.kfac.damped_inverses`. With ``kind="exact"``, ``momentum=0`` and
λ equal to a ModelObjective's L2 coefficient, the steps are those of
``minimize(objective, θ₀, "kfac", kind="exact", line_search=None, rescale=False)``. With
``ekfac=True`` the step is EKFAC's (George et al. 2018): the gradient is rescaled in the
eigenbasis of G ⊗ A by running second moments of per-sample gradients (plus the damping),
the eigenbases refreshed every ``inv_every`` steps.

Closure contract: ``step(closure)`` calls the closure once; it must evaluate the model on the
batch (``model(X)``, once: the last forward pass is the one used) and **return the mean loss
without calling** ``backward()``: the optimizer differentiates the loss (and, for "mc" and
"exact", the model output) itself, and sets every parameter's ``.grad`` to ∇L (weight decay
not included). ``loss`` names the loss the closure computes (see
:data:`secondorder.losses.LOSSES`); "mc" and "exact" read its output derivatives.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from secondorder._validation import check_choice, check_positive, check_positive_int
from secondorder.curvature.kfac import (
    KFAC_APPROXIMATIONS,
    FlatLayout,
    KFACEngine,
    LayerCapture,
    backpropagate,
    check_factors_fit,
    factor_dtype,
    kfac_layers,
    output_vectors,
    statistics_from,
)
from secondorder.losses import Loss, get_loss

__all__ = ["KFAC", "KFAC_OPTIMIZER_KINDS"]

KFAC_OPTIMIZER_KINDS = ("mc", "exact", "empirical")


def _unit_interval(arg: str, value) -> float:
    value = check_positive(arg, value, allow_zero=True)
    if value >= 1:
        raise ValueError(f"{arg} must lie in [0, 1), got {value}")
    return value


class KFAC(torch.optim.Optimizer):
    """K-FAC for networks of ``nn.Linear`` and ``nn.Conv2d`` layers (see module doc).

    Args:
        model: the network whose trainable parameters are optimised (all of them).
        loss: the loss the closure returns, a name of ``secondorder.losses.LOSSES`` or a
            :class:`~secondorder.losses.Loss`.
        lr: step length (> 0).
        damping: Tikhonov damping added to the curvature (> 0).
        kind: ``"mc"`` (Monte-Carlo Fisher), ``"exact"`` (GGN factorisation) or
            ``"empirical"`` (empirical Fisher) for G.
        ema: ρ of the running averages of A and G, in [0, 1).
        inv_every: refresh the damped inverses every this many steps (the first step inverts).
        weight_decay: λ of an L2 term (λ/2)‖W‖² on the layers' weights (not the biases), ≥ 0.
        momentum: heavy-ball μ on the preconditioned step, in [0, 1).
        seed: seed of the generator that draws the targets of ``kind="mc"``.
        approximation: ``"expand"`` or ``"reduce"``: how a convolution's positions enter
            its factors.
        ekfac: EKFAC's eigenbasis rescaling instead of the damped Kronecker inverse.
        unsupported: ``"error"`` (default) refuses parameters outside Linear and Conv2d
            layers, naming their module; ``"gradient"`` updates them with the plain gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | Loss = "cross_entropy",
        lr: float = 0.1,
        damping: float = 1e-2,
        kind: str = "mc",
        ema: float = 0.95,
        inv_every: int = 10,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        seed: int = 0,
        approximation: str = "expand",
        ekfac: bool = False,
        unsupported: str = "error",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._loss = get_loss(loss)
        defaults = {
            "lr": check_positive("lr", lr),
            "damping": check_positive("damping", damping),
            "weight_decay": check_positive("weight_decay", weight_decay, allow_zero=True),
            "momentum": _unit_interval("momentum", momentum),
        }
        self.kind = check_choice("kind", kind, KFAC_OPTIMIZER_KINDS)
        self.ema = _unit_interval("ema", ema)
        self.inv_every = check_positive_int("inv_every", inv_every)
        self.seed = check_positive_int("seed", seed, allow_zero=True)
        self.approximation = check_choice("approximation", approximation, KFAC_APPROXIMATIONS)
        if not isinstance(ekfac, bool):
            raise TypeError(f"ekfac must be True or False, got {ekfac!r}")
        self.ekfac = ekfac
        self._layers, self._others = kfac_layers(model, unsupported=unsupported, purpose="KFAC")
        first = self._layers[0].parameters()[0]
        if first.is_meta:
            raise ValueError(
                "KFAC: the model's parameters are on the meta device and hold no values; "
                "materialise them first (model.to_empty(device=...) and initialise)"
            )
        check_factors_fit(self._layers, factor_dtype(first.dtype), first.device)
        self._model = model
        self._layout = FlatLayout(model, self._layers)
        self._engine = KFACEngine(self._layers, ema=self.ema, ekfac=self.ekfac)
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("KFAC does not support parameter groups")

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError(
                "KFAC optimises the parameters of the model it was given and takes no further "
                "parameter groups; build a new KFAC for another model"
            )
        super().add_param_group(param_group)

    # -- state ---------------------------------------------------------------------------------
    def _layer_state(self, j: int) -> dict:
        """Layer j's factors, inverses or eigenbases (kept on its weight)."""
        return self.state[self._layers[j].parameters()[0]]

    def _global_state(self) -> dict:
        """The step count, momentum buffer and generator state (on the first layer's weight)."""
        return self._layer_state(0)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device).manual_seed(self.seed)
        saved = self._global_state().get("generator")
        if saved is not None:
            gen.set_state(torch.frombuffer(bytearray(saved), dtype=torch.uint8))
        return gen

    def _bind_engine(self) -> None:
        """The engine works on the optimiser's own state dicts (also after load_state_dict)."""
        self._engine.state = [self._layer_state(j) for j in range(len(self._layers))]

    # -- one step --------------------------------------------------------------------------------
    def _forward(self, closure: Callable[[], Tensor]) -> tuple[Tensor, LayerCapture, Tensor]:
        """Run the closure with hooks capturing each layer's inputs and outputs and the
        model's output z; returns (loss, capture, z)."""
        capture = LayerCapture(self._layers)
        final: list[Tensor] = []
        handle = self._model.register_forward_hook(lambda m, a, out: final.append(out))
        try:
            with capture.recording(), torch.enable_grad():
                loss = closure()
        finally:
            handle.remove()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError("the KFAC closure must return the loss as a one-element tensor")
        if not final or not capture.complete():
            raise RuntimeError("the KFAC closure must evaluate the model (call model(X))")
        if not isinstance(final[-1], Tensor):
            raise TypeError(
                f"the model must return a tensor of outputs, got {type(final[-1]).__name__}"
            )
        if loss.grad_fn is None:
            raise RuntimeError(
                "the loss the KFAC closure returns has no graph: compute it from model(X) "
                "with gradients enabled"
            )
        return loss, capture, final[-1]

    def _output_grads(self, loss: Tensor, z: Tensor, capture: LayerCapture, params) -> tuple:
        """(per layer, per column, per call: the per-sample output gradients g; ∇L)."""
        n = z.shape[0]
        if self.kind == "empirical":
            outs = [o for calls in capture.outputs for o in calls]
            grads = _grad(loss, [*outs, *params], retain=False)
            it = iter(grads[: len(outs)])
            per_layer = [[[n * next(it) for _ in calls]] for calls in capture.outputs]
            return per_layer, grads[len(outs) :]
        gen = None
        if self.kind == "mc":
            gen = self._generator(z.device)
        vectors = output_vectors(self._loss, z, self.kind, generator=gen)
        if gen is not None:  # as bytes: load_state_dict would cast a tensor to a dtype
            self._global_state()["generator"] = bytes(gen.get_state().tolist())
        try:
            per_layer = backpropagate(z, capture, vectors, retain=True)
        except RuntimeError as err:
            _closure_error(err)
        return per_layer, _grad(loss, params, retain=False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One K-FAC step on the closure's batch; returns the loss before the step."""
        if closure is None:
            raise ValueError("KFAC.step needs a closure that returns the loss of model(X)")
        group = self.param_groups[0]
        params = group["params"]
        loss, capture, z = self._forward(closure)
        with torch.enable_grad():
            per_layer, grads = self._output_grads(loss, z, capture, params)
        for p, g in zip(params, grads):
            p.grad = g.detach().clone()
        w = z.new_full((z.shape[0],), 1.0 / z.shape[0]).detach()
        stats = statistics_from(
            self._layers, capture, per_layer, w, self.approximation, per_sample=self.ekfac
        )
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        if not (finite and stats.finite()):
            # one bad batch must not poison the running factors and the parameters for good
            warnings.warn(
                "KFAC: the batch gave a non-finite loss, gradient or factor; the step was "
                "skipped (parameters and running factors unchanged)",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss.detach()
        self._bind_engine()
        engine = self._engine
        engine.update(stats.factors)
        glob = self._global_state()
        k = int(glob.get("step", 0))
        lam = group["weight_decay"]
        gamma = group["damping"] + lam
        if k % self.inv_every == 0 or not engine.ready:
            engine.refresh(gamma)
        if self.ekfac:
            engine.update_scales(stats)
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        g = torch.cat([g.reshape(-1) for g in grads])
        if lam:
            g = g + lam * self._weight_mask(theta) * theta
        delta = self._layout.apply(engine, g, gamma)
        if group["momentum"]:
            buf = glob.get("momentum_buffer")
            delta = delta if buf is None else group["momentum"] * buf + delta
            glob["momentum_buffer"] = delta.clone()
        theta = theta - group["lr"] * delta
        for p, t in zip(params, torch.split(theta, [p.numel() for p in params])):
            p.copy_(t.view_as(p))
        glob["step"] = k + 1
        return loss.detach()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's checks, then each layer's factors checked against the model's sizes."""
        super().load_state_dict(state_dict)
        for j, ly in enumerate(self._layers):
            d_out, d_in = ly.kfac_dims
            st = self._layer_state(j)
            for key, size in (("A", d_in), ("G", d_out)):
                if key in st and tuple(st[key].shape) != (size, size):
                    raise ValueError(
                        f"the KFAC state of layer {ly.label} has {key} of shape "
                        f"{tuple(st[key].shape)}, but this model's layer needs {(size, size)}: "
                        "the state belongs to another model"
                    )

    def _weight_mask(self, theta: Tensor) -> Tensor:
        """1 on the layers' weights, 0 on the biases and other parameters (weight decay acts
        on weights only)."""
        mask = torch.zeros_like(theta)
        for sl in self._layout.slices:
            mask[sl[0]] = 1.0
        return mask


def _closure_error(err: RuntimeError):
    if "backward through the graph a second time" in str(err):
        raise RuntimeError(
            "the KFAC closure must return the loss without calling loss.backward()"
        ) from err
    raise err


def _grad(out: Tensor, inputs: list[Tensor], grad_out: Tensor | None = None, retain=True):
    """torch.autograd.grad with the closure contract's error for a freed graph."""
    try:
        return torch.autograd.grad(out, inputs, grad_out, retain_graph=retain)
    except RuntimeError as err:
        _closure_error(err)
