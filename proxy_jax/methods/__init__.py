"""Training methods: how one batch becomes an update, as plug-ins of the one trainer.

``config.method`` names one of :data:`METHODS`; each is a
:class:`~proxy_jax.methods.base.Method` (its config sections, its checks, its model head and
the :class:`~proxy_jax.methods.base.Plan` it sets up). ``proxy_jax.train`` runs any of them
and names none.

* ``'proxy'``: a loss of ``proxy_jax.objective`` with its regularizer chain, one optimizer
  (:mod:`proxy_jax.methods.proxy`);
* ``'dada'``: DADA's two-player game (:mod:`proxy_jax.methods.dada`).
"""

from proxy_jax.methods import dada, proxy
from proxy_jax.methods.base import (Method, Plan, TrainState, create_model, forward_global,
                                    init_network, network_params)

__all__ = ["METHODS", "get_method", "Method", "Plan", "TrainState", "create_model",
           "forward_global", "init_network", "network_params"]

METHODS = {m.name: m for m in (proxy.METHOD, dada.METHOD)}


def get_method(name: str) -> Method:
    """The method ``config.method`` names; ValueError listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"config.method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
