"""The configuration shared by every trainer; each method extends it with its own dataclass."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from ..stats_config import DIVERGENCES

TEACHER_KINDS = ("fixed", "ema", "live")


@dataclass
class TrainConfig:
    # model and data
    model: str = "SmolLM2-135M-Instruct"
    init_from: Optional[str] = None  # a run folder or checkpoint whose trained weights start this run (FD -> GRPO)
    task: str = "arithmetic"
    data_path: Optional[str] = None  # GSM8K folder/file (task "gsm8k")
    train_split: str = "train"
    eval_split: str = "test"
    train_problems: int = 4096  # size of the training pool (cycled)
    eval_problems: int = 64
    # LoRA (r = 0: full fine-tune)
    lora_r: int = 64
    lora_alpha: int = 128
    # optimization
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "constant_with_warmup"
    max_steps: int = 100
    batch_size: int = 32  # prompts per optimizer step, across all processes and micro-batches
    micro_batch_size: int = 8  # prompts per forward/backward
    max_grad_norm: float = 0.1
    # rollouts
    num_generations: int = 1
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # teacher
    teacher: str = "fixed"
    ema_rate: float = 0.001  # teacher <- (1 - rate) teacher + rate student
    # run
    seed: int = 0
    output_dir: str = "runs/train"
    eval_every: int = 0  # steps; 0: only at the end
    eval_max_new_tokens: int = 128
    eval_samples: int = 0  # > 1: also sample this many completions per held-out problem -> eval/pass@k, diversity
    eval_temperature: float = 1.0  # sampling temperature of that evaluation
    save_every: int = 0  # steps; 0: only at the end
    time_budget_s: float = 0.0  # stop after this many seconds of training (0: no limit)
    generated_token_budget: int = 0  # stop once this many rollout tokens were generated (0: no limit)
    resume: bool = False
    impl: str = "auto"  # the fused op's backend
    progress: bool = True
    # ----- your own data, trackers and memory (issue 15; checked by validate_ecosystem) -----
    # A dataset replaces `task`: a jsonl/json/csv/parquet file, a dataset folder (save_to_disk or data files
    # named by split) or a `datasets` hub name; its splits are train_split / eval_split (a single file: "train").
    dataset: Optional[str] = None
    dataset_config: Optional[str] = None  # the hub dataset's configuration name (e.g. "main" for openai/gsm8k)
    prompt_column: str = "prompt"  # the question the student sees (a string or a list of chat messages)
    solution_column: Optional[str] = "solution"  # worked solution for teacher contexts; None: "The answer is X."
    answer_column: str = "answer"  # final answer the verifier compares with ("... #### 42" is read as 42)
    report_to: str = "none"  # none | tensorboard | wandb | all, or a comma list: accelerate's trackers
    gradient_checkpointing: bool = False  # recompute the decoder layers' activations in backward

    def validate(self):
        """Fail fast with a message naming the field."""
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
        if self.init_from is not None and not os.path.exists(self.init_from):
            raise ValueError(f"init_from {self.init_from!r} does not exist (a run folder or a checkpoint folder)")
        if self.task == "gsm8k" and self.data_path is not None and "/" in self.data_path \
                and (self.data_path.startswith((".", "/")) or self.data_path.endswith(".jsonl")) \
                and not os.path.exists(self.data_path):
            raise ValueError(f"data_path {self.data_path!r} does not exist")
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config field(s) for {cls.__name__}: {', '.join(unknown)}")
        return cls(**values)


def check_divergence(divergence: str, beta: float, clip: Optional[float]):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip (tau) must be > 0 or None, got {clip}")
