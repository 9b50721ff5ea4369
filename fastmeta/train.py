"""The training loop every learner shares: progress bar, periodic validation, atomic
checkpoints that resume exactly, a metrics CSV and a PNG learning curve.

Exact resume rests on two facts: the training batch of step ``i`` is a pure function of
``(seed, i)`` (the episode samplers are indexed by episode number), and the checkpoint holds
the model, the optimizer, torch's RNG state and the step. A checkpoint is written to a
temporary file and renamed over the old one, so a crash never leaves a half-written file in
place of a good one; Ctrl-C saves one before exiting.

Under torchrun (:mod:`fastmeta.distributed`) every rank runs the same loop on its share of each
batch: the trainer averages the gradients (and BatchNorm running statistics) over the ranks
after ``backward()``, averages the logged metrics, and only rank 0 writes checkpoints, the CSV
and the plot; every rank resumes from the same checkpoint (the run folder must be shared).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fastmeta import distributed
from fastmeta.learners import EvalResult

CSV_FIELDS = ["step", "loss", "acc", "val_acc", "val_ci95", "episodes_per_s", "elapsed_s"]


# metric name -> lower is better
METRICS = {"acc": False, "mse": True, "return": False}


def csv_fields(metric: str = "acc", extra: tuple[str, ...] = ()) -> list[str]:
    """The metrics CSV columns: ``CSV_FIELDS`` with ``acc`` renamed to ``metric`` (``"mse"``
    for regression learners, ``"return"`` for RL agents), then the ``extra`` columns."""
    return [metric if f == "acc" else f"val_{metric}" if f == "val_acc" else f for f in CSV_FIELDS] + list(extra)


@dataclasses.dataclass
class TrainConfig:
    """How long and how often (``*_every <= 0``: never; a checkpoint is still written at the
    end). ``minutes`` (optional) stops early on wall-clock time.
    ``metric``: what the step function's second value and validation measure: ``"acc"``
    (higher is better), ``"mse"`` (regression; lower is better) or ``"return"`` (RL agents;
    higher is better). ``extra_fields``: further CSV columns, averaged over each log window
    from the dict a step function may return third (e.g. an RL agent's pre/post-adaptation
    returns, KL, step size); ``plot_fields``: those of them drawn beside ``metric`` (same
    scale)."""

    steps: int = 1000
    minutes: float | None = None
    log_every: int = 20
    val_every: int = 200
    ckpt_every: int = 200
    episodes_per_step: int = 1
    run_dir: Path = Path("runs/default")
    resume: bool = False
    progress: bool = True
    metric: str = "acc"
    extra_fields: tuple[str, ...] = ()
    plot_fields: tuple[str, ...] = ()


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_extra(path: Path) -> dict:
    """The ``extra`` dict of a checkpoint (e.g. the CLI arguments it was written with) without
    reading its tensors: they are memory-mapped, never touched, so a check before
    :meth:`Trainer.restore` reads the pickled metadata only, not a large checkpoint twice."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("extra", {})


