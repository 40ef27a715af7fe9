"""Tests for orpo.data.formats: every row shape → exact PreferencePair, every drop reason, column detection."""
import pytest

from orpo.errors import EMPTY_RESPONSE, SAME_RESPONSES, WRONG_TYPES, DroppedPair, OrpoError
from orpo.data.formats import PreferencePair, detect_columns, row_to_pair


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def pair(row, prompt_col="prompt", index=0):
    return row_to_pair(row, index, prompt_col, "chosen", "rejected")


def drop(row, prompt_col="prompt"):
    with pytest.raises(DroppedPair) as info:
        pair(row, prompt_col)
    return info.value.reason, info.value.detail


# --- detect_columns ---------------------------------------------------------------------------

def test_detect_columns_defaults_and_implicit_prompt():
    assert detect_columns(["prompt", "chosen", "rejected", "x"]) == ("prompt", "chosen", "rejected")
    assert detect_columns(["chosen", "rejected"]) == (None, "chosen", "rejected")
    assert detect_columns(["q", "good", "bad"], "q", "good", "bad") == ("q", "good", "bad")


def test_detect_columns_missing_chosen_lists_columns():
    with pytest.raises(OrpoError) as info:
        detect_columns(["a", "b"], source="data.jsonl")
    assert str(info.value) == (
        "data.jsonl: missing column 'chosen'; columns found: ['a', 'b']; accepted shapes: prompt/chosen/rejected "
        "strings, conversational message lists, or chosen/rejected only (implicit shared prompt); "
        "use --prompt_column/--chosen_column/--rejected_column for other names")
    assert "\n" not in str(info.value)


def test_detect_columns_missing_user_given_names():
    with pytest.raises(OrpoError, match=r"^dataset: missing column 'question'; columns found: \['prompt', 'chosen', 'rejected'\];"):
        detect_columns(["prompt", "chosen", "rejected"], prompt_column="question")
    with pytest.raises(OrpoError, match=r"^dataset: missing column 'worse'; columns found: \['chosen', 'rejected'\];"):
        detect_columns(["chosen", "rejected"], rejected_column="worse")


# --- shape a: strings ---------------------------------------------------------------------------

def test_shape_a_strings():
    got = pair({"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "extra": 3}, index=7)
    assert got == PreferencePair(prompt=[U("Hi?")], chosen=[A("Hello!")], rejected=[A("Go away.")], index=7)


# --- shape b: conversational ---------------------------------------------------------------------

def test_shape_b_system_prompt_conversation():
    row = {"prompt": [S("Be terse."), U("2+2?"), A("4"), U("And 3+3?")],
           "chosen": [A("6")], "rejected": {"role": "assistant", "content": "7", "name": "bot"}}
    assert pair(row) == PreferencePair(prompt=[S("Be terse."), U("2+2?"), A("4"), U("And 3+3?")],
                                       chosen=[A("6")], rejected=[A("7")])


def test_shape_b_string_reply_and_multi_message_reply():
    row = {"prompt": [U("Hi")], "chosen": "Hello", "rejected": [A("Hm."), A("Hi.")]}
    assert pair(row) == PreferencePair(prompt=[U("Hi")], chosen=[A("Hello")], rejected=[A("Hm."), A("Hi.")])


# --- shape c: whole conversations (UltraFeedback-binarized) -------------------------------------

def test_shape_c_ultrafeedback_binarized():
    row = {"prompt": "Name a color.",
           "chosen": [U("Name a color."), A("Blue.")], "rejected": [U("Name a color."), A("Car.")]}
    assert pair(row) == PreferencePair(prompt=[U("Name a color.")], chosen=[A("Blue.")], rejected=[A("Car.")])


def test_shape_c_conversation_messages_take_precedence_over_prompt_string():
    row = {"prompt": "Q2",
           "chosen": [S("sys"), U("Q1"), A("A1"), U("Q2"), A("good")],
           "rejected": [S("sys"), U("Q1"), A("A1"), U("Q2"), A("bad")]}
    assert pair(row) == PreferencePair(prompt=[S("sys"), U("Q1"), A("A1"), U("Q2")],
                                       chosen=[A("good")], rejected=[A("bad")])


def test_shape_c_divergence_after_shared_assistant_turn_moves_it_to_replies():
    row = {"chosen": [U("Q"), A("Let me think."), A("Yes.")], "rejected": [U("Q"), A("Let me think."), A("No.")]}
    assert pair(row, prompt_col=None) == PreferencePair(
        prompt=[U("Q")], chosen=[A("Let me think."), A("Yes.")], rejected=[A("Let me think."), A("No.")])


# --- shape d: implicit prompt ---------------------------------------------------------------------

def test_shape_d_hh_rlhf_multi_turn():
    shared = "\n\nHuman: What is a pen?\n\nAssistant: A writing tool.\n\nHuman:  Any pranks with one? \n\nAssistant:"
    row = {"chosen": shared + " No, pranks can hurt people.", "rejected": shared + " Sure, here is one."}
    assert pair(row, prompt_col=None, index=3) == PreferencePair(
        prompt=[U("What is a pen?"), A("A writing tool."), U("Any pranks with one?")],
        chosen=[A("No, pranks can hurt people.")], rejected=[A("Sure, here is one.")], index=3)


def test_shape_d_hh_single_turn_without_leading_newlines():
    row = {"chosen": "Human: Hi\n\nAssistant: Hello", "rejected": "Human: Hi\n\nAssistant: Bye"}
    assert pair(row, prompt_col=None) == PreferencePair(prompt=[U("Hi")], chosen=[A("Hello")], rejected=[A("Bye")])


def test_shape_d_plain_texts_common_prefix_cut_at_whitespace():
    row = {"chosen": "Q: my pet is a cat", "rejected": "Q: my pet is a car"}
    assert pair(row, prompt_col=None) == PreferencePair(
        prompt=[U("Q: my pet is a")], chosen=[A("cat")], rejected=[A("car")])


def test_shape_d_plain_texts_without_common_prefix_dropped():
    reason, detail = drop({"chosen": "Yes indeed", "rejected": "No way"}, prompt_col=None)
    assert reason == WRONG_TYPES == "wrong types"
    assert detail == ("no prompt column, and chosen and rejected share no leading text "
                      "or \\n\\nHuman:/\\n\\nAssistant: turns to use as the prompt")


# --- drops ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, prompt_col, detail", [
    ({"prompt": "p", "chosen": "  \n", "rejected": "r"}, "prompt", "chosen is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": [A("")]}, "prompt", "rejected is empty"),
    ({"prompt": "p", "chosen": [], "rejected": "r"}, "prompt", "chosen is empty"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: ", "rejected": "\n\nHuman: x\n\nAssistant: y"}, None, "chosen is empty"),
    ({"chosen": "", "rejected": "y"}, None, "chosen is empty"),
])
def test_drop_empty_response(row, prompt_col, detail):
    assert drop(row, prompt_col) == (EMPTY_RESPONSE, detail)
    assert EMPTY_RESPONSE == "empty response"


