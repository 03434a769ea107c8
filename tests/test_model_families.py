"""The model boundary on architectures that transform their logits: Gemma-2 (final-logit softcap), Cohere
(logit_scale) and Granite (logits_scaling), tiny and random, built locally. What the op scores through the
boundary equals what the model's own ``model(...).logits`` give, for the bundled trainers' paths."""
import copy

import pytest
import torch

from pydistill import token_stats
from pydistill.models import tiny_tokenizer
from pydistill.boundary import read_head
from pydistill.trainers.contexts import build_context_batch, response_hidden_states


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
    head = read_head(model)
    with torch.no_grad():
        stats = token_stats(hidden.reshape(b * t, width), head.weight, targets=targets.reshape(-1), bias=head.bias,
                            softcap=head.softcap)
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
        raw = model.model(batch.input_ids).last_hidden_state[0, 2:6] @ read_head(model).weight.t()
        raw = torch.log_softmax(raw, -1)
        logits = torch.log_softmax(model(batch.input_ids).logits[0, 2:6], -1)
    assert float((raw - logits).abs().max()) > 1e-2


TEACHER_PROMPTS = [[5, 6, 7, 30, 31], [8, 31, 9]]  # another context for the same completions
TEMPERATURE = 0.8  # not 1, so that the softcap-then-temperature order is checked too


def model_logprobs(model, batch, temperature=1.0) -> torch.Tensor:
    """log-softmax of ``model(...).logits / temperature`` at each row's response positions, float64 [B, T, V]."""
    b, t = batch.positions.shape
    rows = []
    for row in range(b):
        length, n = int(batch.attention_mask[row].sum()), int(batch.completion_mask[row].sum())
        with torch.no_grad():
            logits = model(batch.input_ids[row:row + 1, :length]).logits[0].double()
        out = torch.zeros(t, logits.shape[-1], dtype=torch.float64)
        out[:n] = torch.log_softmax(logits[batch.positions[row, :n]] / temperature, -1)
        rows.append(out)
    return torch.stack(rows)


def at_targets(logprobs, batch) -> torch.Tensor:
    return logprobs.gather(2, batch.targets.unsqueeze(-1)).squeeze(-1) * batch.completion_mask


def forward_kl(teacher_logprobs, student_logprobs, mask) -> torch.Tensor:
    """KL(teacher || student) per token [B, T], 0 outside ``mask``."""
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1) * mask


def trainer_on(family, method, tmp_path, **overrides):
    """(trainer, the initial weights' copy, student batch, teacher batch): a bundled trainer on a family model with
    a head bias, whose weights were moved away from the initial ones after construction (the fixed / EMA teacher
    keeps them)."""
    import pydistill.trainers as trainers
    from tests.trainer_helpers import TASK, ScriptedEngine

    model, tok = _family(family)
    head = model.get_output_embeddings()  # a head bias too: scaled with the logits, the teacher has its own
    head.bias = torch.nn.Parameter(torch.randn(head.weight.shape[0]))
    config_cls, cls = trainers.TRAINERS[method]
    config = config_cls(model="tiny", lora_r=0, eval_problems=0, output_dir=str(tmp_path / "run"), progress=False,
                        train_problems=8, **overrides)
    class IdsEngine(ScriptedEngine):  # ExGRPO asks for an engine that samples from token ids; not sampled here
        def sample_ids(self, prompt_ids, settings):
            raise AssertionError("no rollouts in these tests")

    trainer = cls(config, model=model, tokenizer=tok, task=TASK, rollout_engine=IdsEngine(tok))
    initial = copy.deepcopy(model)
    with torch.no_grad():  # so that every divergence is well above float32 noise
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std())
    student = build_context_batch(PROMPTS, COMPLETIONS, tok.pad_token_id)
    teacher = build_context_batch(TEACHER_PROMPTS, COMPLETIONS, tok.pad_token_id)
    return trainer, initial, student, teacher


def close(got, want):
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_scores_the_models_own_log_probs(family, tmp_path):
    trainer, _, student, _ = trainer_on(family, "sft", tmp_path)
    out = trainer.loss(dict(batch=student), float(student.completion_mask.sum()))
    close(out.per_token["logp"], at_targets(model_logprobs(trainer.model, student), student))


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_scores_the_models_own_log_probs_and_reference(family, tmp_path):
    from types import SimpleNamespace

    trainer, initial, student, _ = trainer_on(family, "grpo", tmp_path, beta=0.04, num_generations=2)
    prepared = dict(groups=SimpleNamespace(student=student, rewards=torch.zeros(2)),
                    advantages=torch.tensor([1.0, -1.0]))
    out = trainer.loss(prepared, float(student.completion_mask.sum()))
    close(out.per_token["logp"], at_targets(model_logprobs(trainer.model, student), student))
    close(trainer.reference_logp(student, student.completion_mask), at_targets(model_logprobs(initial, student),
                                                                                student))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampled_token", [False, True])
