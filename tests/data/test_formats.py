"""Tests for orpo.data.formats: every row shape → exact PreferencePair, every drop reason, column resolution,
the columns each shape reads and those no shape read.

The fixtures/ files imitate public datasets, a few rows each (the source is named where they are read).
"""
import json
import math
from collections import Counter
from pathlib import Path

import datasets
import pytest

from orpo.data.formats import (SHAPE_CONVERSATIONAL, SHAPE_CONVERSATIONS, SHAPE_HH, SHAPE_LABELS, SHAPE_MESSAGES,
                               SHAPE_PREFIX, SHAPE_RATED, SHAPE_SHAREGPT, SHAPE_STRINGS, SHAPES_WITHOUT_PROMPT,
                               PairsFromRows, PreferencePair, RowFormat, UnreadColumns, columns_read,
                               prompt_candidates, resolve_columns, rows_to_pairs, unread_columns)
from orpo.errors import (EMPTY_RESPONSE, IMAGE_COUNT, LABEL_MISSING, LABEL_TIE, LABEL_UNMAPPED, NON_TEXT,
                         SAME_RESPONSES, TIED_RATINGS, UNKNOWN_ROLE, WRONG_TYPES, OrpoError)

FIXTURES = Path(__file__).parent / "fixtures"
ACCEPTED = ("accepted shapes: prompt (or instruction) + chosen + rejected, as strings or message lists; chosen + "
            "rejected alone (whole conversations, or texts sharing their start); conversations or messages + chosen "
            "+ rejected (ShareGPT); chosen_messages + rejected_messages; instruction + completions (rated); two "
            "answer columns with labels (--response_columns, --label_column, --label_map); "
            "--prompt_column/--chosen_column/--rejected_column map other names")


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def P(prompt, chosen, rejected, shape, index=0, images=()):
    return PreferencePair(prompt, chosen, rejected, index=index, shape=shape, images=images)


IMG = {"type": "image"}


def T(text):
    return {"type": "text", "text": text}


def fixture(name):
    """A fixture's rows: a JSON list (.json) or JSON lines (.jsonl); NaN is read as the float NaN."""
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


def pair(row, **row_format):
    """The one pair of a one-row dataset (failing with the drop detail if it was dropped)."""
    got = rows_to_pairs([row], RowFormat(**row_format))
    assert not got.drops, got.drops.first_details
    return got.pairs[0]


def drop(row, **row_format):
    """(reason, detail) of a one-row dataset whose row is dropped."""
    got = rows_to_pairs([row], RowFormat(**row_format))
    assert not got.pairs and got.drops.total == 1, got
    (reason,) = got.drops
    return reason, got.drops.first_details[reason]


def drops_of(got: PairsFromRows):
    """{row index: (reason, detail)} of the first row dropped for each reason."""
    return {got.drops.first_rows[reason]: (reason, got.drops.first_details[reason]) for reason in got.drops}


# --- rows_to_pairs: counting, column resolution ---------------------------------------------------

def test_rows_to_pairs_counts_drops_first_rows_details_and_shapes():
    rows = [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": [U("2+2?")], "chosen": "4", "rejected": "5"},
            {"prompt": "p", "chosen": "", "rejected": "r"},
            {"prompt": "p", "chosen": "x", "rejected": "x"},
            {"prompt": "p", "chosen": 3, "rejected": "r"}]
    got = rows_to_pairs(rows)
    assert got.pairs == [P([U("Hi?")], [A("Hello!")], [A("Go away.")], SHAPE_STRINGS, index=0),
                         P([U("2+2?")], [A("4")], [A("5")], SHAPE_CONVERSATIONAL, index=2)]
    assert dict(got.drops) == {SAME_RESPONSES: 2, EMPTY_RESPONSE: 1, WRONG_TYPES: 1}
    assert got.drops.first_rows == {SAME_RESPONSES: 1, EMPTY_RESPONSE: 3, WRONG_TYPES: 5}
    assert got.drops.first_details == {SAME_RESPONSES: "", EMPTY_RESPONSE: "chosen is empty",
                                 WRONG_TYPES: "chosen is int, expected a string or a list of messages"}
    assert got.shapes == Counter({SHAPE_STRINGS: 5, SHAPE_CONVERSATIONAL: 1})


def test_a_datasets_dataset_reads_like_its_list_of_rows():
    """Arrow gives every struct the union of the keys (absent ones None): ShareGPT dicts still read."""
    rows = fixture("llamafactory_sharegpt_dpo.json")
    from_arrow = rows_to_pairs(datasets.Dataset.from_list(rows))
    assert from_arrow == rows_to_pairs(rows)
    assert len(from_arrow.pairs) == 3


