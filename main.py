"""proxy_jax entry point: train and evaluate a config, evaluate a checkpoint, or embed a folder.

  python main.py                                   # train + evaluate configs/default.py
  python main.py --config=configs/cars196_ps_norm_softmax.py --config.data.root=/data/carDB
  python main.py --config=... --mode=evaluate      # metrics + pictures of the best checkpoint
  python main.py --config=... --mode=embed --embed_folder=imgs/ --embed_output=emb.npz

``--config.x.y=value`` overrides any field (an unknown field or a wrong type is an error
naming it). The workdir defaults to ./workdir/<config.name>; running the same command again
resumes from its latest checkpoint.

Several processes (machines) form one run when given a coordinator (see
``proxy_jax.multihost``), e.g. on two machines:

  python main.py --config=... --workdir=/shared/run --coordinator_address=host0:1234 \
      --num_processes=2 --process_id=0          # and --process_id=1 on the other
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# TensorFlow only writes TensorBoard files and reads tfds here; its oneDNN kernels are never
# used, and the notice that they are on would be printed (twice) before every run's output.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _fail(message: str) -> None:
    """Ends the program with one line on stderr and exit status 1."""
    sys.exit(f"main.py: error: {message}")


def _config_file(argv) -> str:
    """The --config=FILE of the command line (what config_flags reads), or the default."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return _DEFAULT_CONFIG


def _check_config_arguments(argv) -> None:
    """One line for a missing config file or an override of a field that does not exist.

    config_flags applies ``--config.x.y=…`` while the flag is defined; its own errors are a
    traceback ending in ``AttributeError: "'x'"``. This reads the same file first and
    names the whole dotted path and the closest fields instead.
    """
    from proxy_jax import config_utils

    path = _config_file(argv)
    if not os.path.isfile(path):
        _fail(f"config file {path!r} not found; the configs are in "
              f"{os.path.dirname(_DEFAULT_CONFIG)} (e.g. --config=configs/default.py)")
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not overrides:
        return
    config = config_utils.load_config_file(path)
    for override in overrides:
        message = config_utils.unknown_field_message(config, override, source=path)
        if message is not None:
            _fail(f"--config.{override}: {message}")


if __name__ == "__main__" and not any(a in _HELP_FLAGS for a in sys.argv[1:]):
    _check_config_arguments(sys.argv[1:])
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and pictures (default "
                    "./workdir/<config.name>).")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "embed"],
                  "train: train and evaluate; evaluate: evaluate the best checkpoint; embed: "
                  "write embeddings of --embed_folder.")
flags.DEFINE_string("embed_folder", None, "Images to embed (class folders or a flat folder).")
flags.DEFINE_string("embed_output", None, "Output .npz of --mode=embed (default "
                    "<workdir>/embeddings.npz).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process "
                    "run (default: $JAX_COORDINATOR_ADDRESS, or a Slurm/Open MPI launch).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run (default: "
                     "$JAX_NUM_PROCESSES or the launcher's).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) "
                     "(default: $JAX_PROCESS_ID or the launcher's).")
flags.DEFINE_list("local_device_ids", None, "The local devices this process uses (default: "
                  "all, or one per task under Slurm/Open MPI).")
flags.DEFINE_integer("heartbeat_timeout_s", 100, "A multi-process run fails when a process has "
                     "been silent this long; the others then exit naming it.")
flags.DEFINE_integer("initialization_timeout_s", 300, "How long processes wait for each other "
                     "to join a multi-process run.")
flags.DEFINE_bool("traceback", False, "On an error, show the full traceback instead of the "
                  "one line that names the problem.")
flags.DEFINE_bool("keep_freed_memory", True, "glibc malloc keeps freed memory for reuse "
                  "instead of unmapping it, so XLA's per-step buffers do not page-fault every "
                  "step on the CPU (see proxy_jax/malloc.py).")
FLAGS = flags.FLAGS


class _QuietLibraries:
    """Drops the INFO lines of orbax (dozens per checkpoint), of JAX's backend probe
    ("Unable to initialize backend 'tpu'" on every machine without one, printed before a
    one-line error too) and of faiss's loader (one per instruction set its wheel was not
    built for); their warnings pass."""

    _SOURCES = ("/orbax/", "/jax/_src/xla_bridge.py", "/faiss/loader.py")

    def filter(self, record):
        return (record.levelno >= std_logging.WARNING
                or not any(s in record.pathname for s in self._SOURCES))


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags are written --name=value")
    if FLAGS.mode == "embed" and not FLAGS.embed_folder:
        _fail("--mode=embed needs --embed_folder=FOLDER (the images to embed)")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if FLAGS.keep_freed_memory:  # before JAX starts its threads
        from proxy_jax import malloc
        malloc.keep_freed_memory()
    from proxy_jax import xla_flags

    xla_flags.apply_cpu_flags()  # before JAX starts a backend
    from proxy_jax import multihost

    settings = multihost.resolve(
        coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        local_device_ids=[int(i) for i in FLAGS.local_device_ids or ()])
    if settings is not None:  # before anything starts a JAX backend
        multihost.initialize(settings, heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
                             initialization_timeout_s=FLAGS.initialization_timeout_s)
        if not multihost.is_primary():  # process 0 reports progress; the others warn only
            logging.set_verbosity(logging.WARNING)
    from proxy_jax import train  # after flag parsing: keeps --help fast

    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("workdir", config.name)
    try:
        if FLAGS.mode == "train":
            result = train.train_and_evaluate(config, workdir)
        elif FLAGS.mode == "evaluate":
            result = train.evaluate_checkpoint(config, workdir)
        else:
            output = FLAGS.embed_output or os.path.join(workdir, "embeddings.npz")
            result = train.embed_folder(config, workdir, FLAGS.embed_folder, output)
    except (ValueError, OSError, ImportError, FloatingPointError) as error:
        # Bad input (a config value, a folder, an image, a checkpoint), an optional extra a
        # config needs and the machine lacks, or a NaN loss: the message names it.
        # --traceback shows where it was raised.
        if FLAGS.traceback:
            raise
        _fail(" ".join(str(error).split()) or type(error).__name__)
    except KeyboardInterrupt:
        # A second Ctrl-C (the first one saves a checkpoint and stops at the next step).
        if FLAGS.traceback:
            raise
        sys.exit("main.py: interrupted; run the same command again to resume from the last "
                 "checkpoint")
    if multihost.is_primary():
        print(summary(FLAGS.mode, result))


def _values(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items())


def summary(mode: str, result: dict) -> str:
    """The final line: the step reached, each metric beside the step it was measured at, and
    the best evaluation (what the papers publish) with its epoch when it is not the last."""
    result = dict(result)
    if mode == "embed":
        return (f"embedded {result['num_images']} images ({result['dim']}-d) with the checkpoint "
                f"of step {result['step']}")
    step = result.pop("step")
    measured = result.pop("metrics_step", step)
    best = dict(result.pop("best", None) or {})
    values = _values(result)
    if not values:
        return f"step {step}; no evaluation yet"
    line = (f"step {step}: {values}" if measured == step
            else f"step {step}; last evaluation at step {measured}: {values}")
    best_step, best_epoch = best.pop("step", None), best.pop("epoch", None)
    if best and best_step != measured:
        where = "" if best_step is None else f" at epoch {best_epoch} (step {best_step})"
        line += f"; best{where}: {_values(best)}"
    return line


def _run() -> None:
    try:
        app.run(main)
    except SystemExit as exit_:
        # absl's --help prints the help and exits with status 1; asking for help is no error.
        if exit_.code == 1 and any(a in _HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        raise


if __name__ == "__main__":
    _run()
