"""Every private Captum helper the library uses, imported in this one place.

Captum has moved private helpers between modules before; if it does again,
only this file changes. Checked against Captum 0.8 and 0.9.
"""

from captum.attr._utils.approximation_methods import approximation_parameters  # path points and weights

__all__ = ["approximation_parameters", "path_points"]


def path_points(method: str, n_steps: int):
    """``(step_sizes, alphas)`` of Captum's quadrature ``method`` with ``n_steps`` points."""
    step_sizes_func, alphas_func = approximation_parameters(method)
    return step_sizes_func(n_steps), alphas_func(n_steps)