class Trainer:
    """Runs ``step_fn(batch) -> (loss, acc)`` with ``optimizer`` over ``batches(start_step)``.

    Args:
        model: the learner or agent (its ``state_dict`` is checkpointed).
        optimizer: any torch optimizer over the model's parameters; ``None`` for agents whose
            ``step_fn`` updates the model itself (e.g. TRPO): then the trainer only logs the
            loss it returns (a tensor or a float).
        scheduler: optional learning-rate scheduler stepped once per step (checkpointed).
        batches: ``batches(start_step)`` returns an iterator of training batches beginning
            at that step (deterministic per step).
        step_fn: computes ``(loss, acc)`` or ``(loss, acc, extras)`` of one batch (``extras``
            a dict with the keys of ``config.extra_fields``); with an optimizer the trainer does
            backward/step.
        validate: optional ``() -> EvalResult`` run every ``val_every`` steps.
        config: :class:`TrainConfig`.
        extra_state: JSON-like dict stored in checkpoints (e.g. the CLI arguments).
    """

    def __init__(self, model, optimizer, batches: Callable[[int], Iterator], step_fn: Callable,
                 validate: Callable[[], EvalResult] | None, config: TrainConfig,
                 scheduler=None, extra_state: dict | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.batches, self.step_fn, self.validate = batches, step_fn, validate
        self.cfg = config
        self.extra_state = extra_state or {}
        self.run_dir = Path(config.run_dir)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.csv_path = self.run_dir / "metrics.csv"
        self.step = 0
        self.metric = config.metric
        if self.metric not in METRICS:
            raise ValueError(f"TrainConfig.metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if not set(config.plot_fields) <= set(config.extra_fields):
            raise ValueError(f"TrainConfig.plot_fields {config.plot_fields} must be among extra_fields "
                             f"{config.extra_fields}")
        self.lower_is_better = METRICS[self.metric]
        self.fields = csv_fields(self.metric, tuple(config.extra_fields))
        self.best_val = math.inf if self.lower_is_better else -math.inf
        self.writes = distributed.is_main()  # rank 0 (or the only process) writes the run folder

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "step": self.step,
            "best_val": self.best_val,
            "torch_rng": torch.get_rng_state(),
            "extra": self.extra_state,
        }

    def save(self) -> None:
        if self.writes:
            save_checkpoint(self.ckpt_path, self.state())

    def restore(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        state = load_checkpoint(self.ckpt_path)
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        torch.set_rng_state(state["torch_rng"])
        if self.writes:
            self._truncate_csv(self.step)
        return True

    # -- metrics ----------------------------------------------------------------------------
    def _truncate_csv(self, step: int) -> None:
        """Drop rows logged after the checkpoint so a resumed run has no duplicates."""
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self._write_csv(rows, mode="w")

    def _write_csv(self, rows: list[dict], mode: str = "a") -> None:
        if not self.writes:
            return
        new = mode == "w" or not self.csv_path.exists()
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.csv_path, mode, newline="") as f:
            w = csv.DictWriter(f, self.fields)
            if new:
                w.writeheader()
            w.writerows(rows)

    def history(self) -> list[dict]:
        if not self.csv_path.exists():
            return []
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    def plot(self) -> Path | None:
        rows = self.history()
        if not rows or not self.writes:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def col(name):
            pts = [(int(r["step"]), float(r[name])) for r in rows if r[name] not in ("", None)]
            return zip(*pts) if pts else ((), ())

        m = self.metric
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
        ax1.plot(*col("loss"), label="train loss")
        ax1.set_xlabel("step")
        if all(float(r["loss"]) > 0 for r in rows if r["loss"] not in ("", None)):
            ax1.set_yscale("log")  # a surrogate loss can be negative
        ax1.legend()
        ax2.plot(*col(m), label=f"train {m}", alpha=0.7)
        for name in self.cfg.plot_fields:
            ax2.plot(*col(name), label=name.replace("_", " "), alpha=0.7)
        ax2.plot(*col(f"val_{m}"), "o-", label=f"val {m}")
        ax2.set_xlabel("step")
        if self.lower_is_better:
            ax2.set_yscale("log")
        elif m == "acc":
            ax2.set_ylim(0, 1)
        ax2.legend()
        fig.tight_layout()
        out = self.run_dir / "learning_curve.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train until ``config.steps`` (or ``config.minutes``); returns the metrics CSV's rows
        (on rank 0; the other ranks of a torchrun job get ``[]``)."""
        cfg = self.cfg
        if cfg.resume and self.restore():
            if self.writes:
                print(f"resumed from {self.ckpt_path} at step {self.step}")
        elif self.writes and self.csv_path.exists() and not cfg.resume:
            self.csv_path.unlink()
        self._agree_on_start()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.writes), dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)
        start = time.perf_counter()
        window_t, window_loss, window_acc, window_n = time.perf_counter(), 0.0, 0.0, 0
        window_extra = dict.fromkeys(cfg.extra_fields, 0.0)
        self.model.train()
        it = self.batches(self.step)
        consistent = True
        with distributed.deferred_interrupts() as interrupted:
            try:
                while self.step < cfg.steps:
                    # one agreement per step: every rank stops at the same step (torchrun)
                    out_of_time, stop = distributed.any_rank(
                        cfg.minutes is not None and time.perf_counter() - start > 60 * cfg.minutes, interrupted())
                    if stop:
                        raise KeyboardInterrupt("interrupted: every rank stops after this step")
                    if out_of_time:
                        break
                    batch = next(it)
                    consistent = False  # an interrupt inside the update must not be saved
                    loss, acc, *extras = self.step_fn(batch)
                    if self.optimizer is not None:
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        distributed.all_reduce_gradients(self.model)
                        self.optimizer.step()
                    if self.scheduler is not None:
                        self.scheduler.step()
                    self.step += 1
                    consistent = True
                    window_loss += loss.item() if torch.is_tensor(loss) else float(loss)
                    window_acc += float(acc)
                    window_n += 1
                    for k in window_extra:
                        window_extra[k] += float(extras[0][k])
                    bar.update(1)
                    row = None
                    if (cfg.log_every > 0 and self.step % cfg.log_every == 0) or self.step == cfg.steps:
                        now = time.perf_counter()
                        m = self.metric
                        # the ranks' window means, averaged (equal shards: the global batch's means)
                        means = distributed.mean_over_ranks([window_loss, window_acc, *window_extra.values()]) / window_n
                        row = {"step": self.step, "loss": means[0].item(), m: means[1].item(),
                               f"val_{m}": "", "val_ci95": ""}
                        row.update(episodes_per_s=window_n * cfg.episodes_per_step / (now - window_t),
                                   elapsed_s=now - start, **dict(zip(window_extra, means[2:].tolist())))
                        bar.set_postfix({"loss": f"{row['loss']:.3f}", self.metric: f"{row[self.metric]:.3f}"}, refresh=False)
                        window_t, window_loss, window_acc, window_n = now, 0.0, 0.0, 0
                        window_extra = dict.fromkeys(cfg.extra_fields, 0.0)
                    if self.validate is not None and cfg.val_every > 0 and self.step % cfg.val_every == 0:
                        res = self.validate()
                        self.model.train()
                        row = row or {"step": self.step, "loss": "", self.metric: "", "episodes_per_s": "",
                                      "elapsed_s": time.perf_counter() - start}
                        row.update({f"val_{self.metric}": res.mean, "val_ci95": res.ci95})
                        if self.writes:
                            bar.write(f"step {self.step}: val {'acc ' if self.metric == 'acc' else ''}{res}")
                        better = min if self.lower_is_better else max
                        self.best_val = better(self.best_val, res.mean)
                    if row is not None:
                        self._write_csv([row])
                    if cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0:
                        self.save()
            except KeyboardInterrupt:
                if self.writes and consistent:
                    bar.write(f"interrupted at step {self.step}: saving {self.ckpt_path}")
                    self.save()
                elif self.writes:
                    bar.write(f"interrupted mid-update: keeping the last checkpoint {self.ckpt_path}")
                raise
            finally:
                bar.close()
        self.save()
        self.plot()
        return self.history() if self.writes else []

    def _agree_on_start(self) -> None:
        """Under torchrun: every rank must start at the same step (one checkpoint, seen by all);
        then rank 0's weights are copied to all, so they agree even if they were built apart."""
        if not distributed.is_active():
            return
        steps = distributed.mean_over_ranks([self.step, self.step ** 2])
        if steps[1].item() != steps[0].item() ** 2:  # the variance over ranks is not 0
            raise RuntimeError(f"rank {distributed.rank()} starts at step {self.step} but the ranks disagree: "
                               f"is {self.ckpt_path} on a folder every rank sees?")
        distributed.broadcast_module(self.model)
