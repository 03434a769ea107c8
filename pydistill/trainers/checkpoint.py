"""Checkpoints: trainable weights (safetensors), optimizer, scheduler, RNG states, step and data position.

Guarantees, whatever moment a run is killed at (SIGKILL included):

- ``output_dir/latest`` names a complete checkpoint folder of this run (or does not exist yet). A checkpoint is
  written into a hidden temporary folder and renamed into place only when complete; ``latest`` is replaced
  atomically afterwards. The previous good checkpoint is never removed before the new one is complete and
  named by ``latest`` — a re-save of an existing step goes through ``checkpoint-<step>.next``.
- No checkpoint holds non-finite weights (:class:`NonFiniteWeights` is raised instead).
- Loading runs no pickled code: ``training_state.pt`` holds tensors and plain values only and is read with
  ``torch.load(weights_only=True)``; ``latest`` may only name a ``checkpoint-<step>`` folder inside the run.
- :func:`clean_stale` removes what a killed save left behind (temporary folders, a half-finished re-save).

Under FSDP2 (``sharded=True``) every process holds a shard of each parameter and of its optimizer state: a save
gathers whole tensors on every process (collectives) and the main process writes whole tensors, so the weights
and the exported folders load with or without sharding, on any number of processes; the optimizer state is
keyed by parameter name there, and resumes under FSDP2 on any number of processes. A load gives each process
its shard of the whole tensors read from the files.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
_TMP_PREFIX = ".tmp-checkpoint-"
_TRASH_PREFIX = ".trash-checkpoint-"
_NEXT = ".next"
_NAME = re.compile(r"^checkpoint-(\d+)(\.next)?$")


class NonFiniteWeights(RuntimeError):
    """A checkpoint was refused because a weight holds NaN or inf."""


class CheckpointError(ValueError):
    """A run folder's checkpoint pointer or files are not what this run wrote."""


