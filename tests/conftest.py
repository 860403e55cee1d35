"""Test-wide setup: eight fake CPU devices for the data-parallel tests.

XLA reads the flag once, when the backend starts, so it is set here, before any test
module imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
