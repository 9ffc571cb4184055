"""The settings every training run shares (:class:`TrainConfig`); each task's config adds its own fields and
defaults (:class:`wszoo.training.FinetuneConfig`, :class:`wszoo.detection.DetectTrainConfig`). A field's name
is the command line's flag (``accum_steps``: ``--accum-steps``), so an error naming a field reads as the flag
on the command line (:mod:`wszoo.errors`)."""
from dataclasses import dataclass
from typing import Optional

__all__ = ["TrainConfig", "DensePredictionConfig"]


@dataclass(kw_only=True)
class TrainConfig:
    """What the training loop (:func:`wszoo.training.engine.train`) needs, whatever the task.

    Attributes:
        output: the run directory: ``last/``, ``best/`` (``ema/``), ``metrics.jsonl`` and the train state,
            each epoch committed as one unit (:mod:`wszoo.training.run_dir`).
        resume: a previous run directory to continue from (usually ``output`` itself).
        overwrite: replace a run already in ``output`` (by default it is refused).
        epochs: epochs in all, counting those of the run being resumed.
        batch_size: images per micro-batch per process.
        accum_steps: micro-batches per optimizer step.
        accumulate_ws: with ``accum_steps`` > 1, standardize each WS weight once per optimizer step
            (:func:`wszoo.accumulate_ws`) rather than in every micro-batch.
        opt: ``"sgd"`` or ``"adamw"``.
        lr: the peak learning rate (for the whole batch of ``batch_size * accum_steps * processes``).
        min_lr: where the cosine decay ends.
        momentum: SGD's momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 weight decay (the task says which parameters it skips).
        clip_mode: ``"none"``, ``"norm"`` (global gradient norm) or ``"agc"`` (adaptive gradient clipping).
        clip_grad: the AGC clip factor, or the maximum gradient norm.
        ema_decay: decay of an EMA copy of the weights (validated and saved as ``best/``, ``ema/``); 0: none.
        amp: ``"bf16"`` or ``"fp16"`` autocast (fp16 with a gradient scaler); ``None``: full precision.
        seed: seeds the initialisation and, with the rank and the epoch, every epoch (:mod:`wszoo.training.epochs`).
        workers: DataLoader worker processes.
        log_interval: log the running loss every this many micro-batches; 0: once per epoch.
        tune_allocator: on CPU, raise glibc's malloc thresholds (:func:`wszoo.tune_cpu_allocator`).
    """

    output: str
    resume: Optional[str] = None
    overwrite: bool = False
    epochs: int = 10
    batch_size: int = 32
    accum_steps: int = 1
    accumulate_ws: bool = True
    opt: str = "sgd"
    lr: float = 0.05
    min_lr: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    clip_mode: str = "none"
    clip_grad: float = 0.01
    ema_decay: float = 0.0
    amp: Optional[str] = None
    seed: int = 0
    workers: int = 0
    log_interval: int = 50
    tune_allocator: bool = True

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of linear warmup (each task's config says how it counts them)."""
        return 0


@dataclass(kw_only=True)
class DensePredictionConfig(TrainConfig):
    """The recipe detection and segmentation share (torchvision's reference scripts): SGD with momentum and no
    Nesterov, lr 0.02, weight decay 1e-4 on every parameter, a linear warmup counted in optimizer steps.

    Attributes:
        warmup_iters: optimizer steps of linear warmup.
    """

    warmup_iters: int = 0
    lr: float = 0.02
    nesterov: bool = False
    weight_decay: float = 1e-4
    log_interval: int = 20

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return self.warmup_iters
