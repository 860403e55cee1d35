"""Training: one loop for every method, with its checkpoints, logs and evaluation.

Reads top to bottom: the data of a config, :func:`build` (everything a run derives from
its config: mesh, data, model, and the method's :class:`~proxy_jax.methods.base.Plan`),
checkpoints with their resume rules, and :func:`train_and_evaluate` (the loop), then the
two other modes of ``main.py``, :func:`evaluate_checkpoint` and :func:`embed_folder`.

The loop names no method: the configured one (``config.method``, ``proxy_jax.methods``)
gives the initial state, the pure step (made data-parallel once, ``proxy_jax.parallel``),
the learning rates it reports and its host-side batch check.

Several processes (``proxy_jax.multihost``): each process loads only its contiguous slice
of every global batch, so the assembled batch, and everything computed from it, is the
single-process one. Process 0 alone computes the metrics (then shared with the others),
writes TensorBoard events, pictures and ``metrics.json``; orbax writes each checkpoint
once, from all processes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable, Iterable, NamedTuple, Optional

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from proxy_jax import (checkpoints, config_utils, inference, methods, models, multihost, parallel,
                       summary_writer)
from proxy_jax.data import datasets, pipeline, samplers, splits, transforms
from proxy_jax.methods.base import Plan, TrainState

__all__ = ["Run", "load_data", "build", "train_and_evaluate", "evaluate_checkpoint",
           "embed_folder", "check_workdir", "check_input_files", "CHECKPOINT_FORMAT"]

# The layout of the train state in a checkpoint. 1: one ``memory`` slot (before methods
# named their state); 2: ``extra``, by name.
CHECKPOINT_FORMAT = 2


# ---------------------------------------------------------------------------------- data

def load_data(config: ml_collections.ConfigDict) -> splits.Splits:
    """The splits of ``config.data`` (the embedded set is written if needed)."""
    d = config.data
    return splits.load_splits(d.dataset, d.root, tfds_name=d.tfds_name)


def make_train_sampler(config: ml_collections.ConfigDict, dataset):
    """The sampler ``config.data.sampler`` names (``proxy_jax.data.samplers.SAMPLERS``).

    Plain shuffling ('shuffle', or 'class_balanced' with ``n_instance`` 1) needs only
    ``len(dataset)``; the others read the labels, ``dataset.targets``.
    """
    name, n_instance = config.data.sampler, config.data.n_instance
    if name == "shuffle" or (name == "class_balanced" and n_instance == 1):
        return samplers.ShuffleSampler(len(dataset))
    return samplers.make_sampler(name, dataset.targets, n_instance=n_instance)


def steps_per_epoch_of(config: ml_collections.ConfigDict, sampler) -> int:
    """``config.steps_per_epoch``, or the sampler's number of global batches per epoch: the
    full ones (``config.data.drop_last``) or ``ceil(N / B)`` with the padded partial one."""
    if config.steps_per_epoch > 0:
        return config.steps_per_epoch
    steps = sampler.num_batches(batch_size=config.data.batch_size,
                                drop_remainder=bool(config.data.drop_last))
    if steps < 1:
        raise ValueError(f"config.data.batch_size ({config.data.batch_size}) is larger than an "
                         "epoch of the training set")
    return steps


# ----------------------------------------------------------------------------- the run

class Run(NamedTuple):
    """What a run derives from its config (shared by training, evaluation and embedding).

    Attributes:
      config: the config.
      mesh: the data-parallel mesh.
      data: its :class:`~proxy_jax.data.splits.Splits`.
      model: the embedding network (with the method's head).
      method: the :class:`~proxy_jax.methods.base.Method` of ``config.method``.
      plan: the method's :class:`~proxy_jax.methods.base.Plan`; ``plan.state`` is the
        initial state, replicated over the mesh.
      sampler: the training sampler.
      steps_per_epoch, total_steps: the step counts.
    """

    config: Any
    mesh: Mesh
    data: splits.Splits
    model: Any
    method: methods.Method
    plan: Plan
    sampler: Any
    steps_per_epoch: int
    total_steps: int

    @property
    def state(self) -> TrainState:
        return self.plan.state


def build(config: ml_collections.ConfigDict) -> Run:
    """Everything a run of ``config`` needs, checked in order of cost: the config's values,
    the files it names, the mesh and batch size, then the data, the model and the method's
    plan (initial state, step, optimizer)."""
    config_utils.validate(config)
    check_input_files(config)
    method = methods.get_method(config.method)
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_batch_size(config.data.batch_size, mesh)
    data = load_data(config)
    sampler = make_train_sampler(config, data.train)
    steps_per_epoch = steps_per_epoch_of(config, sampler)
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else config.num_epochs * steps_per_epoch)
    model = methods.create_model(config, **method.model_overrides(config))
    plan = method.setup(config, model, num_classes=data.num_classes,
                        steps_per_epoch=steps_per_epoch)
    plan = plan._replace(state=parallel.replicate(plan.state, mesh))
    return Run(config, mesh, data, model, method, plan, sampler, steps_per_epoch, total_steps)


def check_workdir(workdir: str) -> None:
    """A workdir must be a folder or not exist yet (it is created then)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir!r} is a file, not a folder; pass a folder (it is "
                         "created if it does not exist)")


