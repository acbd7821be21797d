"""K-FAC (Martens & Grosse 2015) as a ``torch.optim.Optimizer``: :class:`KFAC`.

For a sequential MLP of ``nn.Linear`` layers (the models :func:`secondorder.curvature.kfac.
mlp_structure` accepts), each layer's Gauss–Newton (or Fisher) block is approximated by G ⊗ A,
with running averages over steps, A ← ρA + (1 − ρ)A_k and G ← ρG + (1 − ρ)G_k (ρ = ``ema``;
the first step takes A_1, G_1 as they are), where on the batch of step k (n samples)

    A_k = (1/n) Σ_i ã_i ã_iᵀ,   ã = (a, 1) with a bias,   G_k = (1/n) Σ_i Σ_c g_ic g_icᵀ,

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
``minimize(objective, θ₀, "kfac", kind="exact", line_search=None, rescale=False)``.

Closure contract: ``step(closure)`` calls the closure once; it must evaluate the model on the
batch (``model(X)``, once: the last forward pass is the one used) and **return the mean loss
without calling** ``backward()``: the optimizer differentiates the loss (and, for "mc" and
"exact", the model output) itself, and sets every parameter's ``.grad`` to ∇L (weight decay
not included). ``loss`` names the loss the closure computes (see
:data:`secondorder.losses.LOSSES`); "mc" and "exact" read its output derivatives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from secondorder._validation import check_choice, check_positive, check_positive_int
from secondorder.curvature.kfac import KroneckerInverse, layer_factors, mlp_structure
from secondorder.losses import Loss, get_loss

__all__ = ["KFAC", "KFAC_OPTIMIZER_KINDS"]

KFAC_OPTIMIZER_KINDS = ("mc", "exact", "empirical")


def _unit_interval(arg: str, value) -> float:
    value = check_positive(arg, value, allow_zero=True)
    if value >= 1:
        raise ValueError(f"{arg} must lie in [0, 1), got {value}")
    return value


class KFAC(torch.optim.Optimizer):
    """K-FAC for a sequential MLP of ``nn.Linear`` layers (see module doc).

    Args:
        model: the ``nn.Sequential`` MLP whose parameters are optimised (all of them).
        loss: the loss the closure returns, a name of ``secondorder.losses.LOSSES`` or a
            :class:`~secondorder.losses.Loss`.
        lr: step length (> 0).
        damping: Tikhonov damping added to the curvature (> 0).
        kind: ``"mc"`` (Monte-Carlo Fisher), ``"exact"`` (GGN factorisation) or
            ``"empirical"`` (empirical Fisher) for G.
        ema: ρ of the running averages of A and G, in [0, 1).
        inv_every: refresh the damped inverses every this many steps (the first step inverts).
        weight_decay: λ of an L2 term (λ/2)‖W‖² on the weights (not the biases), ≥ 0.
        momentum: heavy-ball μ on the preconditioned step, in [0, 1).
        seed: seed of the generator that draws the targets of ``kind="mc"``.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._structure = mlp_structure(model)
        self._model = model
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
        super().__init__(list(model.parameters()), defaults)
        if len(self.param_groups) != 1:
            raise ValueError("KFAC does not support parameter groups")

    # -- state ---------------------------------------------------------------------------------
    def _layer_state(self, info) -> dict:
        """Per layer (kept on its weight): A, G, the damped inverses, the momentum buffer."""
        return self.state[info.linear.weight]

    def _global_state(self) -> dict:
        """The step count and the generator state (kept on the first layer's weight)."""
        return self._layer_state(self._structure.layers[0])

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device).manual_seed(self.seed)
        saved = self._global_state().get("generator")
        if saved is not None:
            gen.set_state(torch.frombuffer(bytearray(saved), dtype=torch.uint8))
        return gen

    # -- one step --------------------------------------------------------------------------------
    def _forward(self, closure: Callable[[], Tensor]):
        """Run the closure with hooks capturing each layer's input a and output s and the
        model's output z; returns (loss, [a], [s], z)."""
        inputs: dict[int, Tensor] = {}
        outputs: dict[int, Tensor] = {}
        final: list[Tensor] = []

        def capture(j):
            def hook(module, args, out):
                inputs[j] = args[0].detach()
                outputs[j] = out

            return hook

        layers = self._structure.layers
        hooks = [info.linear.register_forward_hook(capture(j)) for j, info in enumerate(layers)]
        hooks.append(self._model.register_forward_hook(lambda m, a, out: final.append(out)))
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            for h in hooks:
                h.remove()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError("the KFAC closure must return the loss as a one-element tensor")
        if not final or len(inputs) != len(layers):
            raise RuntimeError("the KFAC closure must evaluate the model (call model(X))")
        if loss.grad_fn is None:
            raise RuntimeError(
                "the loss the KFAC closure returns has no graph: compute it from model(X) "
                "with gradients enabled"
            )
        n = len(layers)
        return loss, [inputs[j] for j in range(n)], [outputs[j] for j in range(n)], final[-1]

    def _output_grads(self, loss: Tensor, z: Tensor, outputs: list[Tensor], params) -> tuple:
        """(per-layer lists of per-sample output gradients g_ic, ∇L of the parameters)."""
        n = z.shape[0]
        if self.kind == "empirical":
            grads = _grad(loss, [*outputs, *params], retain=False)
            return [[n * g] for g in grads[: len(outputs)]], grads[len(outputs) :]
        zd = z.detach()
        if self.kind == "mc":
            gen = self._generator(zd.device)
            columns = [self._loss.grad_output(zd, self._loss.sample_targets(zd, gen))]
            # as bytes: load_state_dict would cast a tensor to the parameters' dtype
            self._global_state()["generator"] = bytes(gen.get_state().tolist())
        else:
            # H_z of these losses does not depend on the target (canonical links): the
            # model's own prediction stands in for y
            L = self._loss.hessian_output_sqrt(zd, self._loss.predict(zd))
            columns = [L[:, :, c] for c in range(L.shape[2])]
        per_layer: list[list[Tensor]] = [[] for _ in outputs]
        for col in columns:
            for j, g in enumerate(_grad(z, outputs, col)):
                per_layer[j].append(g)
        return per_layer, _grad(loss, params, retain=False)

    def _update_factors(self, inputs: list[Tensor], per_layer: list[list[Tensor]]) -> None:
        """A ← ρA + (1 − ρ)A_k, G likewise (the first step takes A_k, G_k)."""
        r = self.ema
        for info, a, gs in zip(self._structure.layers, inputs, per_layer):
            w = a.new_full((len(a),), 1.0 / len(a))
            f = layer_factors(info, a, gs, w)
            st = self._layer_state(info)
            if "A" not in st:
                st["A"], st["G"] = f.A, f.G
            else:
                st["A"] = r * st["A"] + (1 - r) * f.A
                st["G"] = r * st["G"] + (1 - r) * f.G

    def _inverse(self, gamma: float, refresh: bool) -> KroneckerInverse:
        """The damped inverses, recomputed when ``refresh`` (or never computed)."""
        layers = self._structure.layers
        states = [self._layer_state(info) for info in layers]
        if refresh or any("A_inv" not in st for st in states):
            inv = KroneckerInverse.from_factors(
                layers, [st["A"] for st in states], [st["G"] for st in states], gamma
            )
            for st, a_inv, g_inv in zip(states, inv.A_inv, inv.G_inv):
                st["A_inv"], st["G_inv"] = a_inv, g_inv
        return KroneckerInverse(
            list(layers), [st["A_inv"] for st in states], [st["G_inv"] for st in states]
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One K-FAC step on the closure's batch; returns the loss before the step."""
        if closure is None:
            raise ValueError("KFAC.step needs a closure that returns the loss of model(X)")
        group = self.param_groups[0]
        params = group["params"]
        loss, inputs, outputs, z = self._forward(closure)
        with torch.enable_grad():
            per_layer, grads = self._output_grads(loss, z, outputs, params)
        for p, g in zip(params, grads):
            p.grad = g.detach().clone()
        self._update_factors(inputs, per_layer)
        glob = self._global_state()
        k = int(glob.get("step", 0))
        lam = group["weight_decay"]
        inverse = self._inverse(group["damping"] + lam, k % self.inv_every == 0)
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        g = torch.cat([g.reshape(-1) for g in grads])
        if lam:
            g = g + lam * self._weight_mask(theta) * theta
        delta = inverse.apply(g)
        if group["momentum"]:
            buf = glob.get("momentum_buffer")
            delta = delta if buf is None else group["momentum"] * buf + delta
            glob["momentum_buffer"] = delta.clone()
        theta = theta - group["lr"] * delta
        for p, t in zip(params, torch.split(theta, [p.numel() for p in params])):
            p.copy_(t.view_as(p))
        glob["step"] = k + 1
        return loss.detach()

    def _weight_mask(self, theta: Tensor) -> Tensor:
        """1 on the weight matrices, 0 on the biases (weight decay acts on weights only)."""
        mask = torch.zeros_like(theta)
        for info in self._structure.layers:
            mask[info.offset : info.offset + info.n_weight] = 1.0
        return mask


def _grad(out: Tensor, inputs: list[Tensor], grad_out: Tensor | None = None, retain=True):
    """torch.autograd.grad with the closure contract's error for a freed graph."""
    try:
        return torch.autograd.grad(out, inputs, grad_out, retain_graph=retain)
    except RuntimeError as err:
        if "backward through the graph a second time" in str(err):
            raise RuntimeError(
                "the KFAC closure must return the loss without calling loss.backward()"
            ) from err
        raise
