"""Atomic checkpoints: trainable weights (safetensors), optimizer, scheduler, RNG states, step and data position.

A checkpoint is written into a temporary folder beside its final place and renamed into place, and the
``latest`` pointer is replaced atomically, so a run killed at any moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _trainable_state(model) -> dict:
    # named_parameters() lists a tied weight once, which safetensors requires
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: str, text: str):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, trainer_state: dict,
                    teacher_state=None) -> str:
    """Write ``output_dir/checkpoint-<step>`` atomically and point ``output_dir/latest`` at it."""
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=".tmp-checkpoint-")
    try:
        save_file(_trainable_state(model), os.path.join(tmp, "weights.safetensors"))
        if teacher_state is not None:
            save_file({k: v.cpu().contiguous() for k, v in teacher_state.items()},
                      os.path.join(tmp, "teacher.safetensors"))
        torch.save(dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state()),
                   os.path.join(tmp, "training_state.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(dict(trainer_state, step=step), f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(os.path.join(output_dir, LATEST), os.path.basename(final))
    return final


def latest_checkpoint(output_dir: str):
    pointer = os.path.join(output_dir, LATEST)
    if not os.path.exists(pointer):
        return None
    path = os.path.join(output_dir, open(pointer).read().strip())
    return path if os.path.isdir(path) else None


def load_weights(model, checkpoint: str):
    """Load a checkpoint's trainable weights into ``model`` (same architecture and LoRA settings)."""
    state = load_file(os.path.join(checkpoint, "weights.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} holds weights the model lacks (different LoRA settings or "
                         f"architecture?): {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def load_checkpoint(checkpoint: str, model, optimizer, scheduler):
    """Restore weights, optimizer, scheduler and RNG states; returns (trainer_state, teacher_state or None)."""
    load_weights(model, checkpoint)
    state = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    teacher_file = os.path.join(checkpoint, "teacher.safetensors")
    teacher = load_file(teacher_file) if os.path.exists(teacher_file) else None
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        return json.load(f), teacher