def check_input_files(config: ml_collections.ConfigDict) -> None:
    """The files a config names exist: checked first, before the seconds of start-up."""
    pretrained = config.model.pretrained
    if pretrained and not os.path.isfile(pretrained):
        raise FileNotFoundError(
            f"config.model.pretrained: weight file {pretrained!r} not found; write one with "
            "`python -m proxy_jax.convert` (see the README), or train from scratch with "
            "--config.model.pretrained=''")
    root, dataset = config.data.root, config.data.dataset
    if dataset == "tfds" and root and not os.path.isdir(root):
        raise FileNotFoundError(f"config.data.root: tfds data directory {root!r} not found; "
                                "pass the folder tfds prepared the data set in, or '' for "
                                "tfds' default")
    if dataset not in ("embedded", "tfds") and root and not os.path.isdir(root):
        raise FileNotFoundError(f"config.data.root: data set folder {root!r} not found; pass "
                                f"the folder of the {dataset} data set")


# --------------------------------------------------------------------------- checkpoints

@flax.struct.dataclass
class _StateV1:
    """The train state as checkpoint format 1 laid it out (read only)."""

    step: Any
    params: Any
    batch_stats: Any
    opt_state: Any
    memory: Any
    key: Any


def _restore(run: Run, checkpointer: checkpoints.Checkpointer, *, prefer_best: bool = False
             ) -> checkpoints.Restored:
    """The newest intact checkpoint of the run (see ``proxy_jax.checkpoints``), in format 2.

    A format-1 checkpoint is read in its own layout and converted when the method says
    which entry of ``extra`` its ``memory`` slot held; otherwise it is refused, saying why.
    """
    state = run.state
    slot = run.method.legacy_slot
    legacy = slot is not None and (slot in state.extra or not state.extra)

    def layout(record):
        if record.get("format", 1) >= 2:
            checkpoints.check_compatible(record, state, directory=checkpointer.directory)
            return state, lambda restored: restored
        if not legacy:
            raise checkpoints.CheckpointError(
                f"the checkpoint in {checkpointer.directory} was written by an earlier "
                f"proxy_jax (checkpoint format 1) whose {run.method.name!r} state this version "
                "lays out differently; nothing was overwritten. Resume it with the proxy_jax "
                "that wrote it, or train in another --workdir")
        old = _StateV1(state.step, state.params, state.batch_stats, state.opt_state,
                       state.extra.get(slot, {}), state.key)
        checkpoints.check_compatible(record, old, directory=checkpointer.directory)

        def convert(restored):
            extra = {slot: restored.memory} if slot in state.extra else {}
            return TrainState(restored.step, restored.params, restored.batch_stats,
                              restored.opt_state, extra, restored.key)
        return old, convert

    return checkpointer.restore(state, prefer_best=prefer_best, layout=layout)


# ------------------------------------------------------------------------------ the loop

class _StopOnSignal:
    """SIGINT/SIGTERM → ``requested`` is set; the loop saves a checkpoint and returns.

    A second signal gets the previous handler (e.g. Ctrl-C twice interrupts at once).
    """

    def __init__(self):
        self.requested: Optional[int] = None
        self._previous = {}

    def _handler(self, signum, frame):
        del frame
        self.requested = signum
        logging.warning("received signal %d: saving a checkpoint and stopping", signum)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _flatten_config(config: ml_collections.ConfigDict) -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update({f"{key}.{k}": v for k, v in _flatten_config(value).items()})
        else:
            out[key] = str(value) if isinstance(value, (tuple, list)) else value
    return out