def _trainable_state(model) -> dict:
    # named_parameters() lists a tied weight once, which safetensors requires; a DTensor shard is gathered whole
    # (a collective: every process of a sharded run calls this)
    return {n: _whole(p).detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _whole(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def gather_training_state(model, optimizer, policy=None, sharded: bool = False):
    """(trainable weights, optimizer state) as whole tensors, for :func:`save_checkpoint`. Under FSDP2 a
    collective: call it on every process; the optimizer state is then keyed by parameter name (torch's
    distributed-checkpoint "full" form for ``policy``, the prepared module that owns the parameters) and is
    complete on the main process only."""
    if sharded:
        policy.reshard()  # the root unit stays whole after a forward without backward; its shards are the params
    weights = _trainable_state(model)
    if not sharded:
        return weights, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return weights, get_optimizer_state_dict(policy, optimizer, options=options)


def _check_finite(state: dict, what: str):
    bad = [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise NonFiniteWeights(f"refusing to save {what} with non-finite values in {len(bad)} tensor(s), "
                               f"e.g. {bad[0]}")


def rng_state() -> dict:
    """Every RNG state as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    numpy_state = dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                       has_gauss=int(has_gauss), cached=float(cached))
    return dict(python=[version, list(internal), gauss], numpy=numpy_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
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


def _remove_folder(path: str):
    """Rename out of the way first, so that a kill during the delete never leaves a half folder under a
    checkpoint's name."""
    if not os.path.exists(path):
        return
    trash = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=_TRASH_PREFIX)
    os.replace(path, os.path.join(trash, "old"))
    shutil.rmtree(trash, ignore_errors=True)


def _pointer(output_dir: str) -> Optional[str]:
    path = os.path.join(output_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    if not _NAME.match(name):
        raise CheckpointError(f"{path} names {name!r}, which is not a checkpoint-<step> folder of this run "
                              "(refusing to follow it)")
    return name


def export_pretrained(folder: str, model, tokenizer=None, weights: Optional[dict] = None):
    """Write ``model`` where the ecosystem loads it from: under LoRA a PEFT adapter folder ``adapter/``
    (``PeftModel.from_pretrained(base, folder/adapter)``), else a ``save_pretrained`` folder ``model/`` with the
    tokenizer (``AutoModelForCausalLM.from_pretrained(folder/model)``). ``weights``: whole trainable tensors
    by parameter name, written instead of the model's own (which are shards under FSDP)."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(os.path.join(folder, "adapter"), state_dict=weights)
        return
    target = os.path.join(folder, "model")
    model.save_pretrained(target, safe_serialization=True, state_dict=weights)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, trainer_state: dict,
                    teacher_state=None, rng: Optional[dict] = None, export=None, gathered=None,
                    keep: Optional[int] = None) -> str:
    """Write ``output_dir/checkpoint-<step>`` and point ``output_dir/latest`` at it (see the module docstring).

    ``rng``: the RNG states to record (default: the current ones). ``export(folder)``: writes more files into
    the checkpoint before it is renamed into place (e.g. :func:`export_pretrained`). ``gathered``: the
    (weights, optimizer state) of :func:`gather_training_state` when already gathered (sharded runs).
    ``keep``: after ``latest`` names the new checkpoint, delete all but the newest ``keep`` checkpoints.
    (accelerate's ``total_limit`` deletes before it writes, which a kill mid-save would turn into no checkpoint.)"""
    os.makedirs(output_dir, exist_ok=True)
    weights, optimizer_state = gathered if gathered is not None else gather_training_state(model, optimizer)
    _check_finite(weights, "weights")
    teacher = None
    if teacher_state is not None:
        teacher = {k: v.detach().cpu().contiguous() for k, v in teacher_state.items()}
        _check_finite(teacher, "the teacher's weights")
    name = f"checkpoint-{step}"
    final = os.path.join(output_dir, name)
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=_TMP_PREFIX)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from the user's group
    try:
        save_file(weights, os.path.join(tmp, "weights.safetensors"))
        if teacher is not None:
            save_file(teacher, os.path.join(tmp, "teacher.safetensors"))
        torch.save(dict(optimizer=optimizer_state, scheduler=scheduler.state_dict(),
                        rng=rng if rng is not None else rng_state()),
                   os.path.join(tmp, "training_state.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(dict(trainer_state, step=step), f, indent=2)
        if export is not None:
            export(tmp)
        if os.path.exists(final) and _pointer(output_dir) == name:
            # Re-saving the step `latest` names: the new copy becomes `latest` under another name first.
            os.replace(tmp, final + _NEXT)
            _atomic_write_text(os.path.join(output_dir, LATEST), name + _NEXT)
            _finish_resave(output_dir, name)
            prune_checkpoints(output_dir, keep)
            return final
        _remove_folder(final)  # an older copy no pointer names (left by a run killed before `latest` moved)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(os.path.join(output_dir, LATEST), name)
    prune_checkpoints(output_dir, keep)
    return final


def prune_checkpoints(output_dir: str, keep: Optional[int]):
    """Delete all but the newest ``keep`` ``checkpoint-<step>`` folders (None: keep all); never the one
    ``latest`` names."""
    if keep is None:
        return
    latest = _pointer(output_dir)
    steps = sorted((int(m.group(1)), entry) for entry in os.listdir(output_dir)
                   for m in [_NAME.match(entry)] if m and not m.group(2))
    for _, entry in steps[:max(0, len(steps) - keep)]:
        if entry != latest:
            _remove_folder(os.path.join(output_dir, entry))


def _finish_resave(output_dir: str, name: str):
    """``latest`` names ``<name>.next``: move it into ``<name>``'s place, then point ``latest`` back."""
    _remove_folder(os.path.join(output_dir, name))
    os.replace(os.path.join(output_dir, name + _NEXT), os.path.join(output_dir, name))
    _atomic_write_text(os.path.join(output_dir, LATEST), name)


def clean_stale(output_dir: str):
    """Finish or undo what a killed save left: temporary and trash folders, a ``.next`` re-save, stray
    temporary pointer files. Call it at the start of a run, while holding the run folder's lock."""
    if not os.path.isdir(output_dir):
        return
    pointer = _pointer(output_dir)
    if pointer is not None and pointer.endswith(_NEXT):
        base = pointer[:-len(_NEXT)]
        if os.path.isdir(os.path.join(output_dir, pointer)):
            _finish_resave(output_dir, base)
        elif os.path.isdir(os.path.join(output_dir, base)):  # killed after the rename, before `latest` moved
            _atomic_write_text(os.path.join(output_dir, LATEST), base)
    for entry in os.listdir(output_dir):
        path = os.path.join(output_dir, entry)
        if entry.startswith((_TMP_PREFIX, _TRASH_PREFIX)) or (entry.endswith(_NEXT) and _NAME.match(entry)):
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(".tmp-") and os.path.isfile(path):
            os.remove(path)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint folder ``output_dir/latest`` names, or None (no pointer yet). A pointer to anything but a
    ``checkpoint-<step>`` folder of this run raises :class:`CheckpointError`."""
    name = _pointer(output_dir)
    if name is None:
        return None
    path = os.path.join(output_dir, name)
    if not os.path.isdir(path) and name.endswith(_NEXT):  # killed between the rename and the pointer update
        path = path[:-len(_NEXT)]
    if not os.path.isdir(path):
        raise CheckpointError(f"{os.path.join(output_dir, LATEST)} names {name!r}, which does not exist")
    if os.path.islink(path):  # e.g. linked in from another run: resuming would train on its state unnoticed
        raise CheckpointError(f"{path} is a symbolic link to {os.readlink(path)!r}, not a checkpoint folder of this "
                              "run (refusing to follow it)")
    return path


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "weights.safetensors"))


def resolve_checkpoint(path: str, field: str = "init_from") -> str:
    """A run folder (its latest checkpoint) or a checkpoint folder; one clear error otherwise."""
    if not os.path.exists(path):
        raise ValueError(f"{field} {path!r} does not exist (expected a run folder or a checkpoint folder)")
    if not os.path.isdir(path):
        raise ValueError(f"{field} {path!r} is a file, not a folder (expected a run folder or a checkpoint folder)")
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if not is_checkpoint(path):
        raise ValueError(f"{field} {path!r} holds no checkpoint (expected a run folder with a `latest` pointer "
                         "or a checkpoint folder with weights.safetensors)")
    return path


def _read_tensors(path: str) -> dict:
    try:
        return load_file(path)
    except Exception as exc:  # safetensors' error names neither the file nor the likely cause
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}: {str(exc).splitlines()[0]}): the file is "
                              "truncated or not a safetensors file") from None


def read_trainer_state(checkpoint: str) -> dict:
    """A checkpoint's ``trainer_state.json`` (step, data position, the run's config); one line naming it if broken."""
    path = os.path.join(checkpoint, "trainer_state.json")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}): the checkpoint is damaged") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(state).__name__}")
    return state


def load_weights(model, checkpoint: str):
    """Load a checkpoint's trainable weights into ``model`` (same architecture and LoRA settings)."""
    path = os.path.join(checkpoint, "weights.safetensors")
    state = _read_tensors(path)
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} holds weights the model lacks (different LoRA settings or "
                         f"architecture?): {missing[:3]}")
    # a DTensor's shape is the whole tensor's; copy_ would raise a bare size mismatch
    wrong = [(n, tuple(v.shape), tuple(params[n].shape)) for n, v in state.items() if v.shape != params[n].shape]
    if wrong:
        name, saved, wanted = wrong[0]
        raise ValueError(f"{path} holds {name} of shape {saved}, the model's is {wanted} ({len(wrong)} such "
                         "tensor(s)): it was trained from another model or size (pass the run's model with "
                         "--model / model)")
    with torch.no_grad():
        for name, value in state.items():
            param = params[name]
            value = value.to(param.device, param.dtype)
            if hasattr(param, "device_mesh"):  # an FSDP2 shard: keep this process's part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, param.device_mesh, param.placements)
            param.copy_(value)


def _follow_schedule(optimizer, scheduler):
    """Set each group's learning rate from the schedule at its restored position: the optimizer's saved rate
    belongs to the old schedule (e.g. 0 at the end of a linear decay when max_steps grew on resume)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def load_checkpoint(checkpoint: str, model, optimizer, scheduler, policy=None, sharded: bool = False):
    """Restore weights, optimizer, scheduler and RNG states; returns (trainer_state, teacher_state or None).
    ``sharded``: FSDP2 (every process reads the files and keeps its shards; ``policy`` as for
    :func:`gather_training_state`)."""
    trainer_state = read_trainer_state(checkpoint)  # before any state changes: a broken file changes nothing
    if sharded:
        policy.reshard()  # write into the shards, not into a whole root view that the next reshard drops
    load_weights(model, checkpoint)
    try:
        state = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=True)
    except Exception as exc:  # an old pickle-based file, or a planted one: never unpickle code
        raise CheckpointError(f"cannot read {checkpoint}/training_state.pt as plain tensors and values "
                              f"({type(exc).__name__}); it is truncated or was not written by this version of "
                              "pydistill") from None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _follow_schedule(optimizer, scheduler)
    set_rng_state(state["rng"])
    teacher_file = os.path.join(checkpoint, "teacher.safetensors")
    teacher = _read_tensors(teacher_file) if os.path.exists(teacher_file) else None
    return trainer_state, teacher
