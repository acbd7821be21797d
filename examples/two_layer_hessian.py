"""The Hessian of a two-layer network with squared error, block by block.

The network of the classic question "second derivative of a neural network cost function":
x ∈ R², three hidden sigmoid units, one sigmoid output, no biases,

    z⁽²⁾ = W⁽¹⁾x,  a⁽²⁾ = f(z⁽²⁾),  z⁽³⁾ = W⁽²⁾a⁽²⁾,  ŷ = f(z⁽³⁾),  J = ½ Σ_i (y_i − ŷ_i)².

(W⁽¹⁾ is stored as torch does, hidden × input, so a weight index is (unit, input).) With
e = ŷ − y, δ₃ = e f′(z⁽³⁾) and h₃ = f′(z⁽³⁾)² + e f″(z⁽³⁾) = ∂²ℓ/∂z⁽³⁾², per sample:

    c = ∂²ℓ/∂W⁽²⁾²          = h₃ a⁽²⁾a⁽²⁾ᵀ
    H_Z⁽²⁾ = ∂²ℓ/∂z⁽²⁾²     = h₃ (W⁽²⁾ᵀW⁽²⁾) ⊙ f′(z⁽²⁾)f′(z⁽²⁾)ᵀ + diag(f″(z⁽²⁾) ⊙ δ₃W⁽²⁾)
    a = ∂²ℓ/∂W⁽¹⁾²          : a[(j,k),(j′,k′)] = H_Z⁽²⁾[j,j′] x_k x_k′
    b = ∂²ℓ/∂W⁽¹⁾∂W⁽²⁾      : b[(j,k), j′] = h₃ W⁽²⁾_j f′(z⁽²⁾_j) x_k a⁽²⁾_j′
                                              + δ₃ [j = j′] f′(z⁽²⁾_j) x_k

The last term of b is the bilinear one: W⁽²⁾ multiplies a⁽²⁾, which depends on W⁽¹⁾. Summed
over samples, H = [[a, b], [bᵀ, c]]. The script computes the blocks three ways — these
formulas, ``secondorder.curvature.hessian_blocks`` (whose loss is the *mean* of ½‖y − ŷ‖², so
it is scaled by N) and ``torch.func.hessian`` — prints them and the largest differences, and
exits with status 1 if they disagree.

    python examples/two_layer_hessian.py
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from secondorder.curvature import hessian_blocks
from secondorder.models import Sigmoid

f64 = torch.float64


def build(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """The 2-3-1 sigmoid network without biases and a few samples (hours studied, slept)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(2, 3, bias=False), Sigmoid(), nn.Linear(3, 1, bias=False), Sigmoid()
    ).to(f64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=f64))
    X = torch.tensor([[3.0, 5.0], [5.0, 1.0], [10.0, 2.0], [6.0, 1.5]], dtype=f64) / 10
    y = torch.tensor([[0.75], [0.82], [0.93], [0.70]], dtype=f64)
    return model, X, y


def by_formulas(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor):
    """a, b, c of the summed cost from the closed forms in the module docstring."""
    W1, W2 = model[0].weight.detach(), model[2].weight.detach()
    f = Sigmoid()
    z2 = X @ W1.T
    a2, d2, dd2 = f.derivatives(z2)  # (N, 3)
    z3 = a2 @ W2.T
    yhat, d3, dd3 = f.derivatives(z3)  # (N, 1)
    e = (yhat - y)[:, 0]
    delta3 = e * d3[:, 0]
    h3 = d3[:, 0] ** 2 + e * dd3[:, 0]
    w = W2[0]  # (3,)
    c = torch.einsum("i,ij,iJ->jJ", h3, a2, a2)
    hz2 = h3[:, None, None] * (w[:, None] * w[None, :]) * (d2[:, :, None] * d2[:, None, :])
    hz2 = hz2 + torch.diag_embed(dd2 * delta3[:, None] * w)
    a = torch.einsum("ijJ,ik,iK->jkJK", hz2, X, X).reshape(6, 6)
    b_ggn = torch.einsum("i,j,ij,ik,iJ->jkJ", h3, w, d2, X, a2)
    b_bil = torch.einsum("i,ij,ik,jJ->jkJ", delta3, d2, X, torch.eye(3, dtype=f64))
    b = (b_ggn + b_bil).reshape(6, 3)
    return a, b, c


def by_autograd(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torch.func.hessian of J = ½ Σ (y − ŷ)² in θ = (vec W⁽¹⁾, vec W⁽²⁾)."""
    W1, W2 = model[0].weight.detach(), model[2].weight.detach()

    def cost(theta: torch.Tensor) -> torch.Tensor:
        w1, w2 = theta[:6].view(3, 2), theta[6:].view(1, 3)
        yhat = torch.sigmoid(torch.sigmoid(X @ w1.T) @ w2.T)
        return 0.5 * ((y - yhat) ** 2).sum()

    return torch.func.hessian(cost)(torch.cat([W1.reshape(-1), W2.reshape(-1)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="weights' random seed")
    parser.add_argument("--quiet", action="store_true", help="print only the errors")
    args = parser.parse_args(argv)
    torch.set_printoptions(precision=5, linewidth=120, sci_mode=False)

    model, X, y = build(args.seed)
    N = X.shape[0]
    a, b, c = by_formulas(model, X, y)
    blocks = hessian_blocks(model, X, y, loss="mse")
    lib = {k: N * v for k, v in blocks.items()}  # mean of ½‖y − ŷ‖² → sum
    H = torch.cat([torch.cat([a, b], 1), torch.cat([b.T, c], 1)], 0)
    H_lib = torch.cat(
        [torch.cat([lib[(0, 0)], lib[(0, 1)]], 1), torch.cat([lib[(1, 0)], lib[(1, 1)]], 1)], 0
    )
    H_ref = by_autograd(model, X, y)

    if not args.quiet:
        print("a = d²J/dW1²  (6×6, rows and columns (hidden unit j, input k))")
        print(a)
        print("\nb = d²J/dW1 dW2  (6×3)")
        print(b)
        print("\nc = d²J/dW2²  (3×3)")
        print(c)
        print("\nH = [[a, b], [bᵀ, c]]: eigenvalues", torch.linalg.eigvalsh(H))
    err_formula = float((H - H_ref).abs().max())
    err_library = float((H_lib - H_ref).abs().max())
    print(f"max |H_formulas − H_torch.func| = {err_formula:.3e}")
    print(f"max |H_secondorder − H_torch.func| = {err_library:.3e}")
    scale = float(H_ref.abs().max())
    ok = max(err_formula, err_library) <= 1e-12 * max(scale, 1.0)
    print("agree" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
