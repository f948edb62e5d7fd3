"""A character-level tokenizer saved as a standard Hugging Face `tokenizer.json`.

It loads with `AutoTokenizer.from_pretrained(dir)` and needs no custom code: a
WordLevel model over single characters, a pre-tokenizer that isolates each character
and a Fuse decoder that joins them back without spaces.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]
CHARACTERS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    tokenizer.model_max_length = 512
    return tokenizer