def test_custom_column_names():
    got = rows_to_pairs([{"q": "Hi?", "good": "Hello!", "bad": "Go away."}],
                        RowFormat(prompt_columns=("q",), chosen_column="good", rejected_column="bad"))
    assert got.pairs == [P([U("Hi?")], [A("Hello!")], [A("Go away.")], SHAPE_STRINGS)]


def test_missing_chosen_is_one_line_naming_source_columns_and_shapes():
    with pytest.raises(OrpoError) as info:
        rows_to_pairs([{"a": 1, "b": 2}], source="data.jsonl")
    assert str(info.value) == f"data.jsonl: missing column 'chosen'; columns found: ['a', 'b']; {ACCEPTED}"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("columns, row_format, missing", [
    (["prompt", "chosen", "rejected"], RowFormat(prompt_columns=("question",)), "question"),
    (["chosen", "rejected"], RowFormat(rejected_column="worse"), "worse"),
    (["instruction", "input", "chosen", "rejected"], RowFormat(prompt_columns=("instruction", "context")), "context"),
    (["instruction", "response1", "response2"], RowFormat(response_columns=("response1", "response2"),
                                                          label_map={"1": "response1"}), "label"),
    (["input", "a", "b", "label"], RowFormat(response_columns=("a", "b"), label_map={"1": "a"}), "prompt"),
    (["completions"], RowFormat(), "prompt"),
])
def test_missing_user_given_or_needed_column(columns, row_format, missing):
    with pytest.raises(OrpoError) as info:
        rows_to_pairs([dict.fromkeys(columns, "x")], row_format)
    assert str(info.value) == f"dataset: missing column {missing!r}; columns found: {columns}; {ACCEPTED}"


# --- columns read, and not read -------------------------------------------------------------------

PANDALM = RowFormat(prompt_columns=("instruction", "input"), response_columns=("response1", "response2"),
                    label_columns=("annotator1", "annotator2", "annotator3"),
                    label_map={"0": "tie", "1": "response1", "2": "response2"})


@pytest.mark.parametrize("shape, names, row_format, read", [
    (SHAPE_STRINGS, ["id", "prompt", "chosen", "rejected", "images"], RowFormat(), ("prompt", "chosen", "rejected", "images")),
    (SHAPE_CONVERSATIONAL, ["instruction", "input", "chosen", "rejected"], RowFormat(prompt_columns=("instruction", "input")),
     ("instruction", "input", "chosen", "rejected")),
    (SHAPE_CONVERSATIONS, ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen"], RowFormat(),
     ("chosen", "rejected")),  # the prompt turns are in the answers: a prompt column is not read
    (SHAPE_MESSAGES, ["chosen_messages", "rejected_messages", "id"], RowFormat(), ("chosen_messages", "rejected_messages")),
    (SHAPE_SHAREGPT, ["conversations", "chosen", "rejected", "system"], RowFormat(), ("conversations", "chosen", "rejected")),
    (SHAPE_LABELS, ["idx", "cmp_key", "instruction", "input", "response1", "response2", "annotator1", "annotator2",
                    "annotator3"], PANDALM,
     ("instruction", "input", "response1", "response2", "annotator1", "annotator2", "annotator3")),
    (SHAPE_RATED, ["source", "instruction", "models", "completions"], RowFormat(), ("instruction", "completions")),
    (SHAPE_HH, ["chosen", "rejected"], RowFormat(), ("chosen", "rejected")),
    (SHAPE_PREFIX, ["question", "chosen", "rejected", "image"], RowFormat(), ("chosen", "rejected", "image")),
])
def test_the_columns_each_shape_reads(shape, names, row_format, read):
    assert columns_read(shape, resolve_columns(names, row_format, "data.jsonl")) == read


def test_prompt_candidates_are_the_text_columns_of_rows_without_a_prompt_column():
    columns = resolve_columns(["id", "question", "blank", "meta", "turns", "chosen", "rejected"], RowFormat(), "d")
    row = {"id": 1, "question": "Why is the sky blue?", "blank": " \n", "meta": {"lang": "en"}, "turns": [U("Hi?")],
           "chosen": "It scatters blue light", "rejected": "It is painted"}
    assert prompt_candidates(row, SHAPE_PREFIX, columns) == ["question", "turns"]
    assert prompt_candidates(row, SHAPE_HH, columns) == ["question", "turns"]
    strings = resolve_columns(["prompt", "source", "chosen", "rejected"], RowFormat(), "d")
    assert prompt_candidates({"prompt": "p", "source": "reddit", "chosen": "a", "rejected": "b"}, SHAPE_STRINGS,
                             strings) == []  # a prompt column: nothing to suggest
    assert prompt_candidates(row, None, columns) == []  # a row whose shape was not detected


