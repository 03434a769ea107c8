"""The configuration shared by every trainer; each method extends it with its own dataclass."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from ..models import EMBEDDED_DEFAULT
from ..token_stats.config import DIVERGENCES
from ..token_stats.loop import DEFAULT_MEMORY_BUDGET_MB
from .checkpoint import resolve_checkpoint
from .fields import Literal, check_fields, coerce_fields, option

TEACHER_KINDS = ("fixed", "ema", "live")
# TRL's names for fields pydistill names differently, accepted in YAML files and as flags
ALIASES = {"lr_scheduler_type": "lr_scheduler", "save_steps": "save_every"}


@dataclass
class TrainConfig:
    # model and data
    model: str = option(EMBEDDED_DEFAULT, "model: hub name or local folder (the embedded default needs no "
                        "network)")
    init_from: Optional[str] = option(None, "a run folder or checkpoint whose trained weights start this run (FD -> "
                                      "GRPO)")
    task: str = option("arithmetic", "task name (arithmetic, gsm8k)")
    data_path: Optional[str] = option(None, "GSM8K folder or jsonl file (task gsm8k), or a datasets hub name "
                                      "written hf://owner/name")
    train_split: str = option("train", "split the training problems come from")
    eval_split: str = option("test", "split of the held-out evaluation")
    train_problems: int = option(4096, "size of the training pool (cycled)")
    eval_problems: int = option(64, "held-out problems evaluated (0: no evaluation)")
    # LoRA (r = 0: full fine-tune)
    lora_r: int = option(64, "LoRA rank (0: full fine-tune)")
    lora_alpha: int = option(128, "LoRA alpha")
    # optimization
    learning_rate: float = option(2e-4, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(0, "learning-rate warm-up steps")
    lr_scheduler: str = option("constant_with_warmup", "transformers scheduler name (constant_with_warmup, linear, "
                               "cosine, ...); TRL's name lr_scheduler_type is accepted too",
                               aliases=["--lr_scheduler_type", "--lr-scheduler-type"])
    max_steps: int = option(100, "optimizer steps")
    batch_size: int = option(32, "prompts per optimizer step, across all processes and micro-batches")
    micro_batch_size: int = option(8, "prompts per forward/backward")
    max_grad_norm: float = option(0.1, "gradient clipping norm")
    # rollouts
    num_generations: int = option(1, "rollouts per prompt (group size)")
    max_new_tokens: int = option(1024, "rollout length limit")
    temperature: float = option(1.0, "rollout sampling temperature")
    top_p: float = option(1.0, "rollout nucleus sampling")
    top_k: int = option(0, "rollout top-k sampling (0: off)")
    # teacher
    teacher: Literal["fixed", "ema", "live"] = option("fixed", "teacher weights: fixed (initial), ema or live")
    ema_rate: float = option(0.001, "EMA teacher: teacher <- (1 - rate) teacher + rate student")
    # run
    seed: int = option(0, "random seed")
    output_dir: str = option("runs/train", "run folder (checkpoints, metrics.jsonl)")
    eval_every: int = option(0, "evaluate every this many steps (0: only at the end)")
    eval_max_new_tokens: int = option(128, "evaluation completion length limit")
    eval_samples: int = option(0, "> 1: also sample this many completions per held-out problem (pass@k, "
                               "diversity)")
    eval_temperature: float = option(1.0, "temperature of the sampled evaluation")
    save_every: int = option(0, "checkpoint every this many steps (0: only at the end); TRL's name save_steps is "
                             "accepted too", aliases=["--save_steps", "--save-steps"])
    save_total_limit: Optional[int] = option(None, "keep only the newest this many checkpoints (TRL's name); older "
                                             "ones are deleted after a newer one is complete; None keeps all")
    time_budget_s: float = option(0.0, "stop after this many seconds of training (0: no limit)")
    generated_token_budget: int = option(0, "stop once this many rollout tokens were generated (0: no limit)")
    save_pretrained: bool = option(True, "each checkpoint also holds a from_pretrained folder: model/ (full "
                                   "fine-tune, with the tokenizer) or adapter/ (LoRA, a PEFT adapter)")
    resume: bool = option(False, "continue the run in output_dir from its latest checkpoint")
    overwrite: bool = option(False, "replace the run already in output_dir (its checkpoints and logs)")
    max_nonfinite_steps: int = option(3, "end the run after this many optimizer steps in a row with a non-finite "
                                      "loss or gradient norm (each is skipped)")
    max_reward_failures: int = option(20, "end the run after this many failed reward-function calls")
    impl: Literal["auto", "triton", "torch", "eager", "reference"] = option(
        "auto", "the fused op's folds: triton (CUDA), torch, auto (triton on CUDA), eager (float64 logits, for "
        "tests; reference is its former name)")
    memory_budget_mb: float = option(
        DEFAULT_MEMORY_BUDGET_MB, "the fused op's speed/memory knob: extra MB per loss call; the default (about "
        "TRL's own head at N=8192, V=151936) holds the gradient formed in the forward (4 GEMM passes instead of 6); "
        "256 keeps the lean mode")
    progress: bool = option(True, "show a progress bar")
    # ----- your own data, trackers and memory (checked by validate_ecosystem) -----
    # A dataset replaces `task`: a jsonl/json/csv/parquet file, a dataset folder (save_to_disk or data files
    # named by split) or a `datasets` hub name; its splits are train_split / eval_split (a single file: "train").
    dataset: Optional[str] = option(None, "a dataset to train on instead of task: a jsonl/json/csv/parquet file, a "
                                    "dataset folder or a hub name")
    dataset_config: Optional[str] = option(None, "the hub dataset's configuration name (e.g. main for openai/gsm8k)")
    prompt_column: str = option("prompt", "the dataset column the student sees (a string or chat messages)")
    solution_column: Optional[str] = option("solution", "worked solution for teacher contexts; None: "
                                            "\"The answer is X.\"")
    answer_column: str = option("answer", "final answer the verifier compares with (\"... #### 42\" reads as 42)")
    report_to: str = option("none", "trackers through accelerate: none, tensorboard, wandb, all, or a comma list")
    gradient_checkpointing: bool = option(False, "recompute the decoder layers' activations in the backward")

    def validate(self):
        """Fail fast with one line naming the field, the value and what is expected."""
        check_fields(self)
        positive_ints = ["max_steps", "batch_size", "micro_batch_size", "num_generations", "max_new_tokens",
                         "train_problems", "eval_max_new_tokens"]
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                label = "group size (num_generations)" if name == "num_generations" else name
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide batch_size {self.batch_size}")
        for name in ("eval_problems", "eval_samples", "warmup_steps", "eval_every", "save_every", "lora_r", "top_k",
                     "generated_token_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or null (keep every checkpoint), "
                             f"got {self.save_total_limit}")
        if isinstance(self.memory_budget_mb, bool) or not isinstance(self.memory_budget_mb, (int, float)) or \
                not 0 < self.memory_budget_mb < float("inf"):
            raise ValueError(f"memory_budget_mb must be a finite number > 0, got {self.memory_budget_mb!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.eval_samples == 1:
            raise ValueError("eval_samples must be 0 (greedy evaluation only) or >= 2 (sampled pass@k), got 1")
        if not self.eval_temperature > 0:
            raise ValueError(f"eval_temperature must be > 0, got {self.eval_temperature}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.teacher not in TEACHER_KINDS:
            raise ValueError(f"teacher must be one of {TEACHER_KINDS}, got {self.teacher!r}")
        if not 0 < self.ema_rate <= 1:
            raise ValueError(f"ema_rate must be in (0, 1], got {self.ema_rate}")
        if self.time_budget_s < 0:
            raise ValueError(f"time_budget_s must be >= 0, got {self.time_budget_s}")
        if self.init_from is not None:
            resolve_checkpoint(self.init_from)
        if _is_path(self.model) and not os.path.isdir(self.model):
            raise ValueError(f"model {self.model!r} is not a folder (a local model path must exist; hub names "
                             "look like owner/name)")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in output_dir, "
                             "overwrite replaces it")
        for name in ("max_nonfinite_steps", "max_reward_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        from transformers import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise ValueError(f"lr_scheduler must be one of {schedulers}, got {self.lr_scheduler!r}")
        if self.task == "gsm8k" and self.data_path is not None:
            from ..tasks.gsm8k import resolve_source

            resolve_source(self.data_path)
        self.validate_ecosystem()
        return self

    def validate_ecosystem(self):
        """The dataset, column and tracker fields (one message naming the field, the value and what is expected)."""
        from ..tasks.dataset import looks_like_hub_name
        from .accel import parse_report_to

        if self.dataset is not None:
            if not isinstance(self.dataset, str) or not self.dataset.strip():
                raise ValueError(f"dataset must be a file, a folder or a datasets hub name, got {self.dataset!r}")
            if not os.path.exists(self.dataset) and not looks_like_hub_name(self.dataset):
                raise ValueError(f"dataset {self.dataset!r} does not exist (a data file or folder; relative paths "
                                 f"are read from {os.getcwd()!r})")
        for name in ("prompt_column", "answer_column", "solution_column"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value.strip()) and not (name == "solution_column" and value is None):
                raise ValueError(f"{name} must be a column name, got {value!r}")
        parse_report_to(self.report_to)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")

    @classmethod
    def from_dict(cls, values: dict):
        """A config from YAML or flag values: text is parsed by each field's type (``1e-4``, ``'false'``,
        ``null``); anything that does not fit raises one line naming the field."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = resolve_aliases(values)
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config field(s) for {cls.__name__}: {', '.join(unknown)}")
        return cls(**coerce_fields(cls, values))


