"""TRL's SDPO / SDFT drop-ins read each model's head once per step: under FSDP2 every
:func:`pydistill.boundary.read_head` gathers the head's shards, and a teacher that is the student model itself
(``teacher_model_kind="live"``) shares the student's one read."""
import pytest

pytest.importorskip("trl")

import pydistill.integrations.trl as pydistill_trl  # noqa: E402
from pydistill.integrations.trl._head import unwrap  # noqa: E402
from tests.helpers import count_head_reads  # noqa: E402
from tests.trl_helpers import run_self_distillation  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind, options", [
    ("sdpo", dict()),  # full-vocabulary reverse KL to an EMA copy: its own head
    ("sdpo", dict(distillation_mode="topk_logits", distillation_topk=3, teacher_model_kind="live")),
    ("sdft", dict(distillation_mode="sampled_token", distillation_alpha=1.0)),  # a frozen copy's log-probs
    ("sdft", dict(distillation_alpha=0.5, teacher_model_kind="live")),
], ids=["sdpo-ema", "sdpo-topk-live", "sdft-sampled-copy", "sdft-full-live"])
def test_self_distillation_reads_each_head_once_per_step(tmp_path, monkeypatch, kind, options):
    reads = count_head_reads(monkeypatch)
    per_loss = []

    def count_per_loss(trainer):
        compute_loss = trainer.compute_loss

        def counted(*args, **kwargs):
            start = len(reads)
            loss = compute_loss(*args, **kwargs)
            per_loss.append(sorted(reads[start:]))
            return loss

        trainer.compute_loss = counted

    trainer = run_self_distillation(kind, getattr(pydistill_trl, kind.upper() + "Trainer"), tmp_path,
                                    patch=count_per_loss, max_steps=1, **options)[2]
    student, teacher = unwrap(trainer.model), unwrap(trainer.teacher_model)
    assert (teacher is student) == (options.get("teacher_model_kind") == "live")
    assert per_loss and sum(map(len, per_loss)) == len(reads)  # no read outside the loss
    assert all(step == sorted({id(student), id(teacher)}) for step in per_loss), per_loss
