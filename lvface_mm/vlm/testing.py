"""Tiny random VLMs and LLMs built from configs, for tests, benchmarks and the demo's `--tiny` mode.

Built the way transformers' own model tests build theirs (hidden 32, 2 layers, 8-16 px images), with
a real processor of the family around a small word-level tokenizer, so everything runs offline in
milliseconds and exercises the family's real processing and merge code. Nothing here downloads.

    tiny = build_tiny_vlm("qwen2_vl")
    tiny.model, tiny.processor, tiny.tokenizer, tiny.image_size
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# A small English vocabulary: enough for the grounding prompts and readable tiny outputs.
_WORD_TEXT = (
    "the a an and or of to in on at is are was be this that it with for as by from who what which where "
    "how picture image photo face faces person people man woman child unknown named name names called "
    "left right centre center middle top bottom box one two three four five six seven eight nine ten "
    "describe caption answer question tell me about sentence short there here not do never invent use "
    "only these those known you your see shows standing sitting smiling looking next beside together "
    "friends Alice Bob Carol Dave Eve Paris France capital yes no hello world please , . : ; ? ! ( ) [ ] "
    "- ' \" 0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100 "
)
_WORDS = tuple(_WORD_TEXT.split())

_CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>")


def _chat_template(image_markup: str) -> str:
    # ChatML-like; image items become the family's image markup. Written for these tiny tokenizers only.
    return (
        "{%- for message in messages -%}"
        "<|im_start|>{{ message['role'] }}"
        "{%- if message['content'] is string %} {{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' %} " + image_markup + "{%- else %} {{ item['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif %} <|im_end|>"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}<|im_start|>assistant{% endif -%}"
    )


def tiny_tokenizer(specials: Sequence[str] = (), chat_template: str | None = None) -> Any:
    """A word-level fast tokenizer over a fixed small vocabulary (ids are stable across runs).

    Args:
        specials: extra special tokens (image markers etc.), added after the base specials.
        chat_template: Jinja chat template to attach, or None.
    """
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import AddedToken, PreTrainedTokenizerFast

    base = ["[PAD]", "<s>", "</s>", "[UNK]"]
    special_list = [*base, *_CHAT_SPECIALS, *[s for s in specials if s not in base]]
    vocab = {tok: i for i, tok in enumerate(special_list)}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_list])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]", unk_token="[UNK]"
    )
    tokenizer.padding_side = "left"
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _text_config(model_type: str, vocab_size: int, **extra: Any) -> dict[str, Any]:
    return dict(
        model_type=model_type,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **extra,
    )


@dataclass
class TinyVLM:
    """A tiny random model with its processor.

    Attributes:
        family: family registry key.
        model: the random model (eval mode).
        processor: the family's processor (the tokenizer itself for text-only LLMs).
        tokenizer: the tokenizer inside `processor`.
        image_size: side of the square RGB images the processor expects (0 for text-only).
    """

    family: str
    model: nn.Module
    processor: Any
    tokenizer: Any
    image_size: int

    def random_image(self, seed: int = 0) -> np.ndarray:
        """A random (H, W, 3) uint8 image the processor accepts."""
        if not self.image_size:
            raise ValueError(f"tiny {self.family} is text-only")
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)


_SPARE_ROWS = 4  # embedding rows past the tokenizer, as real checkpoints have, so `<face>` fits without resizing


def _build_llava(seed: int) -> TinyVLM:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_tokenizer(["<image>"], _chat_template("<image>"))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
        tokenizer=tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
    )
    config = LlavaConfig(
        text_config=_text_config("llama", len(tokenizer) + _SPARE_ROWS),
        vision_config=_clip_vision(8),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return TinyVLM("llava", _init(LlavaForConditionalGeneration, config, seed), processor, tokenizer, 8)


def _build_fast_vlm(seed: int) -> TinyVLM:
    from transformers import CLIPImageProcessor, FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_tokenizer(["<image>"], _chat_template("<image>"))
    # timm's `test_convnext` (stride 32, 64 features): a 128 px picture gives a 4 x 4 grid, 16 image
    # tokens. (A random `test_resnet` maps every region to nearly the same vector.)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"height": 128, "width": 128}, do_center_crop=False),
        tokenizer=tokenizer,
        patch_size=32,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=tokenizer.chat_template,
    )
    config = FastVlmConfig(
        vision_config=dict(model_type="timm_wrapper", architecture="test_convnext", hidden_size=64, do_pooling=False),
        text_config=_text_config("llama", len(tokenizer) + _SPARE_ROWS),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
    )
    return TinyVLM("fast_vlm", _init(FastVlmForConditionalGeneration, config, seed), processor, tokenizer, 128)


def _clip_vision(image_size: int) -> dict[str, Any]:
    return dict(
        model_type="clip_vision_model",
        image_size=image_size,
        patch_size=2,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )


def _build_llava_next(seed: int) -> TinyVLM:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    pinpoints = [[8, 8], [8, 16], [16, 8], [16, 16]]
    tokenizer = tiny_tokenizer(["<image>"], _chat_template("<image>"))
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    config = LlavaNextConfig(
        text_config=_text_config("llama", len(tokenizer) + _SPARE_ROWS),
        vision_config=_clip_vision(8),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return TinyVLM("llava_next", _init(LlavaNextForConditionalGeneration, config, seed), processor, tokenizer, 16)


def _qwen_processor(tokenizer: Any) -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    sizes = dict(patch_size=2, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=16 * 16)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


_QWEN_SPECIALS = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|box_start|>",
    "<|box_end|>",
]


def _qwen_text(vocab_size: int) -> dict[str, Any]:
    # head_dim 8 -> 4 rotary frequencies, split over (t, h, w) by mrope_section.
    return _text_config(
        "qwen2_vl_text",
        vocab_size,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )


def _build_qwen2_vl(seed: int) -> TinyVLM:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = tiny_tokenizer(_QWEN_SPECIALS, _chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    config = Qwen2VLConfig(
        text_config=_qwen_text(len(tokenizer) + _SPARE_ROWS),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            patch_size=2,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = _init(Qwen2VLForConditionalGeneration, config, seed)
    return TinyVLM("qwen2_vl", model, _qwen_processor(tokenizer), tokenizer, 16)


def _build_qwen2_5_vl(seed: int) -> TinyVLM:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_tokenizer(_QWEN_SPECIALS, _chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    text = _qwen_text(len(tokenizer) + _SPARE_ROWS)
    text["model_type"] = "qwen2_5_vl_text"
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=37,
            num_heads=4,
            out_hidden_size=32,
            patch_size=2,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=8,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = _init(Qwen2_5_VLForConditionalGeneration, config, seed)
    return TinyVLM("qwen2_5_vl", model, _qwen_processor(tokenizer), tokenizer, 16)


_IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def _idefics_vision() -> dict[str, Any]:
    return dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=2
    )


def _build_idefics3(seed: int) -> TinyVLM:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return _build_idefics_like("idefics3", Idefics3Config, Idefics3ForConditionalGeneration, seed)


def _build_smolvlm(seed: int) -> TinyVLM:
    # SmolVLM's own processor needs `num2words` (not a dependency); Idefics3's processor writes the
    # same image block for an unsplit image (`<fake_token_around_image><global-img><image>*L...`),
    # so the tiny build processes pictures exactly like the real model (`demo --tiny` relies on it).
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return _build_idefics_like("smolvlm", SmolVLMConfig, SmolVLMForConditionalGeneration, seed)


def _build_idefics_like(name: str, config_class: type, model_class: type, seed: int) -> TinyVLM:
    """Idefics3 and SmolVLM: the same tokenizer, Idefics3 processor and config fields."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    tokenizer = tiny_tokenizer(_IDEFICS_SPECIALS, _chat_template("<image>"))
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            do_image_splitting=False, size={"longest_edge": 16}, max_image_size={"longest_edge": 16}
        ),
        tokenizer=tokenizer,
        image_seq_len=16,  # (16 / 2)^2 patches / scale_factor^2
        chat_template=tokenizer.chat_template,
    )
    config = config_class(
        text_config=_text_config("llama", len(tokenizer) + _SPARE_ROWS),
        vision_config=_idefics_vision(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    return TinyVLM(name, _init(model_class, config, seed), processor, tokenizer, 16)


def _build_paligemma(seed: int) -> TinyVLM:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tokenizer = tiny_tokenizer(["<image>"])
    image_processor = SiglipImageProcessor(size={"height": 8, "width": 8})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds 1152 loc/seg tokens
    text = _text_config("gemma", len(tokenizer) + _SPARE_ROWS, head_dim=8)
    text["num_key_value_heads"] = 1
    config = PaliGemmaConfig(
        text_config=text,
        vision_config=dict(
            model_type="siglip_vision_model",
            image_size=8,
            patch_size=2,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=32,
        hidden_size=32,
        vocab_size=len(tokenizer) + _SPARE_ROWS,
    )
    return TinyVLM("paligemma", _init(PaliGemmaForConditionalGeneration, config, seed), processor, tokenizer, 8)


def _build_causal_lm(seed: int) -> TinyVLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer((), _chat_template(""))
    # No spare rows: adding `<face>` must go through the resize path.
    config = LlamaConfig(**{k: v for k, v in _text_config("llama", len(tokenizer)).items() if k != "model_type"})
    return TinyVLM("causal_lm", _init(LlamaForCausalLM, config, seed), tokenizer, tokenizer, 0)


def _init(cls: Callable[[Any], nn.Module], config: Any, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


# Keys are build names; the family of each build is `TinyVLM.family`'s registry family (see TINY_FAMILY).
_BUILDERS: dict[str, Callable[[int], TinyVLM]] = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "idefics3": _build_idefics3,
    "smolvlm": _build_smolvlm,
    "paligemma": _build_paligemma,
    "fast_vlm": _build_fast_vlm,
    "causal_lm": _build_causal_lm,
}

# Side of the square images each tiny build's processor expects (0: text-only).
TINY_IMAGE_SIZE: dict[str, int] = {
    "llava": 8,
    "llava_next": 16,
    "qwen2_vl": 16,
    "qwen2_5_vl": 16,
    "idefics3": 16,
    "smolvlm": 16,
    "paligemma": 8,
    "fast_vlm": 128,
    "causal_lm": 0,
}

# Which registered family serves each tiny build.
TINY_FAMILY: dict[str, str] = {
    "llava": "llava",
    "llava_next": "llava_next",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "idefics3": "idefics3",
    "smolvlm": "idefics3",
    "paligemma": "paligemma",
    "fast_vlm": "fast_vlm",
    "causal_lm": "causal_lm",
}


def list_tiny_builds() -> list[str]:
    return sorted(_BUILDERS)


def build_tiny_vlm(name: str, seed: int = 0) -> TinyVLM:
    """A tiny random model with its processor; `name` from `list_tiny_builds()`.

    The same seed gives the same weights, so two builds can stand for "base model" and "model with
    the adapter attached" in equality tests.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny build {name!r}; known: {', '.join(list_tiny_builds())}")
    return _BUILDERS[name](seed)


def tiny_card(name: str, **changes: Any) -> Any:
    """An `IdentityAdapterConfig` for a tiny build (encoder `lvface_tiny`, K=2, mlp2x_gelu)."""
    from .config import IdentityAdapterConfig

    fields = dict(
        name=f"tiny-{name}",
        vlm_id=f"lvface-mm/tiny-{name}",
        family=TINY_FAMILY[name],
        encoder="lvface_tiny",
        embedding_source="pooled",
        projector="mlp2x_gelu",
        num_id_tokens=2,
        description=f"random tiny {name} for tests",
    )
    fields.update(changes)
    return IdentityAdapterConfig(**fields)


def tiny_identity_vlm(name: str, adapter: Any = None, seed: int = 0, **kwargs: Any) -> Any:
    """`IdentityVLM` around `build_tiny_vlm(name, seed)`: the tiny card (or `adapter`: a saved adapter
    folder or repo id, or a card) and a seeded random `lvface_tiny` encoder. `kwargs` go to
    `IdentityVLM.from_pretrained`."""
    from .model import IdentityVLM

    tiny = build_tiny_vlm(name, seed=seed)
    kwargs.setdefault("encoder_pretrained", False)
    return IdentityVLM.from_pretrained(
        tiny.model, processor=tiny.processor, adapter=adapter if adapter is not None else tiny_card(name), **kwargs
    )


CHATML_TEMPLATE = (
    # ChatML as SmolLM2/Qwen2 write it ("<|im_start|>role\ncontent<|im_end|>\n"), plus image items
    # rendered as "<image>\n" (for LLaVA wrappers). Newlines are written as expressions so that
    # whitespace control never eats them, and n turns render as a prefix of n + 1 turns.
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _add_image_token(tokenizer: Any) -> int:
    """Add `<image>` to a real LLM's tokenizer (once) and return its id."""
    from transformers import AddedToken

    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids("<image>")


def _vlm_around(cls: Callable[[Any], nn.Module], config: Any, lm: nn.Module, tokenizer: Any, seed: int) -> nn.Module:
    """A fresh VLM of `cls` whose language model and head are `lm`'s weights, unchanged; the embedding
    table grows by a row when `<image>` lies past it."""
    model = _init(cls, config, seed).to(next(lm.parameters()).dtype)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)
    image_token_id = config.image_token_id
    if image_token_id >= model.get_input_embeddings().weight.shape[0]:
        from .processing import ensure_embedding_row

        ensure_embedding_row(model, image_token_id, len(tokenizer))
    return model


def llava_from_causal_lm(
    lm: nn.Module, tokenizer: Any, image_size: int = 112, patch_size: int = 16, vision_hidden: int = 64, seed: int = 0
) -> TinyVLM:
    """A LLaVA whose language model is a real causal LM and whose vision tower is a small random CLIP.

    The LLM's weights are copied in unchanged, so text-only prompts behave exactly as the LLM does:
    a real LLM backbone for bridge tests and benchmarks without downloading a VLM. Adds `<image>` to
    `tokenizer` and gives the processor a ChatML template that renders image items.
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    image_token_id = _add_image_token(tokenizer)
    num_patches = (image_size // patch_size) ** 2
    vision = dict(
        model_type="clip_vision_model",
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=lm.config,
        image_token_id=image_token_id,
        image_seq_length=num_patches,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = _vlm_around(LlavaForConditionalGeneration, config, lm, tokenizer, seed)
    processor = LlavaProcessor(
        # Resized to a square without cropping: a wide scene keeps the people at its sides.
        image_processor=CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHATML_TEMPLATE,
    )
    return TinyVLM("llava", model, processor, tokenizer, image_size)


def fast_vlm_from_causal_lm(
    lm: nn.Module,
    tokenizer: Any,
    image_size: int = 320,
    vision_weights: str | None = None,
    seed: int = 0,
) -> TinyVLM:
    """A FastVLM whose language model is a real causal LM and whose vision tower is timm's
    `mobilenetv2_100` (ImageNet weights with `vision_weights="imagenet"` or a .pth path, see
    `lvface_mm.vlm.imagenet_towers`; random with None).

    Like `llava_from_causal_lm`, text-only prompts behave exactly as the LLM does; unlike it, the
    tower is pretrained, so the picture arrives as features that already tell colours and shapes
    apart. The 1280-channel stride-32 map gives (image_size / 32)^2 image tokens: 100 at 320 px.
    The tower's BatchNorm stays in eval mode while frozen (`IdentityAdapterTask.train`).
    """
    from transformers import (
        CLIPImageProcessor,
        FastVlmConfig,
        FastVlmForConditionalGeneration,
        LlavaProcessor,
    )

    from .imagenet_towers import TIMM_ARCHITECTURE, imagenet_mobilenet_v2_state

    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of MobileNetV2's stride 32, got {image_size}")
    image_token_id = _add_image_token(tokenizer)
    config = FastVlmConfig(
        vision_config=dict(
            model_type="timm_wrapper", architecture=TIMM_ARCHITECTURE, hidden_size=1280, do_pooling=False
        ),
        text_config=lm.config,
        image_token_id=image_token_id,
        image_seq_length=(image_size // 32) ** 2,
    )
    model = _vlm_around(FastVlmForConditionalGeneration, config, lm, tokenizer, seed)
    if vision_weights is not None:
        state = imagenet_mobilenet_v2_state(None if vision_weights == "imagenet" else vision_weights)
        model.model.vision_tower.timm_model.load_state_dict(state, strict=True)
    processor = LlavaProcessor(
        # ImageNet's normalisation (the tower's); resized to a square without cropping, as for LLaVA.
        image_processor=CLIPImageProcessor(
            size={"height": image_size, "width": image_size},
            do_center_crop=False,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ),
        tokenizer=tokenizer,
        patch_size=32,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHATML_TEMPLATE,
    )
    return TinyVLM("fast_vlm", model, processor, tokenizer, image_size)


def random_face_crops(n: int, seed: int = 0) -> np.ndarray:
    """(n, 112, 112, 3) uint8 random "aligned crops" for a random encoder."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


__all__ = [
    "TINY_FAMILY",
    "TINY_IMAGE_SIZE",
    "CHATML_TEMPLATE",
    "TinyVLM",
    "build_tiny_vlm",
    "fast_vlm_from_causal_lm",
    "llava_from_causal_lm",
    "list_tiny_builds",
    "random_face_crops",
    "tiny_card",
    "tiny_identity_vlm",
    "tiny_tokenizer",
]
