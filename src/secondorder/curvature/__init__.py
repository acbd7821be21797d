"""Exact curvature of neural networks: Hessians, Gauss–Newton matrices, blocks and spectra.

Two engines with one face. Sequential MLPs (``nn.Linear`` layers and elementwise activations
with closed-form σ′, σ″) use exact second-order backpropagation (Appendix B): the full
Hessian, every layer and cross-layer block, the diagonal, the Gauss–Newton matrix and the
per-sample H_Z, by batched contractions over samples. Any other ``nn.Module`` goes through the
``torch.func`` fallback, with a warning that says why; :func:`supports_fast_path` tells ahead.

Parameters are ordered as ``torch.nn.utils.parameters_to_vector(model.parameters())``; the
objective is the mean loss plus (l2/2)·‖W‖² over weight matrices. Dense results are refused
before allocation when they would not fit (``max_bytes``); the matrix-free operators, Lanczos,
stochastic Lanczos quadrature and Hutchinson's estimator scale to any size.
"""

from secondorder.curvature.backprop import (
    LayerInfo,
    MLPStructure,
    analyse_mlp,
    ggn,
    ggn_diagonal,
    hessian,
    hessian_blocks,
    hessian_diagonal,
    layer_ggns,
    layer_hessians,
    per_sample_hz,
    supports_fast_path,
)
from secondorder.curvature.operators import (
    CurvatureOperator,
    GGNOperator,
    HessianOperator,
    SpectralDensity,
    TraceEstimate,
    hutchinson_trace,
    lanczos_eigs,
    spectral_density,
)
from secondorder.curvature.saddle import (
    ActivationCurvature,
    LayerCurvature,
    SaddleReport,
    saddle_report,
)

__all__ = [
    "ActivationCurvature",
    "CurvatureOperator",
    "GGNOperator",
    "HessianOperator",
    "LayerCurvature",
    "LayerInfo",
    "MLPStructure",
    "SaddleReport",
    "SpectralDensity",
    "TraceEstimate",
    "analyse_mlp",
    "ggn",
    "ggn_diagonal",
    "hessian",
    "hessian_blocks",
    "hessian_diagonal",
    "hutchinson_trace",
    "lanczos_eigs",
    "layer_ggns",
    "layer_hessians",
    "per_sample_hz",
    "saddle_report",
    "spectral_density",
    "supports_fast_path",
]
