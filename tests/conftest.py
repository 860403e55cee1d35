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


def _assert_same_training(losses, reference_losses, leaves=(), reference_leaves=(), *,
                          first_step=1):
    """Two runs of the same training that differ only in the order float32 sums are taken
    (device count, process count, convolution implementation) agree to round-off on their
    first step, and after it by the optimizer's amplification of that round-off.

    Keep the training calm: at the default config's learning rates three tiny_cnn steps are
    chaotic (loss 9.8, 5.0, 8.0), and on a Xeon with AMX (2026-12) 2 processes and 1 ended
    1.1e-5 relative apart in the third loss and 4e-5 apart in parameters; at a tenth of
    them, 1.4e-7 and 1.4e-6 (tests/test_multihost.py). A real fault (a loss that sees only
    the local batch, a wrong batch split, statistics of one device) moves these numbers by
    1e-2 or more.

    Args:
      losses, reference_losses: [S] losses of steps first_step .. first_step + S - 1.
      leaves, reference_leaves: the states' arrays after the last step, in the same order.
      first_step: the step of losses[0]; only step 1 is held to 1e-5.
    """
    import numpy as np

    assert len(losses) == len(reference_losses)
    for i, (a, b) in enumerate(zip(losses, reference_losses)):
        step = first_step + i
        np.testing.assert_allclose(a, b, rtol=1e-5 if step == 1 else 1e-4, atol=1e-6,
                                   err_msg=f"loss of step {step}")
    leaves, reference_leaves = list(leaves), list(reference_leaves)
    assert len(leaves) == len(reference_leaves)
    single_step = first_step == 1 and len(losses) == 1
    for i, (a, b) in enumerate(zip(leaves, reference_leaves)):
        np.testing.assert_allclose(a, b, rtol=1e-5 if single_step else 1e-4, atol=1e-5,
                                   err_msg=f"state leaf {i}")


@pytest.fixture(scope="session")
def assert_same_training():
    """:func:`_assert_same_training`, the tolerance rule of every "trains the same" test."""
    return _assert_same_training