def test_unread_columns_name_every_column_no_shape_read_and_suggest_the_prompt():
    rows = [{"id": 1, "question": "why is the sky blue", "chosen": "the sky is blue", "rejected": "the sky is red",
             "score": 0.5},
            {"id": 2, "question": "", "chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected":
             "\n\nHuman: Hi\n\nAssistant: Go", "score": 0.1}]
    names = ["id", "question", "chosen", "rejected", "score"]
    columns = resolve_columns(names, RowFormat(), "d")
    got = rows_to_pairs(rows)
    candidates = {name for i, row in enumerate(rows) for name in prompt_candidates(row, got.pairs[i].shape, columns)}
    unread = unread_columns(names, columns, got.shapes, candidates)
    assert unread == UnreadColumns(("id", "question", "score"), ("question",), 2)
    assert unread.text() == ("columns not read: id, question, score (2 rows have an implicit prompt: "
                             "--prompt_column question reads it as the prompt)")
    # named with --prompt_column: read, nothing left to say of it
    named = resolve_columns(names, RowFormat(prompt_columns=("question",)), "d")
    assert unread_columns(names, named, Counter({SHAPE_STRINGS: 2}), set()) == UnreadColumns(("id", "score"))
    assert UnreadColumns(("id", "score")).text() == "columns not read: id, score"
    # whole conversations ignore a prompt column: named, but no suggestion (it would still not be read)
    whole = resolve_columns(["prompt", "chosen", "rejected"], RowFormat(), "d")
    assert unread_columns(["prompt", "chosen", "rejected"], whole, Counter({SHAPE_CONVERSATIONS: 5}), set()) == (
        UnreadColumns(("prompt",)))
    # several candidates, one row; every column read; no row's shape detected (each was dropped before)
    assert UnreadColumns(("source", "question"), ("source", "question"), 1).text() == (
        "columns not read: source, question (1 row has an implicit prompt: --prompt_column reads one of source, "
        "question as the prompt)")
    assert unread_columns(["chosen", "rejected"], whole, Counter({SHAPE_PREFIX: 3}), set()).text() == ""
    assert unread_columns(names, columns, Counter(), {"question"}) == UnreadColumns()


def test_unread_columns_go_into_prepared_json_and_back():
    unread = UnreadColumns(("id", "question"), ("question",), 3)
    meta = json.loads(json.dumps(unread.to_meta()))
    assert meta == {"names": ["id", "question"], "prompt_candidates": ["question"], "rows_without_prompt": 3}
    assert UnreadColumns.from_meta(meta) == unread
    assert UnreadColumns.from_meta(None) == UnreadColumns()  # a set prepared before they were recorded


# --- prompt/chosen/rejected strings, conversational ---------------------------------------------

def test_strings_keep_their_row_index():
    got = rows_to_pairs([{"prompt": "p", "chosen": "x", "rejected": "x"},
                         {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "extra": 3}])
    assert got.pairs == [P([U("Hi?")], [A("Hello!")], [A("Go away.")], SHAPE_STRINGS, index=1)]


def test_conversational_system_prompt_conversation():
    row = {"prompt": [S("Be terse."), U("2+2?"), A("4"), U("And 3+3?")],
           "chosen": [A("6")], "rejected": {"role": "assistant", "content": "7", "name": "bot"}}
    assert pair(row) == P([S("Be terse."), U("2+2?"), A("4"), U("And 3+3?")], [A("6")], [A("7")],
                          SHAPE_CONVERSATIONAL)


def test_conversational_string_reply_and_multi_message_reply():
    row = {"prompt": [U("Hi")], "chosen": "Hello", "rejected": [A("Hm."), A("Hi.")]}
    assert pair(row) == P([U("Hi")], [A("Hello")], [A("Hm."), A("Hi.")], SHAPE_CONVERSATIONAL)