def resolve_aliases(values: dict) -> dict:
    """``values`` with TRL's field names (:data:`ALIASES`) replaced by pydistill's; both given: an error."""
    values = dict(values)
    for alias, name in ALIASES.items():
        if alias in values:
            if name in values and values[name] != values[alias]:
                raise ValueError(f"{alias} (TRL's name for {name}) and {name} are both set, to {values[alias]!r} "
                                 f"and {values[name]!r}")
            values[name] = values.pop(alias)
    return values


def _is_path(name: str) -> bool:
    """Whether a model name can only be a local path (a hub id is ``name`` or ``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (
        "/" in name and os.path.isdir(name.split("/", 1)[0]))


def check_divergence(divergence: str, beta: float, clip: Optional[float]):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip (tau) must be > 0 or None, got {clip}")


# The help text of every distillation config's ``loss_temperature`` field.
LOSS_TEMPERATURE_HELP = ("temperature of both distributions in the loss; None: the sampling temperature (the "
                         "authors' code divides both logits by it); 1.0: the raw logits")


def loss_temperature(config) -> float:
    """The temperature a distillation loss runs at: ``loss_temperature``, or the sampling temperature when None.
    Matching distributions at 1 while sampling at 0.7 distils toward a flatter teacher than the one sampled."""
    value = getattr(config, "loss_temperature", None)
    return config.temperature if value is None else value


def check_loss_temperature(value):
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"loss_temperature must be > 0 or None (the sampling temperature), got {value!r}")