def _evaluation(run: Run, step: int, metrics: dict) -> dict:
    """``{'step', 'epoch', **metrics}``: an evaluation after ``epoch`` whole epochs."""
    return {"step": step, "epoch": step // run.steps_per_epoch, **metrics}


def _best_of(record: dict) -> dict:
    """The best evaluation a checkpoint record holds (:func:`_evaluation`'s form); records
    written before the best evaluation was kept whole have its Recall@1 only."""
    if "best_evaluation" in record:
        return dict(record["best_evaluation"])
    recall = float(record.get("best_recall@1", -1.0))
    return {"step": None, "epoch": None, "recall@1": recall} if recall >= 0 else {}


def _history_of(record: dict, step: int) -> list:
    """The evaluations a checkpoint record holds, up to its ``step`` (:func:`_evaluation`'s
    form, in order); records written before the history was kept give their best only."""
    if "evaluations" in record:
        return [dict(e) for e in record["evaluations"] if e["step"] <= step]
    best = _best_of(record)
    return [best] if best.get("step") is not None else []


def _record(run: Run, state: TrainState, *, loader_state, best_eval: dict, history: list,
            metrics: dict, metrics_step: Optional[int]) -> dict:
    """The JSON record saved beside the state; ``metrics`` are those of ``metrics_step``,
    ``best_eval`` the evaluation with the highest Recall@1 so far and ``history`` every
    evaluation so far (:func:`_evaluation`)."""
    c = run.config
    return {
        "step": int(jax.device_get(state.step)),
        "loader": checkpoints.loader_state_to_json(loader_state),
        "best_evaluation": best_eval,
        "evaluations": history,
        "metrics": metrics,
        "metrics_step": metrics_step,
        "format": CHECKPOINT_FORMAT,
        "model": {"backbone": c.model.backbone, "embedding_dim": c.model.embedding_dim,
                  "num_classes": run.data.num_classes, "method": c.method,
                  **run.plan.describe},
        "config": c.to_json(),
        "shapes": checkpoints.shape_signature(state),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       hooks: Iterable[Callable[[int, TrainState], None]] = (),
                       evaluation_hooks: Iterable[Callable[[dict], None]] = ()) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its checkpoint) and evaluates it.

    Writes ``workdir/checkpoints/{latest,best}``, TensorBoard events, ``metrics.json`` (the
    last evaluation, its ``step`` and ``epoch``, ``total_steps`` (the run is complete when
    ``step`` reaches it), under ``best`` the evaluation with the highest Recall@1, which is
    what the papers publish, and under ``history`` every evaluation in order) and, at each
    evaluation, the pictures ``retrieval_step<N>.png`` and ``embedding_map_step<N>.png``.

    Args:
      config: see ``proxy_jax.config_utils``; ``config.method`` says how a batch is trained.
      workdir: the run's folder.
      hooks: called as ``hook(step, state)`` after every step (e.g. profiling, tests).
      evaluation_hooks: called as ``hook(evaluation)`` after every evaluation has been saved,
        with ``{'step', 'epoch', **metrics}`` (e.g. a hyper-parameter search reporting it; an
        exception raised there, such as a pruned trial, ends the run, its checkpoint kept).

    Returns:
      The metrics of the last evaluation, with ``step`` (reached), ``metrics_step`` (of the
      metrics) and ``best`` (``{'step', 'epoch', **metrics}`` of the best evaluation; empty
      before the first).

    Raises:
      ValueError: a bad config, or a workdir holding an incompatible checkpoint.
      FloatingPointError: the loss became NaN or infinite (the message names the step; the
        last checkpoint, written before it, is kept).
    """
    check_workdir(workdir)
    run = build(config)
    os.makedirs(workdir, exist_ok=True)
    checkpointer = checkpoints.Checkpointer(workdir)
    state = run.state
    best_eval: dict = {}  # the evaluation with the highest Recall@1 (see _evaluation)
    history: list = []  # every evaluation so far, in order (see _evaluation)
    loader_state = None
    last_metrics: dict = {}
    metrics_step: Optional[int] = None  # the step last_metrics were measured at
    # Resume order: (1) build model, optimizer and a fresh state from the config; (2) read
    # the newest checkpoint's record and refuse an incompatible one before anything is
    # written; (3) restore the state into the fresh state's structure, verifying its
    # checksum (a damaged checkpoint is set aside and the previous intact one used);
    # (4) restore the loader position; (5) restore the best Recall@1 so far and the last
    # evaluation. The step, the RNG key, the optimizer state and MemVir's memory all live
    # in the state.
    restored = record = None
    if checkpointer.latest_step() is not None or checkpointer.latest_step(best=True) is not None:
        try:
            restored = _restore(run, checkpointer)
        except BaseException:
            checkpointer.close()
            raise
    if restored is not None:
        state, record = parallel.replicate(restored.state, run.mesh), restored.record
        loader_state = checkpoints.loader_state_from_json(record["loader"])
        best_eval = _best_of(record)
        history = _history_of(record, record["step"])
        last_metrics = dict(record.get("metrics") or {})
        metrics_step = record.get("metrics_step", record["step"] if last_metrics else None)
        logging.info("resumed from %s at step %d", restored.path, record["step"])
        if record["step"] >= run.total_steps:
            checkpointer.close()
            logging.info("already finished at step %d (of %d); nothing to train", record["step"],
                         run.total_steps)
            return _result(record["step"], metrics_step, last_metrics, best_eval)

    loader = pipeline.make_loader(
        run.data.train, batch_size=config.data.batch_size, sampler=run.sampler,
        transform=transforms.transform_from_config(
            config.data, models.input_normalization(config.model.backbone), training=True),
        num_workers=config.data.num_workers, seed=config.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        drop_remainder=bool(config.data.drop_last))
    if loader_state is not None:
        loader.set_state(loader_state)
    train_iter = iter(loader)

    p_train_step = parallel.parallelize(run.plan.step_fn, run.mesh)
    embed_fn = inference.make_embed_fn(run.model, run.mesh)
    primary = multihost.is_primary()
    # Process 0 writes TensorBoard events; the others' writer drops everything (the values
    # are the same). The progress lines come from the loop's own logging.
    writer = summary_writer.SummaryWriter(workdir) if primary else summary_writer.NullWriter()
    if record is None:
        writer.write_hparams(_flatten_config(config))

    step = int(jax.device_get(state.step))
    pending: list = []  # (step, metrics on device): fetched at log time, no per-step sync
    timer = (time.perf_counter(), step)
    start_time, start_step = timer

    def check_pending():
        """Fetches the pending metrics; raises on a non-finite loss, naming its step."""
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending.clear()
        for s, m in fetched:
            if not np.isfinite(m["loss"]):
                kept = checkpointer.latest_step()
                raise FloatingPointError(
                    f"loss is {float(m['loss'])} at step {s} (epoch {(s - 1) // run.steps_per_epoch}); "
                    f"training stopped. The last good checkpoint (step {kept}) is kept in "
                    f"{checkpointer.directory}/latest")
        return fetched

    def save(*, best=False):
        rec = _record(run, state, loader_state=loader.get_state(), best_eval=best_eval,
                      history=history, metrics=last_metrics, metrics_step=metrics_step)
        checkpointer.save(state, rec, best=best)

    try:
        with _StopOnSignal() as stop:
            while step < run.total_steps:
                batch = next(train_iter)
                run.plan.check_batch(np.asarray(batch["label"]))
                state, metrics = p_train_step(state, parallel.shard_batch(batch, run.mesh))
                step += 1
                pending.append((step, metrics))
                for hook in hooks:
                    hook(step, state)

                end_of_epoch = step % run.steps_per_epoch == 0
                epoch = (step - 1) // run.steps_per_epoch
                evaluate_now = step == run.total_steps or (
                    end_of_epoch and (epoch + 1) % config.eval.every_epochs == 0)
                log_now = step % config.log_every_steps == 0
                stopping = stop.requested is not None
                if jax.process_count() > 1:
                    # A signal may reach some processes, or reach them at different steps:
                    # they agree at logging steps (a collective, so only there).
                    stopping = log_now and multihost.any_process(stopping)
                if log_now or evaluate_now or stopping:
                    fetched = check_pending()
                    now = time.perf_counter()
                    rate = (step - timer[1]) / max(now - timer[0], 1e-9)
                    timer = (now, step)
                    scalars = {f"train/{k}": float(np.mean([m[k] for _, m in fetched]))
                               for k in fetched[-1][1]}
                    scalars.update(run.plan.learning_rates(step - 1))
                    scalars["train/steps_per_sec"] = rate
                    scalars["train/images_per_sec"] = rate * config.data.batch_size
                    writer.write_scalars(step, scalars)
                    eta = (run.total_steps - step) / max(
                        (step - start_step) / max(now - start_time, 1e-9), 1e-9)
                    logging.info("step %d/%d epoch %d loss %.4f  %.1f img/s  ETA %s", step,
                                 run.total_steps, epoch, scalars["train/loss"],
                                 scalars["train/images_per_sec"], _format_eta(eta))
                if evaluate_now:
                    last_metrics = inference.evaluate(embed_fn, state, run.data, config, run.mesh,
                                                      workdir=workdir, step=step)
                    metrics_step = step
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in last_metrics.items()})
                    logging.info("step %d eval %s", step,
                                 ", ".join(f"{k} {v:.4f}" for k, v in last_metrics.items()))
                    evaluation = _evaluation(run, step, last_metrics)
                    history.append(evaluation)
                    improved = last_metrics["recall@1"] > best_eval.get("recall@1", -1.0)
                    if improved:
                        best_eval = evaluation
                    save()
                    if improved:
                        save(best=True)
                    if primary:
                        _write_metrics(workdir, evaluation, total_steps=run.total_steps,
                                       best=best_eval, history=history)
                    for hook in evaluation_hooks:
                        hook(dict(evaluation))
                elif (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0) \
                        or stopping:
                    check_pending()
                    save()
                if stopping:
                    logging.warning("stopped by a signal at step %d; resume with the same "
                                    "command", step)
                    break
        writer.flush()
    finally:
        writer.close()
        checkpointer.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    return _result(step, metrics_step, last_metrics, best_eval)


def _write_metrics(workdir: str, evaluation: dict, *, total_steps: int, best: dict,
                   history: list) -> None:
    """``workdir/metrics.json``: the last evaluation, ``total_steps``, ``best``, ``history``.

    Written to a temporary file and renamed, so a reader (a sweep's table) never sees half.
    """
    path = os.path.join(workdir, "metrics.json")
    with open(path + ".tmp", "w") as f:
        json.dump({**evaluation, "total_steps": total_steps, "best": best, "history": history},
                  f, indent=2)
    os.replace(path + ".tmp", path)


def _result(step: int, metrics_step: Optional[int], metrics: dict, best_eval: dict) -> dict:
    """What a run returns: the step reached, the last metrics with the step of them, and
    the best evaluation."""
    return {"step": step, "metrics_step": metrics_step, **metrics, "best": best_eval}


# ------------------------------------------------------------------ evaluate, embed modes

def _restore_for_inference(config, workdir: str, *, best: bool):
    """The run of ``config`` and the best (else the latest) intact checkpoint of ``workdir``."""
    check_workdir(workdir)
    if not checkpoints.has_checkpoint(workdir):  # before any expensive work; creates nothing
        raise checkpoints.CheckpointError(
            f"workdir {workdir!r} holds no checkpoint (expected {workdir}/checkpoints/latest/"
            "<step>); train it first with --mode=train and the same --config and --workdir")
    run = build(config)
    checkpointer = checkpoints.Checkpointer(workdir, create=False)
    try:
        restored = _restore(run, checkpointer, prefer_best=best)
    finally:
        checkpointer.close()
    return run, parallel.replicate(restored.state, run.mesh), restored.record


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        best: bool = True) -> dict:
    """Evaluates the best (else the latest) checkpoint of ``workdir``; writes the pictures."""
    run, state, record = _restore_for_inference(config, workdir, best=best)
    metrics = inference.evaluate(inference.make_embed_fn(run.model, run.mesh), state, run.data, config, run.mesh,
                       workdir=workdir, tag="_eval", step=record["step"])
    logging.info("checkpoint step %d: %s", record["step"],
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {"step": record["step"], **metrics}


def embed_folder(config: ml_collections.ConfigDict, workdir: str, folder: str, output: str, *,
                 best: bool = True) -> dict:
    """Embeds every image under ``folder`` with the workdir's checkpoint into ``output``.

    Every image file anywhere under ``folder`` is embedded (see :func:`proxy_jax.inference.images_under` for
    the labels). ``output`` is an ``.npz`` with ``embeddings`` float32 [N, D]
    (l2-normalized), ``labels`` int64 [N], ``paths`` [N] and ``classes``.
    """
    samples, classes = inference.images_under(folder)  # before the checkpoint is read
    run, state, record = _restore_for_inference(config, workdir, best=best)
    dataset = datasets.ImageDataset([(path, 0) for path, _ in samples], ["?"])
    embeddings, _ = inference.embed_dataset(inference.make_embed_fn(run.model, run.mesh),
                                            inference.network_variables(state), dataset,
                                            config, run.mesh)
    labels = np.asarray([label for _, label in samples], np.int64)
    paths = np.asarray([path for path, _ in samples])
    if multihost.is_primary():
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        np.savez(output, embeddings=embeddings, labels=labels, paths=paths,
                 classes=np.asarray(classes))
    logging.info("wrote %d embeddings (checkpoint step %d) to %s", len(embeddings),
                 record["step"], output)
    return {"num_images": len(embeddings), "dim": embeddings.shape[1], "step": record["step"]}
