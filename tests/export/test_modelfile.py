"""modelfile.py: the Ollama Modelfile, its TEMPLATE recognised from the chat template by probe renders.

Word-level tokenizers carry the real templates (SmolLM2's ChatML with its default system prompt, Llama 3's
headers, Zephyr's), so each case runs in milliseconds; the SmolLM2 case is checked on the real tokenizer too.
"""
import pytest

from orpo.export.modelfile import CHATML, LLAMA3, modelfile_text, recognise_chat_format, write_modelfile
from tiny import word_level_tokenizer

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SMOLLM2_MODELFILE = '''\
# Ollama Modelfile written by `orpo export`: ollama create NAME -f Modelfile
FROM ./smollm2.gguf
TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""
PARAMETER stop "<|im_end|>"
'''

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

WORDS = "<unk> <pad> \n user assistant system Hi there Hello ! What is 2 + ? Be brief .".split(" ")


def chatml(template=SMOLLM2_TEMPLATE):
    return word_level_tokenizer(WORDS, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], template,
                                bos="<|im_start|>", eos="<|im_end|>", pad_token="<|im_end|>")


def llama3(adds_bos):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return word_level_tokenizer(WORDS, specials, LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>",
                                add_bos=adds_bos)


def test_smollm2_chatml_modelfile_exactly():
    text, notes = modelfile_text("smollm2.gguf", chatml())
    assert text == SMOLLM2_MODELFILE and notes == []


@pytest.mark.real_model
def test_the_real_smollm2_tokenizer_gives_the_same_modelfile():
    from orpo.train.models import fetch_smollm2, load_tokenizer

    assert modelfile_text("smollm2.gguf", load_tokenizer(str(fetch_smollm2())))[0] == SMOLLM2_MODELFILE


def test_chatml_without_a_default_system_prompt_has_no_system_line():
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    recognised = recognise_chat_format(chatml(template))
    assert recognised.format is CHATML and recognised.default_system is None and recognised.bos_text == ""
    assert "SYSTEM" not in modelfile_text("m.gguf", chatml(template))[0]


@pytest.mark.parametrize("adds_bos, bos_in_template", [(True, ""), (False, "<|begin_of_text|>")])
def test_llama3_writes_bos_in_the_template_only_where_the_tokenizer_does_not_add_it(adds_bos, bos_in_template):
    """llama.cpp adds BOS from the GGUF's add_bos flag, so the template writes it only where that is off."""
    text, notes = modelfile_text("llama.gguf", llama3(adds_bos))
    assert notes == []
    assert f'TEMPLATE """{bos_in_template}{{{{- range .Messages }}}}<|start_header_id|>' in text
    assert text.endswith('<|start_header_id|>assistant<|end_header_id|>\n\n"""\nPARAMETER stop "<|eot_id|>"\n')
    assert recognise_chat_format(llama3(adds_bos)).format is LLAMA3


def test_a_template_of_no_known_format_gets_no_template_and_a_note():
    zephyr = word_level_tokenizer(WORDS + ["<|user|>", "<|assistant|>", "<|system|>"], ["</s>"], ZEPHYR_TEMPLATE,
                                  eos="</s>")
    text, notes = modelfile_text("z.gguf", zephyr)
    assert "TEMPLATE" not in text and 'PARAMETER stop "</s>"' in text
    assert len(notes) == 1 and notes[0].startswith("no TEMPLATE in the Modelfile")


def test_a_near_chatml_template_is_not_taken_for_chatml():
    """No newline after <|im_end|>: the prompts Ollama would build differ from the trained ones."""
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert recognise_chat_format(chatml(template)) is None


def test_write_modelfile_puts_it_beside_the_gguf(tmp_path):
    (tmp_path / "out").mkdir()
    path, notes = write_modelfile(tmp_path / "out" / "smollm2.gguf", chatml())
    assert path == tmp_path / "out" / "Modelfile" and path.read_text() == SMOLLM2_MODELFILE and notes == []
