"""A tiny random LLM whose vocabulary covers a VQA set, for tests, benchmarks and smoke runs.

The bridge's tiny tokenizer (`lvface_mm.vlm.testing.tiny_tokenizer`) knows a fixed list of
English words; identity VQA needs the invented names and the builder's phrasing as whole tokens,
otherwise "Yes"/"No" or two names collapse into one unknown token and nothing can be learned.
`tiny_llm_for_samples` adds every word of the samples to that tokenizer and builds a Llama from a
config around it. Nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .schema import FACE_REF_RE, Sample

# ChatML-like; the tiny tokenizer has <|im_start|>/<|im_end|> as special tokens.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}"
    "{%- if message['content'] is string %} {{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] %} {{ item['text'] }}{%- endfor -%}{%- endif %} <|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant{% endif -%}"
)
_ROLES = ("system", "user", "assistant")
_WORD_RE = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


@dataclass(frozen=True)
class TinyLLMConfig:
    """Shape of the tiny Llama (defaults train in seconds on one CPU core)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    seed: int = 0
    # Tied input/output embeddings let a tiny model copy a name it never produced in training
    # (open-set binding): the copied token's input row is also its output row.
    tie_word_embeddings: bool = False
    # Names as WordPiece pieces (a capitalised first syllable, then "##" syllables and letters)
    # instead of one whole-word token each: an unseen name is then a new sequence of pieces seen in
    # training, which a small model can learn to copy (open-set binding); see `subword_tokenizer`.
    subword_names: bool = False

    def __post_init__(self) -> None:
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TinyLLMConfig.{key} must be an int >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "TinyLLMConfig: hidden_size must divide by num_attention_heads, and heads by num_key_value_heads; "
                f"got {self.hidden_size}, {self.num_attention_heads}, {self.num_key_value_heads}"
            )


def grounding_words() -> set[str]:
    """Words the one prompt format writes around the samples' text (the grounding paragraph, the
    candidate block, positions and 0-1 box coordinates), so a word-level tokenizer never sees UNK."""
    from ..vlm.grounding import GroundingTemplate

    t = GroundingTemplate()
    text = " ".join(str(getattr(t, name)) for name in t.__dataclass_fields__ if isinstance(getattr(t, name), str))
    text += " faces face on the left in the centre on the right marked mark"
    words = set(_WORD_RE.findall(re.sub(r"\{[a-z_]+\}", " ", text)))
    words |= {str(i) for i in range(10)} | {f"{i:03d}" for i in range(1000)} | {str(i) for i in range(1001)}
    return words


def sample_words(samples: Iterable[Sample]) -> list[str]:
    """Every word and punctuation mark in the samples' turns (placeholders removed) and in the
    grounding paragraph the one prompt format adds, sorted."""
    words: set[str] = grounding_words()
    for s in samples:
        for turn in s.turns:
            words.update(_WORD_RE.findall(FACE_REF_RE.sub(" ", turn.text)))
        for ref in s.meta.get("references") or ():  # open-set candidates' names
            words.update(_WORD_RE.findall(str(ref.get("name", ""))))
    return sorted(words)


def tiny_tokenizer_with_words(words: Iterable[str]) -> Any:
    """The bridge's tiny word-level tokenizer plus `words` as whole-word tokens, with a chat template."""
    from transformers import AddedToken

    from ..vlm.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer((), TINY_CHAT_TEMPLATE)
    vocab = tokenizer.get_vocab()
    words = {*words, *_ROLES}  # the chat template writes the role names
    # single_word: "Bo" must not match inside "Bob"; sorted so ids are the same on every run.
    new = [AddedToken(w, single_word=True, normalized=False) for w in sorted(set(words)) if w not in vocab]
    tokenizer.add_tokens(new)
    return tokenizer


# Name pieces: the builder's invented names are (onset + vowel) syllables and a coda; single letters
# cover any other alphabetic name, so no name ever becomes [UNK].
def name_pieces() -> list[str]:
    """WordPiece pieces that spell every name: word-initial ("Ba", "Sha", "B") and continuation
    ("##ba", "##r") syllables and letters."""
    from .builder import _CODAS, _ONSETS, _VOWELS

    syllables = [o + v for o in _ONSETS for v in _VOWELS]
    letters = list("abcdefghijklmnopqrstuvwxyz")
    initial = [w.capitalize() for w in syllables + letters] + syllables + letters
    continuation = ["##" + w for w in syllables + letters + [c for c in _CODAS if c]]
    return sorted(set(initial)) + sorted(set(continuation))


def sample_names(samples: Iterable[Sample]) -> set[str]:
    """Every person's name the samples mention: faces, targets and open-set references."""
    names: set[str] = set()
    for s in samples:
        names.update(f.name for f in s.faces if f.name)
        names.update(n for n in s.target.get("names", ()) if isinstance(n, str))
        names.update(str(r["name"]) for r in s.meta.get("references") or () if r.get("name"))
    return names


def subword_tokenizer(words: Iterable[str], names: Iterable[str] = ()) -> Any:
    """A WordPiece tokenizer: the tiny tokenizer's specials and words, `words` whole, and names spelt
    with `name_pieces` (never whole), decoded back into words ("Ba ##so ##r" -> "Basor").

    A whole-word name an evaluation never trained on is a token the model never produced; spelt in
    pieces it is a new sequence of familiar tokens, the setting in which small attention models
    learn to copy (induction heads).
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    from ..vlm.testing import tiny_tokenizer

    base = tiny_tokenizer((), TINY_CHAT_TEMPLATE)
    specials = sorted(base.backend_tokenizer.get_added_tokens_decoder().items())  # [(id, AddedToken)]
    vocab = dict(base.get_vocab())
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    skip = {n.lower() for n in names}
    pieces = []
    for word in sorted({*words, *_ROLES}):
        if word.lower() not in skip:
            pieces += [p for p, _ in pre.pre_tokenize_str(word)]
    for piece in [*sorted(set(pieces)), *name_pieces()]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([token for _, token in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )
    tokenizer.padding_side = base.padding_side
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llm(tokenizer: Any, config: TinyLLMConfig = TinyLLMConfig()) -> torch.nn.Module:
    """A random Llama sized for `tokenizer`, deterministic in `config.seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama)
    return model.eval()


def tiny_llm_for_samples(samples: Iterable[Sample], config: TinyLLMConfig = TinyLLMConfig()) -> tuple[Any, Any]:
    """(model, tokenizer): a tiny random Llama whose tokenizer knows every word in `samples` (names
    spelt in pieces with `config.subword_names`)."""
    samples = list(samples)
    if config.subword_names:
        tokenizer = subword_tokenizer(sample_words(samples), sample_names(samples))
    else:
        tokenizer = tiny_tokenizer_with_words(sample_words(samples))
    return build_tiny_llm(tokenizer, config), tokenizer
