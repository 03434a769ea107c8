"""Dialogue token sequences: prompts are prefixes of the full dialogue, replies are kept as generated."""
import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from pydistill.trainers.exgrpo.dialogue import DialogueBuilder, Turn

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["What is 3 + 4? 3 + 4 = 7. The answer is 7.", "user assistant system"] * 10,
                            vocab_size=300, min_frequency=1, special_tokens=["<|im_start|>", "<|im_end|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def _turns(tok, with_eos=(True, False, True)):
    texts = ["3 + 4 = 7.", "The answer is 7", "Then 7 + 3 = 10."]
    users = ["What is 3 + 4?", "And the answer?", "Add 3."]
    return [Turn(u, tuple(tok(t, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if e else [])))
            for u, t, e in zip(users, texts, with_eos)]


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_prompts_are_prefixes_and_replies_kept(tokenizer, system):
    builder = DialogueBuilder(tokenizer, system=system)
    turns = _turns(tokenizer)
    full = builder.build(turns, next_user="Final question?")
    for i, turn in enumerate(turns):
        start, stop = full.reply_spans[i]
        assert builder.prompt_ids(turns[:i], turn.user) == full.input_ids[:start]
        assert tuple(full.input_ids[start:stop]) == turn.reply_ids
    trained = [i for i, m in enumerate(full.trained) if m]
    assert trained == [p for s, e in full.reply_spans for p in range(s, e)]
    assert full.input_ids[: len(builder.build(turns).input_ids)] == builder.build(turns).input_ids
    assert full.turn[full.reply_spans[1][0]] == 1 and full.turn[-1] == 3
    # the whole sequence decodes to the template's own rendering of the conversation
    messages = ([{"role": "system", "content": system}] if system else [])
    for t, text in zip(turns, ["3 + 4 = 7.", "The answer is 7", "Then 7 + 3 = 10."]):
        messages += [{"role": "user", "content": t.user}, {"role": "assistant", "content": text}]
    messages.append({"role": "user", "content": "Final question?"})
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(full.input_ids) == expected


def test_end_of_turn_not_repeated(tokenizer):
    builder = DialogueBuilder(tokenizer)
    turns = _turns(tokenizer)
    ids = builder.build(turns).input_ids
    end = tokenizer.eos_token_id
    start, stop = builder.build(turns).reply_spans[0]
    assert ids[stop - 1] == end and ids[stop] != end  # generated EOS then the template's newline
    start, stop = builder.build(turns).reply_spans[1]
    assert ids[stop] == end  # no EOS generated: the template closes the turn


def test_template_that_strips_replies_is_refused(tokenizer):
    stripping = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    stripping.chat_template = CHATML.replace("m['content']", "m['content'] | trim")
    turn = Turn("Q", tuple(tokenizer(" 7 ", add_special_tokens=False)["input_ids"]))
    with pytest.raises(ValueError, match="changed by the chat template"):
        DialogueBuilder(stripping).build([turn])


def test_requires_chat_template(tokenizer):
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        DialogueBuilder(plain)
