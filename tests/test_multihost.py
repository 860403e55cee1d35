"""Multi-process runs (proxy_jax.multihost, main.py's coordinator flags).

Two ``main.py`` processes on this machine (2 CPU devices each, JAX's gloo CPU collectives,
a loopback coordinator) must train exactly as one process on one device with the same
global batch (Norm-SoftMax + PS, MemVir, DADA); their checkpoint must resume in a single
process; a signal reaching one process stops both at the same step; a killed process makes
the other exit naming it.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from proxy_jax import multihost, summary_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.data.dataset=folder", "--config.data.input_size=16", "--config.data.resize=16",
        "--config.data.batch_size=8", "--config.data.eval_batch_size=16",
        "--config.data.num_workers=0", "--config.model.embedding_dim=8",
        "--config.steps_per_epoch=2", "--config.eval.every_epochs=1",
        "--config.log_every_steps=1", "--config.eval.num_queries=2", "--config.eval.top_k=2",
        "--config.eval.map_points=0",
        # Adam's eps of the PS/MemVir seeds: with 1e-8 Adam's first step is ±lr for any
        # non-zero gradient, so round-off of ~0 gradients (summed in another order across
        # processes) would flip whole steps.
        "--config.optimizer.eps=0.01",
        # A tenth of the default's learning rates: three steps at 2e-3 on this tiny network
        # are chaotic (the loss goes 9.8, 5.0, 8.0), so any round-off grows by orders of
        # magnitude per step and a comparison after them measures the chaos, not the code.
        "--config.optimizer.backbone_lr=2e-4", "--config.optimizer.embedding_lr=2e-4",
        "--config.optimizer.proxy_lr=1e-3"]
METHODS = {
    "norm_softmax_ps": ["--config.regularizer.name=ps", "--config.regularizer.ps_mu=1.0"],
    "memvir": ["--config.regularizer.name=memvir", "--config.regularizer.memvir_num_steps=2",
               "--config.regularizer.memvir_step_gap=0", "--config.loss.name=proxy_nca"],
    # DADA's own step, optimizers and official sampler (classes with replacement).
    "dada": ["--config=configs/dada_cub200.py", "--config.model.backbone=tiny_cnn",
             "--config.model.pretrained=", "--config.eval.nmi=False"],
}
TIMEOUT = 400  # s, one run of main.py on a busy 2-core machine


# ------------------------------------------------------------------------ resolve()

def test_single_process_without_settings():
    assert multihost.resolve(environ={}) is None
    assert multihost.resolve(num_processes=1, environ={}) is None
    # A Slurm job step of one task is a single process too.
    slurm_one = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert multihost.resolve(environ=slurm_one) is None


def test_flags_override_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert multihost.resolve(environ=env) == multihost.Settings("h0:1", 4, 3)
    assert multihost.resolve(coordinator_address="h1:2", process_id=1, local_device_ids=[0],
                             environ=env) == multihost.Settings("h1:2", 4, 1, (0,))


def test_launchers_are_left_to_jax_detection():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    assert multihost.resolve(environ=slurm) == multihost.Settings(None, None, None,
                                                                  launcher="slurm")
    ompi = {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "8"}
    assert multihost.resolve(environ=ompi).launcher == "ompi"


def test_partial_or_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="missing: num_processes, process_id"):
        multihost.resolve(coordinator_address="h0:1", environ={})
    with pytest.raises(ValueError, match="missing: coordinator_address"):
        multihost.resolve(num_processes=2, process_id=0, environ={})
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=2\), got 2"):
        multihost.resolve(coordinator_address="h0:1", num_processes=2, process_id=2, environ={})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be an integer"):
        multihost.resolve(environ={"JAX_PROCESS_ID": "one"})


def test_broadcast_and_any_process_pass_through_in_one_process():
    assert multihost.broadcast_json({"recall@1": 0.5}) == {"recall@1": 0.5}
    assert multihost.any_process(True) and not multihost.any_process(False)


# ----------------------------------------------------------------- running main.py

@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """One persistent compilation cache for this module's runs of main.py (speed only)."""
    return str(tmp_path_factory.mktemp("xla_cache_multihost"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Launch:
    """``processes`` copies of main.py forming one run (2 CPU devices each), or one process
    with one CPU device. Each process's output goes to ``<workdir>.p<i>.log``."""

    def __init__(self, workdir, args, *, processes, cache, heartbeat_timeout_s=100):
        self.logs = [f"{workdir}.p{i}.log" for i in range(processes)]
        devices = 2 if processes > 1 else 1
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_COMPILATION_CACHE_DIR=cache)
        port = _free_port()
        self.procs = []
        for i in range(processes):
            flags = [] if processes == 1 else [
                f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                f"--process_id={i}", f"--heartbeat_timeout_s={heartbeat_timeout_s}"]
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, os.path.join(REPO, "main.py"), f"--workdir={workdir}",
                     *args, *flags], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))

    def log(self, i=0) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def wait_for(self, text, i=0, timeout=TIMEOUT):
        """Blocks until process i's output contains ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.log(i):
            if self.procs[i].poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"never printed {text!r}:\n{self.log(i)[-3000:]}")
            time.sleep(0.2)

    def wait(self, timeout=TIMEOUT) -> list:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        finally:
            self.kill()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _train(workdir, args, *, processes, cache, steps):
    run = _Launch(str(workdir), args + [f"--config.num_train_steps={steps}"],
                  processes=processes, cache=cache)
    codes = run.wait()
    assert codes == [0] * processes, "\n".join(run.log(i)[-3000:] for i in range(processes))
    return run


def _losses(workdir) -> dict:
    """{step: train/loss} from the TensorBoard events (written by process 0 only)."""
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    return summary_writer.read_scalars(workdir)["train/loss"]


def _state(workdir, step) -> dict:
    """The checkpointed train state at ``step`` as NumPy, whatever topology wrote it."""
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", "latest", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata)
    return jax.device_get(checkpointer.restore(path, abstract))


def _assert_same_training(check, two, one, steps):
    """``check`` (the assert_same_training fixture) on the losses of ``steps`` and the
    states after the last of them."""
    losses_two, losses_one = _losses(two), _losses(one)
    a, b = _state(two, steps[-1]), _state(one, steps[-1])
    assert jax.tree.structure(a) == jax.tree.structure(b)
    check([losses_two[s] for s in steps], [losses_one[s] for s in steps], jax.tree.leaves(a),
          jax.tree.leaves(b), first_step=steps[0])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_train_as_one_and_resume_in_one(tiny_root, tmp_path, xla_cache, method,
                                                      assert_same_training):
    args = METHODS[method] + [f"--config.data.root={tiny_root}"] + TINY
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    run = _train(two, args, processes=2, cache=xla_cache, steps=3)
    _train(one, args, processes=1, cache=xla_cache, steps=3)
    _assert_same_training(assert_same_training, two, one, steps=[1, 2, 3])

    # Process 0 alone wrote events, pictures and metrics; the metrics (computed by process
    # 0 from the embeddings gathered from both) are the single process's.
    assert len(glob.glob(os.path.join(two, "events.out.tfevents.*"))) == 1
    assert "eval recall@1" in run.log(0) and "eval recall@1" not in run.log(1)
    with open(os.path.join(two, "metrics.json")) as f, \
            open(os.path.join(one, "metrics.json")) as g:
        metrics_two, metrics_one = json.load(f), json.load(g)
    assert metrics_two.keys() == metrics_one.keys()
    for k in metrics_one:
        if k == "history":  # one {'step', 'epoch', **metrics} per evaluation
            assert [e.keys() for e in metrics_two[k]] == [e.keys() for e in metrics_one[k]]
            for two_e, one_e in zip(metrics_two[k], metrics_one[k]):
                assert two_e == pytest.approx(one_e, abs=1e-6)
        else:
            assert metrics_two[k] == pytest.approx(metrics_one[k], abs=1e-6), k

    if method == "norm_softmax_ps":
        # The 2-process checkpoint (4 devices) resumes in 1 process (1 device) and goes on
        # exactly as the single-process run does.
        for workdir in (two, one):
            resumed = _train(workdir, args, processes=1, cache=xla_cache, steps=5)
            assert "resumed from" in resumed.log() and "at step 3" in resumed.log()
        _assert_same_training(assert_same_training, two, one, steps=[4, 5])


def test_signal_stops_all_and_dead_process_fails_the_run(tiny_root, tmp_path, xla_cache):
    args = [f"--config.data.root={tiny_root}"] + TINY + METHODS["norm_softmax_ps"] + [
        "--config.num_train_steps=100000", "--config.eval.every_epochs=100000",
        "--config.checkpoint_every_steps=2"]
    workdir = str(tmp_path / "run")

    # SIGTERM to process 1 only: both agree on a step, save there and exit cleanly.
    run = _Launch(workdir, args, processes=2, cache=xla_cache)
    run.wait_for("step 3/")
    run.procs[1].send_signal(signal.SIGTERM)
    assert run.wait() == [0, 0], run.log(0)[-3000:] + run.log(1)[-3000:]
    stopped = [int(run.log(i).split("stopped by a signal at step ")[1].split(";")[0])
               for i in (0, 1)]
    assert stopped[0] == stopped[1] >= 3
    # The save at the agreed step is the newest (the one before it is kept as well).
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints", "latest")))
    assert saved[-1] == stopped[0] and len(saved) <= 2

    # Resumed by both, then process 1 is killed: process 0 exits with an error naming it,
    # within the heartbeat timeout (plus slack for this busy machine), not never.
    run = _Launch(workdir, args, processes=2, cache=xla_cache, heartbeat_timeout_s=5)
    run.wait_for(f"resumed from {os.path.join(os.path.abspath(workdir), 'checkpoints', 'latest')}"
                 f"/{stopped[0]} at step {stopped[0]}")
    run.wait_for(f"step {stopped[0] + 4}/")
    run.procs[1].kill()
    start = time.monotonic()
    code = run.procs[0].wait(timeout=120)
    elapsed = time.monotonic() - start
    assert code != 0 and elapsed < 60, (code, elapsed)
    assert ("Task 1 heartbeat timeout" in run.log(0)
            or "stopped sending heartbeats):\n1" in run.log(0)), run.log(0)[-3000:]

    # The last complete checkpoint is intact: a single process resumes from it.
    # (an unfinished save, if the kill came during one, stays a temporary folder)
    latest = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints", "latest"))
                 if n.isdigit())
    assert latest >= stopped[0] + 2
    resumed = _Launch(workdir, [a for a in args if "num_train_steps" not in a]
                      + [f"--config.num_train_steps={latest + 1}"], processes=1, cache=xla_cache)
    assert resumed.wait() == [0], resumed.log()[-3000:]
    assert f"at step {latest}" in resumed.log()
