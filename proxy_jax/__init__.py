"""proxy_jax: proxy-based deep metric learning in JAX/Flax.

Submodules (imported on demand so that ``import proxy_jax.losses`` stays light):

* ``proxy_jax.losses``        pure proxy losses (Norm-SoftMax, Proxy-NCA, Proxy-Anchor, HPHN triplet)
* ``proxy_jax.regularizers``  proxy synthesis, embedding expansion, MemVir, DADA
* ``proxy_jax.evaluation``    kNN retrieval and clustering metrics on the host
* ``proxy_jax.models``        Flax backbones, embedding heads, PyTorch weight import
* ``proxy_jax.data``          datasets, samplers, transforms, input pipeline
"""

__version__ = "0.1.0"