def test_opsd_distils_the_models_own_distributions(family, sampled_token, tmp_path):
    """Forward KL between ``model(...).logits`` in the teacher context (the initial weights) and in the student
    context, at the loss temperature; the sampled-token variant's advantage is their log-ratio at the tokens."""
    trainer, initial, student, teacher = trainer_on(family, "opsd", tmp_path, clip=None,
                                                    loss_temperature=TEMPERATURE, sampled_token=sampled_token)
    out = trainer.loss(dict(student=student, teacher=teacher), float(student.completion_mask.sum()))
    q = model_logprobs(trainer.model, student, TEMPERATURE)
    p = model_logprobs(initial, teacher, TEMPERATURE)
    if sampled_token:
        close(out.per_token["advantage"], at_targets(p, teacher) - at_targets(q, student))
    else:
        close(out.per_token["divergence"], forward_kl(p, q, student.completion_mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_rosd_distils_the_models_own_distributions(family, tmp_path):
    trainer, initial, student, teacher = trainer_on(family, "rosd", tmp_path, divergence="forward_kl",
                                                    loss_temperature=TEMPERATURE, num_generations=2)
    out = trainer.loss(dict(student=student, teacher=teacher, mask=student.completion_mask), 1.0)
    close(out.per_token["divergence"], forward_kl(model_logprobs(initial, teacher, TEMPERATURE),
                                                  model_logprobs(trainer.model, student, TEMPERATURE),
                                                  student.completion_mask))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_fd_distils_the_models_own_distributions(family, tau, tmp_path):
    """FD's EMA teacher starts at the initial weights; its importance weight reads the sampling policy. A
    ``teacher_temperature`` tau divides the model's own (on Gemma-2: softcapped) logits, at T * tau."""
    from types import SimpleNamespace

    trainer, initial, student, teacher = trainer_on(family, "fd", tmp_path, divergence="forward_kl",
                                                    loss_temperature=TEMPERATURE, num_generations=2,
                                                    teacher_temperature=tau)
    prepared = dict(groups=SimpleNamespace(student=student), teacher=teacher, informative=torch.ones(2, dtype=bool))
    out = trainer.loss(prepared, 1.0)
    close(out.per_token["divergence"], forward_kl(model_logprobs(initial, teacher, TEMPERATURE * tau),
                                                  model_logprobs(trainer.model, student, TEMPERATURE),
                                                  student.completion_mask))
    hidden = response_hidden_states(trainer.model, student)
    close(trainer.sampling_logp(hidden, student),
          at_targets(model_logprobs(trainer.model, student, trainer.config.temperature), student))


@pytest.mark.parametrize("family", FAMILIES)
def test_exgrpo_scores_the_models_own_log_probs(family, tmp_path):
    """ExGRPO's SFT warm-up loss reads the model's own head (scale, softcap, bias)."""
    # probes written by rule: building the trainer generates nothing (the student as EI teacher took ~40 s a family)
    trainer, _, student, _ = trainer_on(family, "exgrpo", tmp_path, ei_filters=False, ei_teacher="procedural")
    out = trainer.sft_loss(student, float(student.completion_mask.sum()))
    close(out.per_token["logp"], at_targets(model_logprobs(trainer.model, student), student))


@pytest.mark.parametrize("method", ["opsd", "rosd", "fd"])
@pytest.mark.parametrize("teacher_cap", [None, 5.0], ids=["uncapped", "other-cap"])
def test_a_teacher_copy_is_scored_with_its_own_softcap(method, teacher_cap, tmp_path):
    """A teacher copy whose final-logit softcap is not the Gemma-2 student's (2.0): each context is scored with its
    own model's logits."""
    from types import SimpleNamespace

    from pydistill.boundary import unwrap

    extra = dict(clip=None) if method == "opsd" else dict(num_generations=2)
    trainer, initial, student, teacher = trainer_on("gemma2", method, tmp_path, divergence="forward_kl",
                                                    loss_temperature=TEMPERATURE, **extra)
    for model in (unwrap(trainer.teacher.copy), initial):
        model.config.final_logit_softcapping = teacher_cap
    if method == "fd":
        prepared = dict(groups=SimpleNamespace(student=student), teacher=teacher,
                        informative=torch.ones(2, dtype=bool))
    else:
        prepared = dict(student=student, teacher=teacher, mask=student.completion_mask)
    out = trainer.loss(prepared, 1.0)
    close(out.per_token["divergence"], forward_kl(model_logprobs(initial, teacher, TEMPERATURE),
                                                  model_logprobs(trainer.model, student, TEMPERATURE),
                                                  student.completion_mask))