@pytest.mark.parametrize("row, prompt_col", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "prompt"),
    ({"prompt": "p", "chosen": "same", "rejected": [A("same")]}, "prompt"),
    ({"prompt": "p", "chosen": [U("p"), A("x")], "rejected": [U("p"), A("x")]}, "prompt"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b "}, None),
])
def test_drop_same_responses(row, prompt_col):
    assert drop(row, prompt_col) == (SAME_RESPONSES, "")
    assert SAME_RESPONSES == "chosen == rejected"


@pytest.mark.parametrize("row, prompt_col, detail", [
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "prompt", "chosen is int, expected a string or a list of messages"),
    ({"prompt": None, "chosen": "c", "rejected": "r"}, "prompt", "prompt is None, expected a string or a list of messages"),
    ({"prompt": "p", "chosen": "c", "rejected": ["r"]}, "prompt", "rejected[0] is str, expected a message with role and content"),
    ({"prompt": [{"role": "human", "content": "p"}], "chosen": "c", "rejected": "r"}, "prompt",
     "prompt[0] has role 'human', expected system, user or assistant"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": None}], "rejected": "r"}, "prompt",
     "chosen[0] content is None, expected a string"),
    ({"prompt": "  ", "chosen": "c", "rejected": "r"}, "prompt", "prompt is empty"),
    ({"prompt": [U("q"), A("a")], "chosen": "c", "rejected": "r"}, "prompt",
     "prompt ends with an assistant turn, expected a user or system turn"),
    ({"prompt": "p", "chosen": [U("p"), A("c")], "rejected": "r"}, "prompt",
     "one of chosen/rejected is a whole conversation and the other is not"),
    ({"chosen": [U("a"), A("c")], "rejected": [U("b"), A("r")]}, None,
     "chosen and rejected conversations do not start with the same prompt turns"),
    ({"chosen": [U("a"), A("c"), U("more")], "rejected": [U("a"), A("r")]}, None,
     "chosen reply 1 is a user turn, expected assistant turns only"),
    ({"chosen": [A("c")], "rejected": [A("r")]}, None,
     "no prompt column, and chosen/rejected are assistant replies without the prompt turns"),
])
def test_drop_wrong_types(row, prompt_col, detail):
    assert drop(row, prompt_col) == (WRONG_TYPES, detail)
