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

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")

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
flags.DEFINE_bool("keep_freed_memory", True, "glibc malloc keeps freed memory for reuse "
                  "instead of unmapping it, so XLA's per-step buffers do not page-fault every "
                  "step on the CPU (see proxy_jax/malloc.py).")
FLAGS = flags.FLAGS


class _QuietOrbax:
    """Drops orbax's per-save INFO lines (dozens per checkpoint); warnings pass."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietOrbax())
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
    if FLAGS.mode == "train":
        metrics = train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == "evaluate":
        metrics = train.evaluate_checkpoint(config, workdir)
    else:
        if not FLAGS.embed_folder:
            raise app.UsageError("--mode=embed needs --embed_folder")
        output = FLAGS.embed_output or os.path.join(workdir, "embeddings.npz")
        metrics = train.embed_folder(config, workdir, FLAGS.embed_folder, output)
    logging.info("done: %s", metrics)
    if multihost.is_primary():
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


if __name__ == "__main__":
    app.run(main)
