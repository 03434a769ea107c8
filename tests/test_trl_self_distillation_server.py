"""SDPO / SDFT with ``use_teacher_server=True`` through the fused op: TRL's own VLLMClient asks the loopback test
server (a copy of the live policy, synced each step like vLLM's weight push) for the teacher-context top-k log-probs;
losses and gradients match TRL's trainers run the same way."""
import pytest
import torch

pytest.importorskip("trl")

import pydistill.integrations.trl as pydistill_trl  # noqa: E402
from tests.teacher_server import TeacherServer  # noqa: E402
from tests.trl_helpers import run_self_distillation, tiny_policy  # noqa: E402


class ScriptedServerGeneration:
    """TRL's VLLMGeneration in server mode: deterministic completions (different lengths, ending in EOS) and a
    ``sync_weights`` that copies the policy into the served model, as vLLM's weight push does for the live teacher."""

    served = None  # the model behind the loopback server, set by the test

    def __init__(self, model, processing_class, max_completion_length, **kwargs):
        self.model, self.tokenizer, self.length = model, processing_class, max_completion_length
        self.syncs = 0

    def sync_weights(self):
        from pydistill.integrations.trl._head import unwrap

        with torch.no_grad():
            self.served.load_state_dict(unwrap(self.model).state_dict())
        self.syncs += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        tok = self.tokenizer
        completions = []
        for i, ids in enumerate(prompts):
            g = torch.Generator().manual_seed(sum(ids) + 7 * i)
            length = 2 + (i * 5 + len(ids)) % (self.length - 2)
            completions.append(torch.randint(3, len(tok) - 1, (length,), generator=g).tolist() + [tok.eos_token_id])
        return prompts, completions, None, None


def run_served(kind, trainer_cls, tmp_path, monkeypatch, forbid_logits=False, **options):
    import trl.generation.vllm_client as vllm_client
    import trl.generation.vllm_generation as vllm_generation

    served, tokenizer = tiny_policy()
    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda: True)  # the client itself needs only HTTP
    monkeypatch.setattr(vllm_generation, "VLLMGeneration", ScriptedServerGeneration)
    monkeypatch.setattr(ScriptedServerGeneration, "served", served)
    with TeacherServer(served, tokenizer) as server:
        losses, grads, trainer = run_self_distillation(
            kind, trainer_cls, tmp_path, forbid_logits=forbid_logits, use_vllm=True, vllm_mode="server",
            vllm_server_base_url=server.url,
            use_teacher_server=True, teacher_model_kind="live", **options)
        scored = [body for path, body in server.requests if path == "/v1/completions"]
    assert trainer.vllm_generation.syncs >= 2 and len(scored) >= 2
    return losses, grads, trainer, scored


def _theirs(kind):
    if kind == "sdft":
        from trl.experimental.sdft import SDFTTrainer
        return SDFTTrainer
    from trl.experimental.sdpo import SDPOTrainer
    return SDPOTrainer


@pytest.mark.parametrize("kind, options", [
    # two iterations per generation: old log-probs (the importance clip) and a re-sync before the second scoring
    ("sdpo", dict(distillation_mode="topk_logits", distillation_topk=4, distillation_add_tail=True,
                  num_iterations=2)),
    ("sdft", dict(distillation_mode="topk_logits", distillation_topk=3, distillation_add_tail=False,
                  distillation_alpha=0.5, temperature=0.8, num_loss_tokens_to_skip=1)),
    ("sdpo", dict(distillation_mode="sampled_token", distillation_alpha=1.0, num_iterations=2)),
    ("sdft", dict(distillation_mode="topk_logits", distillation_topk=5, distillation_add_tail=True,
                  distillation_alpha=0.0)),
], ids=["sdpo-topk-tail-reverse", "sdft-topk-renormalized-jsd-T0.8-skip", "sdpo-sampled", "sdft-topk-tail-forward"])
def test_teacher_server_paths_match_trl(tmp_path, monkeypatch, kind, options):
    from tests.trl_helpers import assert_close_runs

    ours = run_served(kind, getattr(pydistill_trl, kind.upper() + "Trainer"), tmp_path / "ours", monkeypatch,
                      forbid_logits=True, **options)
    theirs = run_served(kind, _theirs(kind), tmp_path / "trl", monkeypatch, **options)
    assert ours[3] == theirs[3]  # the same teacher requests: TRL's client and request code ran unchanged
    assert any(len(body["prompt"][0]) > 0 and body["prompt_logprobs"] == options.get("distillation_topk", 1)
               for body in ours[3])
    assert_close_runs(ours[:2], theirs[:2], rtol=1e-4)