def test_instruction_is_the_default_prompt_column_without_prompt():
    row = {"instruction": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
    assert pair(row) == P([U("Hi?")], [A("Hello!")], [A("Go away.")], SHAPE_STRINGS)


def test_several_prompt_columns_join_non_empty_stripped_parts():
    fmt = {"prompt_columns": ("instruction", "input")}
    row = {"instruction": " Translate to French. ", "input": "\nGood night.\n", "chosen": "Bonne nuit.",
           "rejected": "Bon soir."}
    assert pair(row, **fmt) == P([U("Translate to French.\n\nGood night.")], [A("Bonne nuit.")], [A("Bon soir.")],
                                 SHAPE_STRINGS)
    for empty in ("  ", None, math.nan):
        got = pair({**row, "input": empty}, **fmt)
        assert got.prompt == [U("Translate to French.")]
    assert drop({**row, "input": ["Good night."]}, **fmt) == (
        WRONG_TYPES, "input is list, expected a string (several prompt columns are joined as text)")
    assert drop({**row, "instruction": "", "input": None}, **fmt) == (WRONG_TYPES, "prompt is empty")


# --- whole conversations, chosen_messages/rejected_messages ---------------------------------------

def test_whole_conversations_ultrafeedback_binarized():
    row = {"prompt": "Name a color.", "chosen": [U("Name a color."), A("Blue.")],
           "rejected": [U("Name a color."), A("Car.")], "messages": [U("Name a color."), A("Blue.")]}
    assert pair(row) == P([U("Name a color.")], [A("Blue.")], [A("Car.")], SHAPE_CONVERSATIONS)


def test_multi_turn_loss_is_on_the_final_assistant_turn():
    """Two exchanges: the earlier turns, the first answer included, are prompt."""
    row = {"chosen": [U("Q1"), A("A1"), U("Q2"), A("good")], "rejected": [U("Q1"), A("A1"), U("Q2"), A("bad")]}
    assert pair(row) == P([U("Q1"), A("A1"), U("Q2")], [A("good")], [A("bad")], SHAPE_CONVERSATIONS)


def test_whole_conversations_take_precedence_over_prompt_string():
    row = {"prompt": "Q2",
           "chosen": [S("sys"), U("Q1"), A("A1"), U("Q2"), A("good")],
           "rejected": [S("sys"), U("Q1"), A("A1"), U("Q2"), A("bad")]}
    assert pair(row) == P([S("sys"), U("Q1"), A("A1"), U("Q2")], [A("good")], [A("bad")], SHAPE_CONVERSATIONS)


def test_whole_conversations_divergence_after_shared_assistant_turn_moves_it_to_replies():
    row = {"chosen": [U("Q"), A("Let me think."), A("Yes.")], "rejected": [U("Q"), A("Let me think."), A("No.")]}
    assert pair(row) == P([U("Q")], [A("Let me think."), A("Yes.")], [A("Let me think."), A("No.")],
                          SHAPE_CONVERSATIONS)


def test_llamafactory_v1_chosen_messages():
    """LLaMA-Factory v1 DPOSample: content parts with "value", loss_weight ignored; a reasoning part
    and a tool turn cannot be trained on."""
    got = rows_to_pairs(fixture("llamafactory_v1_dpo.jsonl"))
    assert got.pairs == [
        P([U("Is the sky blue?")], [A("Yes, on a clear day.")], [A("No, it is green.")], SHAPE_MESSAGES, index=0),
        P([S("You are a math tutor."), U("What is 3 * 3?"), A("9."), U("And 9 * 9?")], [A("81.")], [A("18.")],
          SHAPE_MESSAGES, index=1)]
    assert drops_of(got) == {2: (NON_TEXT, "chosen_messages[1] content part 0 is 'reasoning', expected text or image "
                                                "parts"),
                             3: (UNKNOWN_ROLE, "chosen_messages[1] has role 'tool', expected system, user (human) "
                                               "or assistant (gpt)")}
    assert got.shapes == Counter({SHAPE_MESSAGES: 4})


# --- implicit prompt --------------------------------------------------------------------------------

def test_shapes_without_a_prompt_column_say_so_in_their_names():
    assert SHAPES_WITHOUT_PROMPT == (SHAPE_HH, SHAPE_PREFIX) == (
        "implicit prompt (Human:/Assistant: turns; no prompt column)", "implicit prompt (shared prefix; no prompt column)")


def test_implicit_hh_rlhf_multi_turn():
    shared = "\n\nHuman: What is a pen?\n\nAssistant: A writing tool.\n\nHuman:  Any pranks with one? \n\nAssistant:"
    row = {"chosen": shared + " No, pranks can hurt people.", "rejected": shared + " Sure, here is one."}
    assert pair(row) == P([U("What is a pen?"), A("A writing tool."), U("Any pranks with one?")],
                          [A("No, pranks can hurt people.")], [A("Sure, here is one.")], SHAPE_HH)


def test_implicit_hh_single_turn_without_leading_newlines():
    row = {"chosen": "Human: Hi\n\nAssistant: Hello", "rejected": "Human: Hi\n\nAssistant: Bye"}
    assert pair(row) == P([U("Hi")], [A("Hello")], [A("Bye")], SHAPE_HH)


def test_implicit_plain_texts_common_prefix_cut_at_whitespace():
    row = {"chosen": "Q: my pet is a cat", "rejected": "Q: my pet is a car"}
    assert pair(row) == P([U("Q: my pet is a")], [A("cat")], [A("car")], SHAPE_PREFIX)


def test_implicit_plain_texts_without_common_prefix_dropped():
    assert drop({"chosen": "Yes indeed", "rejected": "No way"}) == (
        WRONG_TYPES, "no prompt column, and chosen and rejected share no leading text "
                     "or \\n\\nHuman:/\\n\\nAssistant: turns to use as the prompt")


# --- ShareGPT turns ---------------------------------------------------------------------------------

def test_llamafactory_sharegpt_dpo():
    """LLaMA-Factory data/dpo_en_demo.json: {from, value} turns; a tool call turn cannot be trained on."""
    got = rows_to_pairs(fixture("llamafactory_sharegpt_dpo.json"))
    assert got.pairs == [
        P([U("Name a primary color.")], [A("Red is a primary color.")], [A("Green, probably.")], SHAPE_SHAREGPT, 0),
        P([U("What is 2 + 2?"), A("4."), U("And times 3?")], [A("12.")], [A("7.")], SHAPE_SHAREGPT, 1),
        P([S("Answer in French."), U("Say hello.")], [A("Bonjour !")], [A("Hello!")], SHAPE_SHAREGPT, 2)]
    assert drops_of(got) == {3: (UNKNOWN_ROLE, "conversations[1] has role 'function_call', expected system, "
                                               "user (human) or assistant (gpt)")}
    assert got.shapes == Counter({SHAPE_SHAREGPT: 4})


def test_llamafactory_openai_tags_messages_column():
    """LLaMA-Factory sharegpt data with OpenAI-style tags: {role, content} turns in `messages`."""
    got = rows_to_pairs(fixture("llamafactory_openai_tags.jsonl"))
    assert got.pairs == [
        P([S("Be brief."), U("Capital of Italy?")], [A("Rome.")], [A("Milan.")], SHAPE_SHAREGPT, 0),
        P([U("Spell cat backwards.")], [A("tac")], [A("cta")], SHAPE_SHAREGPT, 1)]
    assert drops_of(got) == {2: (WRONG_TYPES, "prompt ends with an assistant turn, expected a user or system turn")}


def test_sharegpt_replies_as_list_or_string():
    row = {"conversations": [{"from": "human", "value": "Hi"}], "chosen": [{"from": "gpt", "value": "Hello"}],
           "rejected": "Bye"}
    assert pair(row) == P([U("Hi")], [A("Hello")], [A("Bye")], SHAPE_SHAREGPT)


def test_sharegpt_whole_conversations_in_chosen_rejected():
    row = {"chosen": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
           "rejected": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Go."}]}
    assert pair(row) == P([U("Hi")], [A("Hello")], [A("Go.")], SHAPE_CONVERSATIONS)


# --- content parts ------------------------------------------------------------------------------------

def test_trl_content_parts():
    """TRL's DPO format with content parts (HuggingFaceH4/rlaif-v_formatted without its images): text parts
    join with no separator."""
    got = rows_to_pairs(fixture("trl_content_parts.jsonl"))
    assert got.pairs == [P([U("Translate: chat")], [A("cat")], [A("chair")], SHAPE_CONVERSATIONAL, 0),
                         P([S("You count."), U("1, 2, next?")], [A("3")], [A("5")], SHAPE_CONVERSATIONAL, 1)]
    assert not got.drops


def test_trl_vision():
    """TRL's vision DPO format (HuggingFaceH4/rlaif-v_formatted): a prompt with image parts keeps them where
    they stand, and the images column's entries in their order."""
    got = rows_to_pairs(fixture("trl_vision.jsonl"))
    assert got.pairs == [
        P([U([IMG, T("What is in the picture?")])], [A("A dog on a beach.")], [A("A cat.")], SHAPE_CONVERSATIONAL, 0,
          images=("images/0001.jpg",)),
        P([U([T("Describe it."), IMG])], [A("Two red apples.")], [A("A banana.")], SHAPE_CONVERSATIONAL, 1,
          images=("images/0002.jpg",)),
    ]
    assert not got.drops


def test_image_parts_between_text_runs_keep_their_place():
    row = {"images": [b"a", b"b"], "chosen": "x", "rejected": "y", "prompt": [
        {"role": "user", "content": [T("Compare "), IMG, T("and "), T("this: "), IMG]}]}
    assert pair(row).prompt == [U([T("Compare "), IMG, T("and this: "), IMG])]
    assert pair(row).images == (b"a", b"b")


def test_llamafactory_image_placeholders_become_image_parts():
    """LLaMA-Factory's multimodal ShareGPT data: "<image>" in the text, the paths in `images`."""
    row = {"conversations": [{"from": "human", "value": "<image>What is this?"}],
           "chosen": {"from": "gpt", "value": "A dog."}, "rejected": {"from": "gpt", "value": "A cat."},
           "images": ["demo/1.jpg"]}
    assert pair(row) == P([U([IMG, T("What is this?")])], [A("A dog.")], [A("A cat.")], SHAPE_SHAREGPT,
                          images=("demo/1.jpg",))


def test_images_without_a_placeholder_go_before_the_first_user_turns_text():
    """As TRL places them (RLAIF-V style rows: one `image`, a string question)."""
    row = {"image": {"bytes": b"png", "path": None}, "prompt": "What is shown?", "chosen": "A tree.",
           "rejected": "A car."}
    assert pair(row) == P([U([IMG, T("What is shown?")])], [A("A tree.")], [A("A car.")], SHAPE_STRINGS,
                          images=({"bytes": b"png", "path": None},))
    system_first = {**row, "prompt": [S("Be brief."), U("What?")]}
    assert pair(system_first).prompt == [S("Be brief."), U([IMG, T("What?")])]


def test_without_images_a_literal_image_placeholder_is_text():
    assert pair({"prompt": "Write <image> tags.", "chosen": "ok", "rejected": "no"}).prompt == [
        U("Write <image> tags.")]


@pytest.mark.parametrize("row, detail", [
    ({"images": ["a.jpg"], "prompt": "<image> vs <image>?", "chosen": "x", "rejected": "y"},
     "the prompt has 2 image placeholder(s) and the row 1 image(s)"),
    ({"images": [], "prompt": [{"role": "user", "content": [IMG, T("Hi")]}], "chosen": "x", "rejected": "y"},
     "the prompt has 1 image part(s) and the row no images"),
])
def test_placeholders_and_images_must_match(row, detail):
    assert drop(row) == (IMAGE_COUNT, detail)


def test_an_image_in_an_answer_and_a_bad_image_entry_are_drops():
    row = {"images": ["a.jpg"], "prompt": "Q?", "chosen": [{"role": "assistant", "content": [IMG]}], "rejected": "y"}
    assert drop(row) == (NON_TEXT, "chosen has an image part: an answer is text")
    assert drop({"images": [5], "prompt": "Q?", "chosen": "x", "rejected": "y"}) == (
        WRONG_TYPES, "images[0] is int, expected a file path, bytes, {'bytes', 'path'} or a PIL image")


@pytest.mark.parametrize("content, detail", [
    ([{"type": "text"}], "prompt[0] content part 0 is {'type': 'text'}, expected {'type': 'text', 'text': a string}"),
    (["Hi"], "prompt[0] content part 0 is 'Hi', expected {'type': 'text', 'text': a string}"),
    (5, "prompt[0] content is int, expected a string or a list of text parts"),
])
def test_bad_content_parts(content, detail):
    assert drop({"prompt": [{"role": "user", "content": content}], "chosen": "c", "rejected": "r"}) == (
        WRONG_TYPES, detail)


# --- label-based pairwise -----------------------------------------------------------------------------

PANDALM = RowFormat(prompt_columns=("instruction", "input"), response_columns=("response1", "response2"),
                    label_columns=("annotator1", "annotator2", "annotator3"),
                    label_map={"0": "tie", "1": "response1", "2": "response2"})


def test_pandalm_three_annotators_strict_majority():
    """PandaLM data/testset-v1.json: 0 = tie, 1 = response1, 2 = response2; an empty input is NaN."""
    got = rows_to_pairs(fixture("pandalm_testset.json"), PANDALM)
    assert got.pairs == [
        P([U("Rewrite the sentence to be concise.\n\nIf you have any questions, please do let me know.")],
          [A("Questions? Let me know.")], [A("If you have any questions, please do let me know.")], SHAPE_LABELS, 0),
        P([U("Come up with a search query about coding.")], [A("how to learn python")], [A("coding")], SHAPE_LABELS, 1),
        P([U("Suggest a movie genre.")], [A("Comedy.")], [A("Movies.")], SHAPE_LABELS, 4)]
    assert dict(got.drops) == {LABEL_TIE: 2}
    assert drops_of(got) == {2: (LABEL_TIE, "annotator1=0, annotator2=0, annotator3=0 → tie, tie, tie: "
                                            "no strict majority of the 3 votes")}
    assert got.shapes == Counter({SHAPE_LABELS: 5})


def test_autoj_pairwise_single_label():
    """Auto-J data/test/testdata_pairwise.jsonl: 0 = response 1 better, 1 = response 2 better, 2 = tie."""
    fmt = RowFormat(response_columns=("response 1", "response 2"), label_map={"0": "response 1", "1": "response 2",
                                                                              "2": "tie"})
    got = rows_to_pairs(fixture("autoj_pairwise.jsonl"), fmt)
    assert got.pairs == [
        P([U("Summarize the following post\n\nTitle: My cat ignores me\n\nPost: She only comes when I open a can.")],
          [A("My cat only pays attention to me at feeding time.")], [A("Cat.")], SHAPE_LABELS, 0),
        P([U("Write a Python expression for the square of x.")], [A("x ** 2")], [A("x ^ 2")], SHAPE_LABELS, 1)]
    assert drops_of(got) == {2: (LABEL_TIE, "label=2 → tie")}


@pytest.mark.parametrize("label, expected", [
    (1, "a"), ("1", "a"), (1.0, "a"), (2, "b"),
    (None, (LABEL_MISSING, "label is None, expected a label")),
    (math.nan, (LABEL_MISSING, "label is nan, expected a label")),
    (1.5, (LABEL_UNMAPPED, "label is 1.5, expected one of the label_map keys ['1', '2']")),
    ("A", (LABEL_UNMAPPED, "label is 'A', expected one of the label_map keys ['1', '2']")),
])
def test_label_values(label, expected):
    row = {"prompt": "p", "a": "x", "b": "y", "label": label}
    fmt = {"response_columns": ("a", "b"), "label_map": {"1": "a", "2": "b"}}
    if isinstance(expected, tuple):
        assert drop(row, **fmt) == expected
    else:
        assert pair(row, **fmt).chosen == [A(row[expected])]


@pytest.mark.parametrize("votes, expected", [
    ((1, 1, 2), "a"), ((1, 0, 1), "a"), ((2, 2, 0), "b"),
    ((1, 2, 0), "l1=1, l2=2, l3=0 → a, b, tie: no strict majority of the 3 votes"),
    ((1, 0, 0), "l1=1, l2=0, l3=0 → a, tie, tie: no strict majority of the 3 votes"),
])
def test_annotator_votes_need_a_strict_majority_of_all_label_columns(votes, expected):
    row = {"prompt": "p", "a": "x", "b": "y", **dict(zip(("l1", "l2", "l3"), votes))}
    fmt = {"response_columns": ("a", "b"), "label_columns": ("l1", "l2", "l3"),
           "label_map": {"0": "tie", "1": "a", "2": "b"}}
    if len(expected) == 1:
        assert pair(row, **fmt).chosen == [A(row[expected])]
    else:
        assert drop(row, **fmt) == (LABEL_TIE, expected)


# --- rated completions --------------------------------------------------------------------------------

def test_ultrafeedback_raw_best_vs_random():
    """openbmb/UltraFeedback: the best overall_score against a seeded random lower-rated completion; the
    first of two best-rated completions is chosen; all completions rated alike is a tie."""
    rows = fixture("ultrafeedback_raw.jsonl")
    got = rows_to_pairs(rows)
    assert got.pairs == [P([U("Name a planet.")], [A("Mars.")], [A("Venus, maybe.")], SHAPE_RATED, 0),
                         P([U("Say hi in Spanish.")], [A("Hola.")], [A("Hello.")], SHAPE_RATED, 1)]
    assert drops_of(got) == {2: (TIED_RATINGS, "all 2 completions have overall_score 5.0")}
    # Seeded per row: the same seed gives the same pairs, other seeds other lower-rated completions.
    assert rows_to_pairs(rows) == got
    rejected = {rows_to_pairs(rows[:1], RowFormat(seed=seed)).pairs[0].rejected[0]["content"] for seed in range(20)}
    assert rejected == {"Pluto.", "The Moon.", "Venus, maybe."}


def test_ultrafeedback_raw_best_vs_worst():
    got = rows_to_pairs(fixture("ultrafeedback_raw.jsonl"), RowFormat(binarize="best_vs_worst"))
    assert [(p.chosen, p.rejected) for p in got.pairs] == [([A("Mars.")], [A("The Moon.")]),
                                                           ([A("Hola.")], [A("Hello.")])]


def test_rating_key():
    row = {"prompt": "p", "completions": [{"response": "x", "score": 1}, {"response": "y", "score": 3}]}
    assert pair(row, rating_key="score") == P([U("p")], [A("y")], [A("x")], SHAPE_RATED)


@pytest.mark.parametrize("completions, reason, detail", [
    ([{"response": "x", "overall_score": 3}], TIED_RATINGS, "completions has 1, expected 2 or more rated completions"),
    ([], TIED_RATINGS, "completions has 0, expected 2 or more rated completions"),
    ([{"response": "x", "overall_score": 3}, {"response": "y", "overall_score": "N/A"}], WRONG_TYPES,
     "completions[1].overall_score is 'N/A', expected a number"),
    ([{"response": "x", "overall_score": 3}, {"response": "y"}], WRONG_TYPES,
     "completions[1].overall_score is None, expected a number"),
    ([{"response": "x", "overall_score": 3}, "y"], WRONG_TYPES,
     "completions[1] is str, expected a completion with response and overall_score"),
    ("x", WRONG_TYPES, "completions is str, expected a list of completions with response and overall_score"),
    ([{"response": None, "overall_score": 3}, {"response": "y", "overall_score": 1}], WRONG_TYPES,
     "completions[0].response is None, expected a string or a list of messages"),
])
def test_bad_rated_completions(completions, reason, detail):
    assert drop({"instruction": "p", "completions": completions}) == (reason, detail)


# --- drops ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, detail", [
    ({"prompt": "p", "chosen": "  \n", "rejected": "r"}, "chosen is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": [A("")]}, "rejected is empty"),
    ({"prompt": "p", "chosen": [], "rejected": "r"}, "chosen is empty"),
    ({"chosen": "\n\nHuman: x\n\nAssistant: ", "rejected": "\n\nHuman: x\n\nAssistant: y"}, "chosen is empty"),
    ({"chosen": "", "rejected": "y"}, "chosen is empty"),
])
def test_drop_empty_response(row, detail):
    assert drop(row) == (EMPTY_RESPONSE, detail)


