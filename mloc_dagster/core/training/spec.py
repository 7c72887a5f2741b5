"""What an adapter job is asked to do (``JobSpec``; the ASR track's ``AdapterJobSpec``,
``AdapterHParams``), what it reports while running (``Progress``) and what it returns
(``JobResult``; ``AdapterJobResult``, stored as result.json next to the adapter). Plain
dataclasses: ``core/training/job.py`` runs them, whatever the track."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class DeviceOptions:
    """How a job uses a CUDA device, for every track. ``precision``: ``bf16`` or ``fp16`` autocast of
    the forward pass on CUDA (fp16 with a loss scaler, which starts afresh in every job: exact resume
    holds for fp32 and bf16); a job on CPU trains in fp32 whatever it says. ``gradient_checkpointing``:
    recompute activations in the backward pass (less memory, ~30 % more compute), on any device, for
    base models that support it (transformers' own; the built-in tiny model does not)."""

    precision: str = "fp32"  # fp32 | bf16 | fp16
    gradient_checkpointing: bool = False


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class AdapterHParams(DeviceOptions):
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: list[str] | None = None  # None: the base model's default (core.models.ctc.default_lora_targets)
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 5.0
    seed: int = 0
    # Share of each epoch drawn from the rehearsal dataset, if one is given, and the weight of the
    # distillation loss on those rows (KL from the frozen base's outputs; 0: off). 0.75 / 3 keep the
    # base dialect within the gate's 5 % (bench/learning.py, docs/benchmarks.md "Keeping the base").
    rehearsal_fraction: float = 0.75
    distill_weight: float = 3.0


@dataclass
class Progress:
    step: int  # steps of the training run so far
    job_step: int  # steps of this job
    samples: int  # samples of this job
    loss: float  # last step's loss
    samples_per_s: float
    eta_s: float  # seconds until the loop stops (timebox or max_steps)
    elapsed_s: float
    epoch: int
    event: str = "step"  # step | checkpoint | done
    checkpoint: str | None = None


@dataclass(kw_only=True)
class JobSpec:
    """What every adapter job is told, whatever its track (``core/training/job.py`` reads these).
    A track's spec adds, positionally, its inputs (base model, dataset version, ...), ``out_dir``
    (this job's final checkpoint directory) and ``hparams``; these fields are keyword-only."""

    resume_from: str | Path | None = None  # previous job's final checkpoint of the same training run
    # Warm start of a run's first job: a merged/promoted peft adapter of the dialect (same base
    # model, same LoRA shape). Its weights replace the fresh LoRA init; optimizer and data position
    # start fresh. Ignored when resuming.
    init_adapter: str | Path | None = None
    timebox_s: float = 3600.0
    checkpoint_every_s: float = 300.0
    checkpoint_every_steps: int | None = None  # optional, in addition to checkpoint_every_s
    node_id: str | None = None  # default: MLOC_NODE_ID, else host (+ GPU UUID)
    device: str | None = None  # default: cuda when available, else cpu
    run_id: str | None = None
    job_index: int | None = None
    max_steps: int | None = None  # optional step budget of this job (tests, benchmarks, fixed-size jobs)
    cpu_threads: int | None = None  # None: auto_cpu_threads (1 for small models on CPU)
    deterministic: bool | None = None  # torch deterministic algorithms; None: on for CUDA, off for CPU
    # A slice of a distributed round: train exactly these [start, stop) positions of the run's
    # sample stream, in order, then stop ("slice_done"). None: the stream from where it stands.
    segments: list[tuple[int, int]] | None = None
    throttle: float = 1.0  # >1: every step after the job's first that much slower: a simulated slow node (tests, benches)
    on_train_start: Callable[[], None] | None = None  # called once, just before the first step
    on_train_end: Callable[[], None] | None = None  # called once, after the last step (before evaluation and save)
    eval_split: str = "dev"
    started_at: float | None = None  # time.time() the timebox counts from; default: function entry
    progress: Callable[[Progress], None] | None = None
    progress_every_s: float = 10.0
    heartbeat: Callable[[], bool | None] | None = None  # returning False stops the job cleanly
    heartbeat_every_s: float = 5.0
    log: Callable[[str], None] | None = None


@dataclass
class AdapterJobSpec(JobSpec):
    """An ASR adapter job (``core/training/asr.py: train_adapter``)."""

    base_model_dir: str | Path
    dataset_version_path: str | Path
    out_dir: str | Path  # this job's final checkpoint directory
    hparams: AdapterHParams = field(default_factory=AdapterHParams)
    feature_cache_dir: str | Path | None = None
    # The base dialect's dataset version: mixed into training (hparams.rehearsal_fraction) so the
    # adapter does not forget the base dialect (the gate limits base-dialect regression).
    rehearsal_dataset_path: str | Path | None = None
    eval_batch_size: int = 32


@dataclass(kw_only=True)
class JobResult:
    """What every adapter job returns, whatever its track (stored as result.json next to the
    adapter); a track's result adds its evaluation."""

    path: str
    sha256: str  # of adapter_model.safetensors
    steps: int  # this job (a retried job counts the steps of its crashed attempt too)
    samples: int  # this job (likewise)
    total_steps: int  # the training run so far
    total_samples: int
    epoch: float  # data position of the run in epochs (epoch + fraction of the current one)
    train_loss: float  # mean loss of this job's steps
    samples_per_s: float  # samples trained by this attempt / train_seconds
    train_seconds: float  # first step start → last step end
    wall_seconds: float
    timebox_s: float
    stop_reason: str  # timebox | max_steps | slice_done | heartbeat
    node_id: str
    device: str
    run_id: str | None
    job_index: int | None
    resumed_from: str | None  # checkpoint this job started from (a partial one after a crash)
    resumed_kind: str  # fresh | warm_start | resume_from | partial | reused
    checkpoints_written: int
    dataset_version: str
    base_model_hash: str
    trainable_parameters: int
    loss_history: list[float]  # this job's per-step losses (all attempts)
    overhead_seconds: float = 0.0  # start → first step, plus last step end → return
    utilization: float = 0.0  # train_seconds / timebox_s
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None
    last_save_seconds: float = 0.0
    first_step_at: float | None = None  # wall-clock time (time.time()) of this attempt's first step

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(kw_only=True)
class AdapterJobResult(JobResult):
    """An ASR adapter job's result: the job's dev CER/WER and the run's learning curve."""

    dev_cer: float
    dev_wer: float
    feature_cache_hit: bool = False
    dev_speakers: int = 0  # speakers of the split dev_cer was measured on
    dev_utterances: int = 0
    dev_cer_delta: float | None = None  # dev_cer minus the previous job's of the run (None: first job)
    # The run's learning curve so far, one entry per finished job: job_index, total_samples, dev_cer
    learning_curve: list[dict] = field(default_factory=list)
