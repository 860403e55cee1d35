"""Test-wide setup: eight fake CPU devices for the data-parallel tests, and main.py's XLA flags.

XLA reads the flag once, when the backend starts, so it is set here, before any test
module imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
from proxy_jax import xla_flags  # noqa: E402  (starts no backend)

xla_flags.apply_cpu_flags()  # what main.py runs with, so that the tests check it
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment above)

# torch, a test-only reference, imports its compiler stack (torch._dynamo, triton) lazily,
# e.g. when the first optimizer is built. Done after TensorFlow (the tfds sources) is
# loaded in the same worker, that import segfaults it; done first, it is harmless.
try:
    import torch._dynamo  # noqa: F401, E402
except ImportError:  # torch not installed: its tests skip themselves
    pass


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """XLA's persistent compilation cache for one test module: runs of the same tiny config
    compile each train step once. Speed only; the previous settings are restored after.

    Only programs that take at least a second to compile are cached: writing and reading
    every tiny eager op costs more than it saves.
    """
    import jax
    from jax._src import compilation_cache as cc  # reset: the cache reads its dir once

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: jax.config.values[n] for n in names}
    cc.reset_cache()
    jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(names[1], 1.0)
    jax.config.update(names[2], 0)
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A 4-train / 3-test class folder of 16x16 images (the embedded generator, tiny)."""
    from proxy_jax.data import embedded

    return embedded.ensure_embedded_dataset(
        str(tmp_path_factory.mktemp("tiny") / "data"), num_train_classes=4, num_test_classes=3,
        images_per_class=6, image_size=16)


@pytest.fixture(scope="session")
def tiny_config():
    """``make(root, base="default", **changes)``: the config module ``configs/<base>.py`` with
    its real loss, method, optimizers and schedule, shrunk to tiny_cnn (D = 8, no
    pretrained file) on 16x16 images, batch 8, no pictures; ``changes`` are dotted fields
    (``**{"loss.name": ...}``)."""
    import importlib

    def make(root, base="default", **changes):
        c = importlib.import_module(f"configs.{base}").get_config()
        c.data.dataset = "folder"
        c.data.root = root
        c.data.input_size = c.data.resize = 16
        c.data.batch_size = 8
        c.data.eval_batch_size = 16
        c.data.num_workers = 0
        c.model.backbone, c.model.pretrained = "tiny_cnn", ""
        c.model.embedding_dim = 8
        c.log_every_steps = 1
        c.eval.nmi = False
        c.eval.num_queries = 0
        c.eval.map_points = 0
        c.update_from_flattened_dict(changes)
        return c
    return make
