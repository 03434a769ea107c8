"""The KL reference of ExGRPO's stage 2: the policy's trainable weights when the stage starts."""
from __future__ import annotations

import contextlib


class StageReference:
    """pi_ref: the trainable weights at the start of stage 2, swapped in (no copy) for the reference forward.

    Only trainable tensors are kept — the LoRA adapter under LoRA, every weight for a full fine-tune — since
    the frozen ones are shared. Provides the core's teacher interface (update, state_dict, load_state_dict) so
    the snapshot travels with every checkpoint and a resumed run keeps the same reference.
    """

    def __init__(self, model):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.snapshot = {n: p.detach().clone() for n, p in self.params}

    @contextlib.contextmanager
    def weights(self):
        """Inside: the model computes with the reference weights (use under no_grad)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self):
        # Exchanging the tensors behind the parameters: no copy, and the Parameter objects (which the
        # optimizer and DDP hold) stay the same.
        for name, param in self.params:
            param.data, self.snapshot[name] = self.snapshot[name], param.data

    def update(self):
        """The reference stays fixed."""

    def state_dict(self):
        return self.snapshot

    def load_state_dict(self, state):
        if state is None:
            return
        for name, value in state.items():
            self.snapshot[name].copy_(value)
