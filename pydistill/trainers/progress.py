"""The training progress bar, drawn over the bound that ends the run.

A run stops at ``max_steps``, the time budget or the generated-token budget, whichever comes first. A time-boxed
run (``make demo``: 9 minutes, with ``max_steps`` 1000 only as a ceiling) drawn over its steps showed 1000 steps
and an ETA of hours; its bar is over the seconds of training instead, so that the bar and the ETA say when it
ends, and the step count sits beside the loss.
"""
from __future__ import annotations

from tqdm.auto import tqdm

# The bar of each bound: (what it counts, the line's middle part).
_FORMATS = {"seconds": "{n:.0f}/{total:.0f} s of training", "tokens": "{n:.0f}/{total:.0f} generated tokens"}


def bound_of(config) -> str:
    """What the bar counts: the time budget when there is one (it ends the run unless max_steps is small), else
    the generated-token budget, else the steps."""
    if config.time_budget_s:
        return "seconds"
    if config.generated_token_budget:
        return "tokens"
    return "steps"


class TrainProgress:
    """A tqdm bar over :func:`bound_of` the config, which the training loop moves after each step."""

    def __init__(self, config, desc: str, *, step: int = 0, train_seconds: float = 0.0, generated_tokens: int = 0,
                 disable: bool = False):
        self.kind, self.max_steps = bound_of(config), config.max_steps
        total = dict(seconds=float(config.time_budget_s), tokens=config.generated_token_budget,
                     steps=config.max_steps)[self.kind]
        options = {}
        if self.kind != "steps":
            options["bar_format"] = ("{desc}: {percentage:3.0f}%|{bar}| " + _FORMATS[self.kind]
                                     + " [{elapsed}<{remaining}{postfix}]")
        start = self._value(step, train_seconds, generated_tokens)
        self.bar = tqdm(total=total, initial=min(start, total), desc=desc, disable=disable, **options)

    def _value(self, step, train_seconds, generated_tokens):
        return dict(seconds=train_seconds, tokens=generated_tokens, steps=step)[self.kind]

    def update(self, *, step: int, train_seconds: float, generated_tokens: int, loss: float) -> None:
        # The last step may run past a budget: the bar stops full rather than beyond 100%.
        value = min(self._value(step, train_seconds, generated_tokens), self.bar.total)
        self.bar.update(value - self.bar.n)
        postfix = {} if self.kind == "steps" else dict(step=f"{step}/{self.max_steps}")
        self.bar.set_postfix(ordered_dict=dict(postfix, loss=f"{loss:.4f}"))

    def close(self) -> None:
        self.bar.close()
