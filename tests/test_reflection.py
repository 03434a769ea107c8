"""ROSD reflection: tagged-reply parsing, quote search and the quote -> first-error token mapping."""
import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from pydistill.trainers.rosd.reflection import (ModelReflector, Reflection, StepCheckReflector, find_quote,
                                  first_error_token_index, parse_reflection)

CORPUS = ["Tom has 3 apples and buys 4 more, so 3 + 4 = 7 apples.", "Café prices: 12 € each; 2 × 12 = 24 €.",
          "First 5 * 6 = 30, then 30 - 4 = 26. The answer is 26."] * 20


@pytest.fixture(scope="module")
def tokenizer():
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def _brute_force_t_star(tokenizer, ids, char_start):
    """Reference: count tokens whose decoded prefix ends at or before the quote start, one decode per token."""
    ends = [len(tokenizer.decode(ids[: i + 1], clean_up_tokenization_spaces=False)) for i in range(len(ids))]
    return sum(1 for e in ends if e <= char_start)


@pytest.mark.parametrize("text,quote,expected_char", [
    ("a 5 * 6 = 31 b 5 * 6 = 31", "5 * 6 = 31", 2),  # repeated: the first occurrence
    ("then  30 -\n 4 = 27 so", "30 - 4 = 27", 6),  # whitespace differs: collapsed match
    ("x 2 × 12 = 25 €", " 2 × 12 = 25 ", 1),  # exact match wins, spaces included
    ("nothing here", "5 + 5 = 11", None),
    ("abc", "", None),
])
def test_find_quote(text, quote, expected_char):
    assert find_quote(text, quote) == expected_char


@pytest.mark.parametrize("text,quote", [
    ("First 5 * 6 = 31, then 31 - 4 = 27. The answer is 27.", "5 * 6 = 31"),
    ("First 5 * 6 = 30, then 30 - 4 = 27. The answer is 27.", "30 - 4 = 27"),
    ("Café prices: 12 € each; 2 × 12 = 25 €.", "2 × 12 = 25"),
    ("Café prices: 12 € each; 2 × 12 = 25 €.", "€ each"),  # starts on a multi-byte character
    ("Tom has 3 apples, 3 + 4 = 8 and 3 + 4 = 8 again.", "3 + 4 = 8"),
    ("Tom has 3 apples and buys 4 more", "Tom has"),  # at the very start: t* = 0
])
def test_first_error_token_index_matches_brute_force(tokenizer, text, quote):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    t_star = first_error_token_index(tokenizer, ids, quote)
    start = text.find(quote)
    assert t_star == _brute_force_t_star(tokenizer, ids, start)
    # the suffix from t* decodes to text that contains the quote, the suffix from t* + 1 does not start it
    suffix = tokenizer.decode(ids[t_star:], clean_up_tokenization_spaces=False)
    assert quote in suffix or suffix.startswith(quote[: len(suffix)])
    assert not tokenizer.decode(ids[t_star + 1:], clean_up_tokenization_spaces=False).startswith(quote)


def test_first_error_token_index_split_multibyte(tokenizer):
    """A quote whose first character is split over tokens: the token with its first byte is in the suffix."""
    text = "x€y"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    t_star = first_error_token_index(tokenizer, ids, "€y")
    assert t_star is not None and t_star >= 1
    assert tokenizer.decode(ids[:t_star]) == "x"


def test_first_error_token_index_not_found_and_none(tokenizer):
    ids = tokenizer("3 + 4 = 7", add_special_tokens=False)["input_ids"]
    assert first_error_token_index(tokenizer, ids, "9 + 9 = 1") is None
    assert first_error_token_index(tokenizer, ids, None) is None


@pytest.mark.parametrize("reply,expected", [
    ("<first_error>5 * 6 = 31</first_error>\n<explanation>5 times 6 is 30.</explanation>",
     Reflection("5 * 6 = 31", "5 times 6 is 30.")),
    ("Format: <first_error>...</first_error>. Answer: <first_error> \"5 * 6 = 31\" </first_error>"
     "<explanation>\n wrong product \n</explanation>", Reflection("5 * 6 = 31", "wrong product")),
    ("<first_error>NONE</first_error><explanation>All steps are right.</explanation>",
     Reflection(None, "All steps are right.")),
    ("<first_error>5 * 6 = 31</first_error>", Reflection(None, "", parsed=False)),  # no explanation
    ("<first_error>5 * 6 = 31<explanation>oops</explanation>", Reflection(None, "", parsed=False)),  # unclosed
    ("I think step two is wrong.", Reflection(None, "", parsed=False)),
    ("<first_error>x</first_error><explanation>   </explanation>", Reflection(None, "", parsed=False)),
    ("", Reflection(None, "", parsed=False)),
])
def test_parse_reflection(reply, expected):
    assert parse_reflection(reply) == expected


def test_model_reflector_builds_prompts_and_parses():
    seen = []

    def generate(prompts):
        seen.extend(prompts)
        return ["<first_error>2 + 2 = 5</first_error><explanation>2 + 2 is 4.</explanation>", "garbage"]

    reflector = ModelReflector(generate, render=lambda s: f"<chat>{s}</chat>")
    items = [dict(question="Q1", correct_solution="2 + 2 = 4", attempt="2 + 2 = 5", answer="4",
                  attempt_is_correct=False, problem=None),
             dict(question="Q2", correct_solution="1 + 1 = 2", attempt="1 + 1 = 2", answer="2",
                  attempt_is_correct=True, problem=None)]
    out = reflector.reflect_batch(items)
    assert out[0] == Reflection("2 + 2 = 5", "2 + 2 is 4.") and not out[1].parsed
    assert seen[0].startswith("<chat>Problem:\nQ1") and "2 + 2 = 5" in seen[0] and "NONE" in seen[1]


def test_step_check_reflector():
    class FakeError:
        quote, explanation = "3 * 4 = 13", "3 * 4 = 12, not 13."

    class FakeTask:
        def first_error(self, problem, completion):
            return FakeError() if "13" in completion else None

    items = [dict(problem=None, attempt="3 * 4 = 13", answer="12", attempt_is_correct=False),
             dict(problem=None, attempt="3 * 4 = 12 so 11", answer="12", attempt_is_correct=False),
             dict(problem=None, attempt="3 * 4 = 12", answer="12", attempt_is_correct=True)]
    out = StepCheckReflector(FakeTask()).reflect_batch(items)
    assert out[0] == Reflection("3 * 4 = 13", "3 * 4 = 12, not 13.")
    assert out[1].quote is None and not out[1].parsed
    assert out[2].quote is None and out[2].parsed
