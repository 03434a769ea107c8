"""The model boundary on architectures that transform their logits: Gemma-2 (final-logit softcap), Cohere
(logit_scale) and Granite (logits_scaling), tiny and random, built locally. What the op scores through the
boundary equals what the model's own ``model(...).logits`` give, for the bundled trainers' paths."""
import copy

import pytest
import torch

from pydistill import token_stats
from pydistill.models import tiny_tokenizer
from pydistill.trainers.contexts import (build_context_batch, lm_head_bias, lm_head_softcap, lm_head_weight,
                                         response_hidden_states)


def _family(name: str):
    import transformers

    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if name == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif name == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0,
                                           attn_logit_softcapping=None, query_pre_attn_scalar=8)
        cls = transformers.Gemma2ForCausalLM
    elif name == "cohere":
        config, cls = transformers.CohereConfig(**common, logit_scale=0.3), transformers.CohereForCausalLM
    else:
        config, cls = transformers.GraniteConfig(**common, logits_scaling=4.0), transformers.GraniteForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # larger head weights, so that the scale and the softcap change the distribution
        model.get_output_embeddings().weight.mul_(8.0)
    return model, tok


FAMILIES = ["llama", "gemma2", "cohere", "granite"]
PROMPTS, COMPLETIONS = [[5, 6, 7], [8, 9]], [[20, 21, 22, 23], [24, 25]]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_boundary_scores_what_the_model_predicts(family):
    model, tok = _family(family)
    batch = build_context_batch(PROMPTS, COMPLETIONS, tok.pad_token_id)
    hidden = response_hidden_states(model, batch)
    b, t, width = hidden.shape
    targets = torch.where(batch.completion_mask, batch.targets, torch.full_like(batch.targets, -100))
    with torch.no_grad():
        stats = token_stats(hidden.reshape(b * t, width), lm_head_weight(model), targets=targets.reshape(-1),
                            bias=lm_head_bias(model), softcap=lm_head_softcap(model))
    logp = stats.logp.reshape(b, t)
    for row, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)].double()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None]).squeeze(1)
        torch.testing.assert_close(logp[row, :len(c)].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_the_families_differ_from_their_raw_head(family):
    """Guard against a test that cannot fail: on these models the raw head's log-probs are not the model's."""
    model, tok = _family(family)
    batch = build_context_batch(PROMPTS[:1], COMPLETIONS[:1], tok.pad_token_id)
    with torch.no_grad():
        raw = torch.log_softmax(model.model(batch.input_ids).last_hidden_state[0, 2:6] @ lm_head_weight(model).t(), -1)
        logits = torch.log_softmax(model(batch.input_ids).logits[0, 2:6], -1)
    assert float((raw - logits).abs().max()) > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_the_opsd_trainer_distils_the_models_own_distributions(family, tmp_path):
    """OPSD's loss from the trainer equals forward KL between log-softmax of ``model(...).logits`` in the teacher
    context (the initial weights) and in the student context, token mean."""
    from pydistill.trainers import OPSDTrainer
    from tests.trainer_helpers import TASK, ScriptedEngine, tiny_config

    model, tok = _family(family)
    trainer = OPSDTrainer(tiny_config(tmp_path, clip=None, loss_temperature=1.0), model=model, tokenizer=tok,
                          task=TASK, rollout_engine=ScriptedEngine(tok))
    teacher = copy.deepcopy(model)  # the fixed teacher: the initial weights
    with torch.no_grad():  # move the student away from it, so that the divergence is well above float32 noise
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std())
    prepared = trainer.prepare(trainer.train_pool[:2])
    got = float(trainer.loss(prepared, float(prepared["tokens"])).loss.detach())
    total, count = 0.0, 0
    for student, teacher_batch in ((prepared["student"], prepared["teacher"]),):
        for row in range(student.input_ids.shape[0]):
            n = int(student.completion_mask[row].sum())
            logs = []
            for batch, scorer in ((student, model), (teacher_batch, teacher)):
                length = int(batch.attention_mask[row].sum())
                with torch.no_grad():
                    logits = scorer(batch.input_ids[row:row + 1, :length]).logits[0].double()
                logs.append(torch.log_softmax(logits[batch.positions[row, :n]], -1))
            q, p = logs
            total += float((p.exp() * (p - q)).sum())
            count += n
    assert count > 0 and got == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("method", ["sft", "grpo", "fd", "rosd", "exgrpo"])
def test_every_trainer_passes_the_models_softcap(method, monkeypatch):
    """The softcap reaches every op call of every trainer (the scale folds into hidden states and bias)."""
    import inspect

    import pydistill.trainers as trainers

    module = __import__(f"pydistill.trainers.{method}.trainer", fromlist=["x"])
    source = inspect.getsource(module)
    calls = source.count("memory_budget_mb=")
    assert calls and source.count("softcap=lm_head_softcap(self.model)") == calls, \
        f"{method}: an op or loss call without the model's softcap"
    assert trainers.TRAINERS[method]