@pytest.mark.parametrize("row", [
    {"prompt": "p", "chosen": "same", "rejected": "same"},
    {"prompt": "p", "chosen": "same", "rejected": [A("same")]},
    {"prompt": "p", "chosen": [U("p"), A("x")], "rejected": [U("p"), A("x")]},
    {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b "},
])
def test_drop_same_responses(row):
    assert drop(row) == (SAME_RESPONSES, "")


@pytest.mark.parametrize("row, detail", [
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "chosen is int, expected a string or a list of messages"),
    ({"prompt": None, "chosen": "c", "rejected": "r"}, "prompt is None, expected a string or a list of messages"),
    ({"prompt": "p", "chosen": "c", "rejected": ["r"]}, "rejected[0] is str, expected a message with role and content"),
    ({"prompt": "p", "chosen": "c", "rejected": [{"content": "r"}]},
     "rejected[0] is dict, expected a message with role and content"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": None}], "rejected": "r"},
     "chosen[0] content is None, expected a string or a list of text parts"),
    ({"prompt": "  ", "chosen": "c", "rejected": "r"}, "prompt is empty"),
    ({"prompt": [U("q"), A("a")], "chosen": "c", "rejected": "r"},
     "prompt ends with an assistant turn, expected a user or system turn"),
    ({"prompt": "p", "chosen": [U("p"), A("c")], "rejected": "r"},
     "one of chosen/rejected is a whole conversation and the other is not"),
    ({"chosen": [U("a"), A("c")], "rejected": [U("b"), A("r")]},
     "chosen and rejected conversations do not start with the same prompt turns"),
    ({"chosen": [U("a"), A("c"), U("more")], "rejected": [U("a"), A("r")]},
     "chosen reply 1 is a user turn, expected assistant turns only"),
    ({"chosen": [A("c")], "rejected": [A("r")]},
     "no prompt column, and chosen/rejected are assistant replies without the prompt turns"),
])
def test_drop_wrong_types(row, detail):
    assert drop(row) == (WRONG_TYPES, detail)


@pytest.mark.parametrize("message", [{"role": "wizard", "content": "hi"}, {"from": "wizard", "value": "hi"}])
def test_drop_unknown_role(message):
    assert drop({"prompt": [message], "chosen": "c", "rejected": "r"}) == (
        UNKNOWN_ROLE, "prompt[0] has role 'wizard', expected system, user (human) or assistant (gpt)")
