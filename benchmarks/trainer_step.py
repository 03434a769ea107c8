"""Case (6): one full OPSD trainer step with the fused loss vs the same trainer with an eager full-logits loss.

    python -m benchmarks.trainer_step                                # CPU defaults (random SmolLM2-shaped model)
    python -m benchmarks.trainer_step --model SmolLM2-135M-Instruct  # the real embedded model (30 layers)

The rollout is fixed (random completion tokens, no generation), so a step is: the student context's decoder
forward, the teacher context's forward under no_grad, the loss, the backward, gradient clipping and the AdamW
update. Each batch size runs in a fresh process under a memory cap (RLIMIT_AS on the CPU, a CUDA memory
fraction on a GPU); batch sizes double from ``--start-batch`` until the step runs out of memory, so the
record holds tokens/s and peak memory per batch size and the largest batch that fits under the cap.

Models: ``random-smollm2`` (default: SmolLM2-135M's shapes — hidden 576, vocabulary 49152, tied head, 9
heads / 3 KV heads, MLP 1536 — with ``--layers`` decoder layers, randomly initialised in code, nothing
downloaded), ``random-qwen2.5-0.5b`` (Qwen2.5-0.5B's config — hidden 896, vocabulary 151936, tied head, 14 heads /
2 KV heads, MLP 4864 — built the same way; 24 layers in the real model), ``tiny`` (:func:`pydistill.models.tiny_model`, for tests) or a name :func:`load_model` takes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.measure import device_name, is_oom, peak_rss_mb, reset_peak_rss, rss_mb, set_memory_cap, versions
from pydistill.losses import LossOutput
from pydistill.trainers.config import loss_temperature
from pydistill.token_stats.eager import eager_token_stats
from pydistill.token_stats.config import StatsConfig
from pydistill.trainers import OPSDConfig, OPSDTrainer
from pydistill.trainers.contexts import build_context_batch

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                  num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)


def build_model(name: str, layers: int, device, dtype, seed: int = 0):
    """(model, description) — see the module docstring for the names."""
    if name == "tiny":
        from pydistill.models import tiny_model

        model, _ = tiny_model(seed=seed)
    elif name == "random-smollm2":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, max_position_embeddings=8192, **SMOLLM2))
    elif name == "random-qwen2.5-0.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, max_position_embeddings=8192, **QWEN25_05B))
    else:
        from pydistill.models import load_model

        model, _ = load_model(name, device=device, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    cfg = model.config
    return model, dict(name=name, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, vocab=cfg.vocab_size,
                       params=sum(p.numel() for p in model.parameters()))


class _NoGeneration:
    """The fixed-rollout trainers never sample; reaching this is a bug in the benchmark."""

    def sample(self, prompts, settings):
        raise RuntimeError("the trainer-step benchmark uses a fixed rollout and must not generate")


def fixed_rollout(batch: int, prompt_len: int, teacher_prompt_len: int, completion_len: int, vocab: int, device,
                  seed: int = 0) -> dict:
    """A prepared micro-batch as OPSDTrainer.prepare returns it, from random token ids (no generation)."""
    g = torch.Generator().manual_seed(seed)

    def ids(length):
        return [torch.randint(1, vocab, (length,), generator=g).tolist() for _ in range(batch)]

    completions = ids(completion_len)
    student = build_context_batch(ids(prompt_len), completions, 0, device)
    teacher = build_context_batch(ids(teacher_prompt_len), completions, 0, device)
    tokens = int(student.completion_mask.sum())
    return dict(student=student, teacher=teacher, tokens=tokens, generated_tokens=0, metrics={})


class FixedRolloutOPSD(OPSDTrainer):
    """OPSD whose every micro-batch is the pre-built ``fixed_batch``: the step measures the loss step only."""

    fixed_batch: dict = None

    def prepare(self, problems: list) -> dict:
        return self.fixed_batch


class EagerLossOPSD(FixedRolloutOPSD):
    """The same trainer and objective with the loss a plain PyTorch user writes: full logits = h @ W.T for
    both contexts, then the (clipped) divergence per token from them, token-mean over the completion mask."""

    def loss(self, prepared: dict, num_items_in_batch: float):
        cfg = self.config
        student, _, hidden, teacher_hidden, head, teacher_head = self.scored_contexts(prepared)
        teacher_head = teacher_head or head
        divergence = cfg.divergence
        if divergence == "jsd" and cfg.beta in (0.0, 1.0):  # the JSD endpoints are the two KLs
            divergence = "forward_kl" if cfg.beta == 0.0 else "reverse_kl"
        stats_cfg = StatsConfig(temperature=loss_temperature(cfg), divergence=divergence, beta=cfg.beta,
                                clip=cfg.clip, softcap=head.softcap, teacher_softcap=teacher_head.teacher_softcap)
        b, t, width = hidden.shape
        _, entropy, div = eager_token_stats(
            hidden.reshape(b * t, width), head.weight, stats_cfg, bias=head.bias,
            teacher_hidden=teacher_hidden.reshape(b * t, -1), teacher_weight=teacher_head.weight,
            teacher_bias=teacher_head.bias, dtype=None)
        mask = student.completion_mask
        div, entropy = div.view(b, t), entropy.view(b, t)
        div, entropy = torch.where(mask, div, 0.0), torch.where(mask, entropy, 0.0)
        loss = div.sum() / num_items_in_batch  # token mean over the step's global token count
        tokens = max(int(mask.sum()), 1)
        metrics = dict(divergence=float(div.detach().sum()) / tokens, entropy=float(entropy.detach().sum()) / tokens,
                       tokens=int(mask.sum()))
        return LossOutput(loss, metrics, dict(divergence=div.detach(), entropy=entropy.detach()))


TRAINERS = {"fused": FixedRolloutOPSD, "eager": EagerLossOPSD}


def _allocated_mb(device) -> float:
    return torch.cuda.memory_allocated() / 2 ** 20 if device == "cuda" else rss_mb()


def make_trainer(loss: str, batch: int, *, model: str = "random-smollm2", layers: int = 4, device: str = "cpu",
                 dtype: str = "float32", prompt_len: int = 64, teacher_prompt_len: int = 192,
                 completion_len: int = 128, lora_r: int = 0, divergence: str = "forward_kl", clip=0.05,
                 seed: int = 0):
    """(trainer, model description): an OPSD trainer of ``loss`` ("fused" or "eager") over a fixed rollout of
    ``batch`` completions; ``trainer.training_step()`` is the measured step."""
    from pydistill.tasks import ArithmeticTask

    net, described = build_model(model, layers, device, getattr(torch, dtype), seed)
    config = OPSDConfig(model=model, lora_r=lora_r, batch_size=batch, micro_batch_size=batch, num_generations=1,
                        max_new_tokens=completion_len, eval_problems=0, train_problems=max(batch, 8),
                        output_dir=tempfile.mkdtemp(prefix="opsd-step-"), progress=False, learning_rate=1e-5,
                        max_steps=10 ** 6, divergence=divergence, clip=clip, seed=seed)
    trainer = TRAINERS[loss](config, model=net, tokenizer=None, task=ArithmeticTask(),
                             rollout_engine=_NoGeneration())
    trainer.fixed_batch = fixed_rollout(batch, prompt_len, teacher_prompt_len, completion_len,
                                        net.config.vocab_size, device, seed)
    return trainer, described


def run_child(args) -> dict:
    """One (loss, batch) measurement in this process; returns its record (status "ok") or raises."""
    device = args.device
    if device == "cuda" and args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2 ** 30 / total))
    elif args.cap_gb:
        set_memory_cap(args.cap_gb)
    trainer, described = make_trainer(
        args.loss, args.batch, model=args.model, layers=args.layers, device=device, dtype=args.dtype,
        prompt_len=args.prompt_len, teacher_prompt_len=args.teacher_prompt_len,
        completion_len=args.completion_len, lora_r=args.lora_r, divergence=args.divergence, clip=args.clip,
        seed=args.seed)
    tokens = trainer.fixed_batch["tokens"]
    t = time.perf_counter()
    trainer.training_step()  # warm-up: optimizer states, kernels, allocator pools
    _sync(device)
    first_s = time.perf_counter() - t
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    base = _allocated_mb(device)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        metrics = trainer.training_step()
        _sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else peak_rss_mb()
    step_s = statistics.median(times)
    return dict(status="ok", tokens=tokens, step_s=step_s, first_step_s=first_s, tokens_per_s=tokens / step_s,
                peak_mb=peak, extra_mb=peak - base, address_space_peak_mb=_vm_peak_mb(),
                loss_value=metrics["loss"], model=described)


def _vm_peak_mb():
    """Peak virtual size of this process: what RLIMIT_AS caps on the CPU (above the RSS: libraries, stacks)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmPeak:"))
    except (OSError, StopIteration):
        return None


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def child_command(args, loss: str, batch: int) -> list:
    cmd = [sys.executable, "-m", "benchmarks.trainer_step", "--child", "--loss", loss, "--batch", str(batch),
           "--model", args.model, "--layers", str(args.layers), "--device", args.device, "--dtype", args.dtype,
           "--prompt-len", str(args.prompt_len), "--teacher-prompt-len", str(args.teacher_prompt_len),
           "--completion-len", str(args.completion_len), "--repeats", str(args.repeats),
           "--lora-r", str(args.lora_r), "--divergence", args.divergence, "--seed", str(args.seed)]
    if args.clip is not None:
        cmd += ["--clip", str(args.clip)]
    if args.cap_gb:
        cmd += ["--cap-gb", str(args.cap_gb)]
    return cmd


