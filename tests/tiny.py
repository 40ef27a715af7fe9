"""Tiny offline models and tokenizers shared by the tests (no hub access), and an op counter."""
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from torch.utils._python_dispatch import TorchDispatchMode

VOCAB = 64
WORDS = "<unk> <pad> \n user assistant system the sky is blue green red yes no why what ok good bad a b c".split(" ")


def tiny_llama(seed=0, dtype=torch.float32, tied=True):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=64, initializer_range=0.2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype)


def word_level_tokenizer(words, special, template, bos=None, eos=None, add_bos=False, plain_added=(), **kw):
    """A WordLevel tokenizer over `words` that splits on spaces and punctuation and keeps "\\n" as its
    own token (so a stray template newline shows up in the ids); `special` tokens are added as special,
    `plain_added` as plain added tokens; `add_bos` makes it prepend `bos` like Llama's post-processor."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", "removed"),
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Punctuation("isolated"),
    ])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tk.token_to_id(bos))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, **kw)
    tok.chat_template = template
    return tok


def chatml_tokenizer():
    return word_level_tokenizer(
        WORDS, ["<|im_start|>", "<|im_end|>"],
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        eos="<|im_end|>", pad_token="<pad>",
    )


def tiny_chat_model(tokenizer, context=2048, seed=0):
    """A random tiny Llama sized for `tokenizer`, with its pad/eos ids (for generation and chat)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.LlamaForCausalLM(config)


def save_tiny_chat_model(path, seed=0, tokenizer=None):
    """tiny_chat_model with `tokenizer` (default: the word-level ChatML one), saved as a Hugging Face
    directory; returns the path."""
    tok = tokenizer if tokenizer is not None else chatml_tokenizer()
    tiny_chat_model(tok, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def byte_level_chatml_tokenizer(corpus=("the sky is blue, what is 2 + 2? Hello there! Say hi in Spanish.",),
                                vocab_size=300):
    """A byte-level BPE tokenizer (every text gets distinct ids, no <unk>), trained in a blink on `corpus`
    (a larger corpus and vocabulary give fewer tokens per text), with ChatML special tokens and template:
    for data in any language or shape."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(corpus), vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"], show_progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                               pad_token="<pad>")
    tok.chat_template = chatml_tokenizer().chat_template
    return tok


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run (by overload) while active: `with OpCounter() as counter: ...; counter.counts`."""

    def __init__(self):
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))

    def matmuls(self) -> int:
        """mm and addmm calls (nn.Linear's, the output head's)."""
        return self.counts.get(torch.ops.aten.mm.default, 0) + self.counts.get(torch.ops.aten.addmm.default, 0)


def t5_tokenizer():
    """A T5-like tokenizer: word level, "</s>" appended to every text by its post-processor (as T5's does), "<pad>"
    (id 0, T5's decoder start) for padding, no BOS and no chat template."""
    words = ["<pad>", "</s>", "<unk>", *WORDS[2:]]
    tok = word_level_tokenizer(words, ["</s>"], None, eos="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.convert_tokens_to_ids("</s>"))])
    return tok


def bart_tokenizer():
    """A BART-like tokenizer: word level, every text wrapped in "<s>" .. "</s>" by its post-processor (as BART's
    is), "<pad>" for padding, no chat template."""
    words = ["<s>", "<pad>", "</s>", "<unk>", *WORDS[2:]]
    tok = word_level_tokenizer(words, ["<s>", "</s>"], None, bos="<s>", eos="</s>", pad_token="<pad>",
                               unk_token="<unk>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>")), ("</s>", tok.convert_tokens_to_ids("</s>"))])
    return tok


def tiny_t5(seed=0, flan=False, vocab=VOCAB):
    """A random tiny T5ForConditionalGeneration in fp32: the original T5 (lm_head tied to the embedding, the
    decoder output scaled by d_model**-0.5 before it, ReLU feed-forward) or, `flan`, T5 v1.1 / Flan-T5 (untied
    lm_head, gated-GELU feed-forward). Pad 0 is the decoder start, as in T5."""
    config = transformers.T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if flan else "relu", tie_word_embeddings=not flan,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, initializer_factor=1.0,
    )
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(config)


def tiny_bart(seed=0, vocab=VOCAB):
    """A random tiny BartForConditionalGeneration in fp32 (learned positions, final_logits_bias after the head);
    "</s>" (2) starts the decoder, as in BART."""
    config = transformers.BartConfig(
        vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.2,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.BartForConditionalGeneration(config)
    with torch.no_grad():  # a nonzero bias, so a head that skipped it would be caught
        model.final_logits_bias.normal_(0, 0.5)
    return model


def save_tiny_t5(path, seed=0):
    """tiny_t5 with t5_tokenizer, saved as a Hugging Face directory; returns the path."""
    tok = t5_tokenizer()
    tiny_t5(seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
