"""The shared training loop: rollouts, teacher contexts, the fused-loss step, evaluation, checkpoints.

A method subclasses :class:`Trainer` and provides two things: :meth:`Trainer.prepare` (sample rollouts for a
micro-batch of problems and build whatever contexts its loss needs) and :meth:`Trainer.loss` (the loss of one
prepared micro-batch from hidden states, through the fused op). Everything else — models, LoRA, the
optimizer and schedule, gradient accumulation with global token normalization, DDP through accelerate,
atomic checkpoints and exact resume, JSONL/TensorBoard logging, periodic evaluation (its own part:
:mod:`pydistill.trainers.held_out`) and a time budget — is here.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import os
import resource
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch
from accelerate.utils import set_seed

from ..tasks import task_from_config
from . import run_folder
from .accel import (finish_trackers, init_trackers, log_to_trackers, make_accelerator, policy_model, root_view,
                    start_sharded, uses_sharded_parameters)
from .checkpoint import (NonFiniteWeights, export_pretrained, gather_training_state, latest_checkpoint,
                         load_checkpoint, rng_state, save_checkpoint)
from .config import TrainConfig
from .metrics import MetricsLog
from .progress import TrainProgress
from .rollout import HFRolloutEngine, SamplingSettings
from ..boundary import ResponseHiddenStates
from .held_out import HeldOutEvaluation
from .teacher import Teacher


class NonFiniteTraining(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer(HeldOutEvaluation, abc.ABC):
    """Base trainer; see the module docstring for what a method adds."""

    def __init__(self, config: TrainConfig, model=None, tokenizer=None, rollout_engine=None, task=None):
        self.config = config.validate()
        set_seed(config.seed)  # python, numpy and torch (every CUDA device too)
        # Trackers (report_to) and precision: a full fine-tune on CUDA keeps fp32 weights under bf16 autocast.
        self.accelerator, precision = make_accelerator(config, full_finetune=not config.lora_r)
        self.world = self.accelerator.num_processes
        if config.batch_size % (config.micro_batch_size * self.world):
            raise ValueError(f"batch_size {config.batch_size} must be a multiple of micro_batch_size "
                             f"{config.micro_batch_size} x {self.world} processes")
        self.is_main = self.accelerator.is_main_process
        self._lock = None  # for close() and __del__ should the claim fail
        self._lock = run_folder.claim(config, self.accelerator)  # before any model is loaded
        model, self.tokenizer = policy_model(config, model, tokenizer, self.accelerator.device, precision)
        self._load_problems(task)
        self._prepare_training(model, rollout_engine)
        self._start_run()

    def _load_problems(self, task):
        config = self.config
        self.task = task or task_from_config(config)
        self.train_pool = self.task.problems(config.train_split, n=config.train_problems, seed=config.seed)
        if not self.train_pool:
            raise ValueError(f"the {config.train_split!r} split of task {config.task!r} has no problems")
        # No held-out evaluation (eval_problems 0) needs no eval split: a one-file dataset has only "train".
        self.eval_set = (self.task.problems(config.eval_split, n=config.eval_problems, seed=config.seed + 1)
                         if config.eval_problems else [])
        if config.eval_problems and not self.eval_set:  # else accuracy 0.0 over no problems, logged as a result
            raise ValueError(f"eval_problems {config.eval_problems} asks for held-out problems, but the "
                             f"{config.eval_split!r} split of task {self.task.name!r} has no problems")

    def _prepare_training(self, model, rollout_engine):
        """Optimizer, schedule, teacher, the accelerate-wrapped policy and the rollout engine."""
        from transformers import get_scheduler

        config = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                                       num_training_steps=config.max_steps)
        model.to(self.accelerator.device)
        self.model = model
        # A method without a teacher or reference model (GRPO with beta = 0) keeps no frozen copy. Built before
        # prepare: under FSDP a teacher copy must be taken from the whole weights, not the shards.
        self.teacher = (Teacher(self.model, config.teacher, config.ema_rate, starts_from_base=not config.init_from)
                        if self.uses_teacher() else None)
        # DDP wraps the body-as-a-module (see ResponseHiddenStates): its forward is what the loss runs.
        self.policy, self.optimizer = self.accelerator.prepare(ResponseHiddenStates(model), optimizer)
        self.sharded = uses_sharded_parameters(self.accelerator)  # FSDP2: see accel.root_view
        if self.sharded:
            if not self.supports_sharded_parameters:
                raise ValueError(f"{self.method} does not run under FSDP: its processes generate different numbers "
                                 "of batches, and sharded forwards must run in lock step (use DDP)")
            start_sharded(self.policy, self.accelerator.device)
        self.engine = rollout_engine or HFRolloutEngine(self.model, self.tokenizer,
                                                        batch_size=config.micro_batch_size * config.num_generations,
                                                        synced_gpus=self.sharded)
        self.sampling = SamplingSettings(config.max_new_tokens, config.temperature, config.top_p, config.top_k,
                                         config.num_generations)

    def _start_run(self):
        """The step counters, the metrics log and trackers, and the resumed state with ``resume``."""
        config = self.config
        self.step, self.data_position, self.train_seconds, self.generated_tokens = 0, 0, 0.0, 0
        self.nonfinite_steps, self.nonfinite_in_a_row = 0, 0
        self._saved_step, self._step_snapshot = None, None
        self.log = MetricsLog(config.output_dir) if self.is_main else None
        init_trackers(self.accelerator, config, self.method)
        if config.resume:
            try:
                self._resume()
            except BaseException:
                self.close()
                raise

    def close(self):
        """Give back the run folder's lock (``train`` does at its end; a trainer that never trains holds it
        until this call or its collection)."""
        if self._lock is not None:
            run_folder.release(self._lock)
            self._lock = None

    def __del__(self):
        if getattr(self, "_lock", None) is not None:
            self.close()

    # Whether every process runs the same number of generate calls and forwards per step (FSDP needs it).
    supports_sharded_parameters = True

    # ----- what a method provides ---------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, problems: list) -> dict:
        """Rollouts and contexts for one micro-batch; must include ``tokens`` (trained token count, int)."""

    @abc.abstractmethod
    def loss(self, prepared: dict, num_items_in_batch: float):
        """The :class:`pydistill.losses.LossOutput` of one prepared micro-batch."""

    def uses_teacher(self) -> bool:
        """Whether the method scores anything with a teacher or reference model (built from ``config.teacher``)."""
        return True

    def finalize_batch(self, prepared: list) -> None:
        """Called once per optimizer step with this process's prepared micro-batches, before any loss: the
        place for statistics over the whole batch (e.g. batch-scaled advantages)."""

    # ----- the loop -------------------------------------------------------------------------------------
    def _next_problems(self, count: int) -> list:
        pool = self.train_pool
        out = [pool[(self.data_position + i) % len(pool)] for i in range(count)]
        self.data_position += count
        return out

    def training_step(self) -> dict:
        """One optimizer step. A non-finite loss or gradient norm skips the update (the gradients are dropped,
        the weights and optimizer moments stay as they were) and counts in ``nonfinite_skipped``; after
        ``max_nonfinite_steps`` such steps in a row :class:`NonFiniteTraining` ends the run."""
        cfg = self.config
        started = time.perf_counter()
        # What an emergency checkpoint records if this step dies before its update (see train()).
        self._step_snapshot = dict(data_position=self.data_position, rng=rng_state(),
                                   generated_tokens=self.generated_tokens, updated=False)
        global_batch = self._next_problems(cfg.batch_size)
        mine = global_batch[self.accelerator.process_index::self.world]  # each process its share
        micro = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
        # bf16 autocast when the run has fp32 master weights; the root's parameters whole under FSDP.
        with self.accelerator.autocast(), self.root_view():
            prepared = [self.prepare(problems) for problems in micro]
        self.finalize_batch(prepared)
        generated = time.perf_counter()
        metrics = self.optimizer_step(prepared, self.loss, self.optimizer, self.scheduler, f"step {self.step + 1}")
        if self.teacher is not None and not metrics["nonfinite_skipped"]:
            self.teacher.update()
        elapsed = time.perf_counter() - started
        generated_tokens = sum(p.get("generated_tokens", p["tokens"]) for p in prepared)
        self.generated_tokens += generated_tokens
        num_items = metrics["trained_tokens"]
        metrics.update(learning_rate=self.scheduler.get_last_lr()[0], step_seconds=elapsed,
                       rollout_seconds=generated - started,
                       tokens_per_second=(generated_tokens + num_items / self.world) / max(elapsed, 1e-9),
                       peak_memory_mb=peak_memory_mb(), generated_tokens_total=self.generated_tokens,
                       nonfinite_skipped_total=self.nonfinite_steps)
        health = getattr(getattr(self, "reward", None), "health", None)
        if health is not None:
            metrics.update(health.as_metrics())
        return metrics

    def optimizer_step(self, prepared: list, loss, optimizer, scheduler, where: str) -> dict:
        """The gradient half of a step, shared by every training stage (ExGRPO's SFT warm-up too): each micro-batch's
        ``loss(prepared, num_items)`` backward under autocast and the model view, clipping, the non-finite and
        empty-step guards, the schedule. Returns the losses' mean metrics, loss, grad_norm, trained_tokens, ..."""
        # Global token count: every token of the optimizer step weighs the same, whatever its micro-batch.
        tokens = torch.tensor(float(sum(p["tokens"] for p in prepared)), device=self.accelerator.device)
        num_items = float(self.accelerator.reduce(tokens, reduction="sum")) if self.world > 1 else float(tokens)
        self.model.train()
        metrics, total = {}, 0.0
        for i, batch in enumerate(prepared):
            context = self.accelerator.no_sync(self.policy) if i < len(prepared) - 1 else contextlib.nullcontext()
            with context, self.accelerator.autocast(), self.root_view():
                out = loss(batch, max(num_items, 1.0))
                # DDP averages gradients over processes; the loss is already normalized globally.
                self.accelerator.backward(out.loss * self.world)
            total += float(out.loss.detach())
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / len(prepared)
            for k, v in batch.get("metrics", {}).items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / len(prepared)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        skipped = self.nonfinite_update(total, grad_norm)
        # A step without any trained token (ROSD dropping every group) carries no signal, yet AdamW's momentum
        # alone would move every weight: no update then either.
        if not skipped and num_items > 0:
            optimizer.step()
        self._step_snapshot["updated"] = True
        with warnings.catch_warnings():  # the schedule follows the step count, updated or not
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.check_nonfinite_streak(total, grad_norm, where)
        metrics.update(loss=total, grad_norm=float(grad_norm), trained_tokens=num_items, nonfinite_skipped=int(skipped))
        return metrics

    def nonfinite_update(self, total: float, grad_norm) -> bool:
        """Whether this update must be skipped: a non-finite loss or gradient norm on any process (all of them
        decide alike). Counts it; the caller drops the gradients instead of stepping the optimizer."""
        bad = torch.tensor(float(not (np.isfinite(total) and torch.isfinite(torch.as_tensor(grad_norm)).all())),
                           device=self.accelerator.device)
        if self.world > 1:
            bad = self.accelerator.reduce(bad, reduction="max")
        skipped = bool(bad > 0)
        self.nonfinite_steps += skipped
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        return skipped

    def check_nonfinite_streak(self, total: float, grad_norm, where: str):
        """:class:`NonFiniteTraining` after ``max_nonfinite_steps`` skipped updates in a row."""
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_steps:
            raise NonFiniteTraining(
                f"{self.nonfinite_in_a_row} optimizer steps in a row (up to {where}) had a non-finite loss ({total}) "
                f"or gradient norm ({float(grad_norm)}); each was skipped, the weights are unchanged since the last "
                "good step. Lower learning_rate, check the rewards and inputs, or raise max_nonfinite_steps")

    def root_view(self):
        """The FSDP2 root unit's parameters whole for the span of the context (no-op without FSDP)."""
        return root_view(self.policy, self.sharded)

    def train(self) -> dict:
        """Run until ``max_steps``, the time budget or the generated-token budget; returns the last metrics (with
        the final evaluation)."""
        try:
            return self._train()
        except BaseException as exc:
            self._emergency_save(exc)
            raise
        finally:
            self.close()

    def _train(self) -> dict:
        cfg = self.config
        last = {}
        bar = TrainProgress(cfg, f"train {self.method}", step=self.step, train_seconds=self.train_seconds,
                            generated_tokens=self.generated_tokens, disable=not (cfg.progress and self.is_main))
        while self.step < cfg.max_steps:
            if cfg.time_budget_s and self.train_seconds >= cfg.time_budget_s:
                break
            if cfg.generated_token_budget and self.generated_tokens >= cfg.generated_token_budget:
                break
            started = time.perf_counter()
            last = self.training_step()
            self.step += 1
            self._step_snapshot = None
            self.train_seconds += time.perf_counter() - started
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                last.update(self.evaluate())
            if self.is_main:
                self.log.log(self.step, last)
                log_to_trackers(self.accelerator, self.step, last)
                bar.update(step=self.step, train_seconds=self.train_seconds, generated_tokens=self.generated_tokens,
                           loss=last["loss"])
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
        bar.close()
        self.save()
        final = self.evaluate() if cfg.eval_problems else {}
        if self.is_main and final:
            self.log.log(self.step, final)
            log_to_trackers(self.accelerator, self.step, final)
        finish_trackers(self.accelerator)
        last.update(final)
        return last

    # ----- checkpoints --------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return dict(data_position=self.data_position, train_seconds=self.train_seconds, method=self.method,
                    generated_tokens=self.generated_tokens, nonfinite_steps=self.nonfinite_steps,
                    config=dataclasses.asdict(self.config))

    def save(self, rng: Optional[dict] = None) -> Optional[str]:
        """Checkpoint the current step (a no-op when this step is already saved: the end of a run whose
        max_steps is a multiple of save_every, or a finished run resumed)."""
        self.accelerator.wait_for_everyone()
        if self._saved_step == self.step:
            return None
        # Under FSDP2 every process takes part in gathering the whole tensors; the main process writes them.
        gathered = gather_training_state(self.model, self.optimizer, self.policy, self.sharded)
        if not self.is_main:
            self._saved_step = self.step
            return None
        teacher_state = self.teacher.state_dict() if self.teacher is not None else None
        export = ((lambda folder: export_pretrained(folder, self.model, self.tokenizer, weights=gathered[0]))
                  if self.config.save_pretrained else None)
        path = save_checkpoint(self.config.output_dir, self.step, self.model, self.optimizer, self.scheduler,
                               self.trainer_state(), teacher_state, rng=rng, export=export, gathered=gathered,
                               keep=self.config.save_total_limit)
        self._saved_step = self.step
        return path

    def _emergency_save(self, exc: BaseException):
        """On any exception in the loop, checkpoint what is consistent: the step before the failing one when
        its update had not happened yet (its data position and RNG states restored), else the current state.
        Only in a single process: the other processes of a DDP run may be waiting in a collective."""
        if self.world > 1 or not self.is_main:
            return
        snapshot, rng = self._step_snapshot, None
        if snapshot is not None and not snapshot["updated"]:
            self.data_position, self.generated_tokens = snapshot["data_position"], snapshot["generated_tokens"]
            rng = snapshot["rng"]
        elif snapshot is not None:  # died after the update, before the step was counted
            self.step += 1
        self._step_snapshot = None
        try:
            path = self.save(rng=rng)
        except NonFiniteWeights as error:
            print(f"pydistill: no emergency checkpoint after {type(exc).__name__}: {error}", file=sys.stderr)
            return
        except Exception as error:  # the original exception is what the user must see
            print(f"pydistill: the emergency checkpoint after {type(exc).__name__} failed: {error}",
                  file=sys.stderr)
            return
        if path:
            print(f"pydistill: {type(exc).__name__} at step {self.step + 1}; saved {path} (resume with "
                  "--resume true)", file=sys.stderr)

    def _resume(self):
        path = latest_checkpoint(self.config.output_dir)
        if path is None:  # killed before its first checkpoint: start over, without the old log lines
            if self.is_main:
                run_folder.truncate_metrics(self.log.path, 0)
            return
        state, teacher_state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.policy,
                                               self.sharded)
        if self.teacher is not None:
            self.teacher.load_state_dict(teacher_state)
        self.step, self.data_position = state["step"], state["data_position"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.generated_tokens = state.get("generated_tokens", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self._saved_step = self.step
        if self.is_main:  # the steps after the checkpoint will be logged again
            run_folder.truncate_metrics(self.log.path, self.step)


def write_summary(output_dir: str, summary: dict):
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