def subprocess_runner(args, loss: str, batch: int) -> dict:
    """Run one (loss, batch) in a fresh process; an OOM (exception, or the kernel's SIGKILL) is a record."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # RSS follows the live tensors
    env.pop("TRITON_INTERPRET", None)
    try:
        done = subprocess.run(child_command(args, loss, batch), capture_output=True, text=True,
                              timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status=f"timeout after {args.timeout} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    text = done.stderr.lower()
    if done.returncode in (-9, 137) or "out of memory" in text or "can't allocate memory" in text:
        return dict(status="OOM")
    return dict(status=f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")


def sweep(args, runner=subprocess_runner) -> tuple:
    """Records of every (loss, batch) tried, doubling the batch until OOM, and why each loss stopped."""
    records, stops = [], {}
    for loss in args.losses:
        batch = args.start_batch
        stops[loss] = f"max batch {args.max_batch} reached"
        while batch <= args.max_batch:
            record = dict(loss=loss, batch=batch, tokens=batch * args.completion_len)
            record.update(runner(args, loss, batch))
            records.append(record)
            print(json.dumps(record), flush=True)
            if record["status"] != "ok":
                stops[loss] = f"{record['status']} at batch {batch}"
                break
            if args.max_step_s and record["step_s"] > args.max_step_s:
                stops[loss] = f"step time {record['step_s']:.0f} s > --max-step-s {args.max_step_s} at batch {batch}"
                break
            batch *= 2
    return records, stops


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainer_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random-smollm2")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the random-* models")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--losses", nargs="+", default=["fused", "eager"], choices=sorted(TRAINERS))
    p.add_argument("--start-batch", type=int, default=1, help="rollouts in the first step; doubled until OOM")
    p.add_argument("--max-batch", type=int, help="default: 32 on the CPU, 4096 on CUDA")
    p.add_argument("--max-step-s", type=float, help="stop doubling after a step this slow (default: 60 s on the "
                                                    "CPU, none on CUDA)")
    p.add_argument("--cap-gb", type=float, help="memory cap per process in GiB (default: 3 of address space on "
                                                "the CPU, 16 on CUDA); 0 for none")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--teacher-prompt-len", type=int, default=192, help="the teacher context adds the solution")
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--lora-r", type=int, default=0, help="0: full fine-tune (the lm_head trains)")
    p.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--clip", type=float, default=0.05, help="OPSD's pointwise clip; a negative value disables it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--out", default="benchmarks/results/trainer-step")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loss", choices=sorted(TRAINERS), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.max_batch = args.max_batch or (4096 if cuda else 32)
    if args.max_step_s is None:
        args.max_step_s = None if cuda else 60.0
    if args.cap_gb is None:
        args.cap_gb = 16.0 if cuda else 3.0
    args.cap_gb = args.cap_gb or None
    if args.clip is not None and args.clip <= 0:
        args.clip = None
    for name in ("layers", "start_batch", "max_batch", "prompt_len", "teacher_prompt_len", "completion_len",
                 "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.child:
        record = dict(loss=args.loss, batch=args.batch)
        try:
            record.update(run_child(args))
        except Exception as exc:  # noqa: BLE001 - an OOM or a failure is recorded, never dropped
            record["status"] = "OOM" if is_oom(exc) else f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps(record), flush=True)
        return 0
    from benchmarks.report import write_outputs

    started = time.perf_counter()
    records, stops = sweep(args)
    described = [r.pop("model") for r in records if "model" in r]
    model = described[0] if described else dict(name=args.model)
    results = dict(kind="trainer", date=datetime.date.today().isoformat(),
                   command="python -m benchmarks.trainer_step " + " ".join(argv), device=args.device,
                   device_name=device_name(args.device), cap_gb=args.cap_gb, dtype=args.dtype, model=model,
                   prompt_len=args.prompt_len, teacher_prompt_len=args.teacher_prompt_len,
                   completion_len=args.completion_len, repeats=args.repeats, lora_r=args.lora_r,
                   divergence=args.divergence, clip=args.clip, stops=stops,
                   wall_s=round(time.perf_counter() - started, 1), **versions(), records=records)
    paths = write_outputs(results, args.out)
    print(open(paths["md"]).read())
    print(f"wrote {', '.join(paths.values())} in {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
