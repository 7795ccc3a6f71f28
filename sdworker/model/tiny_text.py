"""Tiny text encoders' tokenizers, processors and configs for the recipes (recipes.py) whose text encoders are
language models: Qwen2.5-VL (Qwen-Image and its edit models), Qwen3 (Z-Image, FLUX.2 [klein]), Mistral Small 3
(FLUX.2 [dev]). Built offline: byte-level BPE vocabularies learnt from the words of the pipelines' own prompt
templates, so that each template word is one token, as in the real vocabularies, and the pipelines' fixed cut of
their template (34 tokens for Qwen-Image) falls where it does on the real model. The processors (FLUX.2 [dev]'s
Pixtral, Qwen-Image-Edit's Qwen2-VL) are transformers' own classes, which need torchvision."""

from __future__ import annotations

import json
from typing import Any

# The system prompts the Qwen pipelines wrap a prompt in and then cut off by a fixed count of tokens
# (`prompt_template_encode_start_idx`: 34 for Qwen-Image, 64 for Qwen-Image-Edit): their words are whole tokens
# here, as in Qwen's own vocabulary, so the cut falls where it does on the real model.
_QWEN_IMAGE_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the "
    "objects and background:"
)
_QWEN_EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
_QWEN_WORDS = ("system", "user", "assistant", "Picture", _QWEN_IMAGE_SYSTEM, _QWEN_EDIT_SYSTEM)

# Qwen2.5 / Qwen3's special tokens (their ids come after the ordinary vocabulary, as in Qwen's).
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)

# Qwen's chat template, cut down to what the pipelines use: string or text/image content, the generation prompt,
# and Qwen3's `enable_thinking=False` (an empty think block), which FLUX.2 [klein] asks for.
_QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def byte_bpe(texts: tuple[str, ...], special_tokens: tuple[str, ...] = ()) -> tuple[dict[str, int], list]:
    """A byte-level BPE vocabulary and merges learnt offline from `texts` (tokenizers' own trainer, Qwen's
    pre-tokenizer split): `special_tokens` first, the 256 byte symbols, then merges until every word of `texts` (a
    pre-token piece: ' the', ',', 'Describe') is one token, as in a real vocabulary; other words fall back to
    bytes. Deterministic."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # never reached: training stops when every word is one token
        min_frequency=1,
        show_progress=False,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    state = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return dict(state["vocab"]), merges


def tiny_qwen_tokenizer() -> Any:
    """A Qwen2 tokenizer (Qwen2.5-VL's and Qwen3's class), byte-level, with Qwen's special tokens and chat template;
    eos <|im_end|> and pad <|endoftext|> as in Qwen2.5-VL and Qwen3. 472 ids."""
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_bpe(_QWEN_WORDS)
    for token in _QWEN_SPECIALS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(_QWEN_SPECIALS[1:]),
        model_max_length=131072,
        chat_template=_QWEN_CHAT_TEMPLATE,
        errors="replace",
    )


def padded_vocab(tokenizer: Any) -> int:
    """A text encoder's vocabulary size for `tokenizer`: every id, padded up to a multiple of 64 as real models do."""
    return -(-len(tokenizer) // 64) * 64


def tiny_qwen3_config(tokenizer: Any, num_hidden_layers: int) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=padded_vocab(tokenizer),
        hidden_size=16,
        intermediate_size=37,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def tiny_qwen_vl(tokenizer: Any) -> Any:
    """Qwen2.5-VL (Qwen-Image's text encoder) at width 16, with its vision tower, token ids from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": padded_vocab(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # Multimodal rope: the time/height/width sections add up to half the head width (8).
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_vl_processor(tokenizer: Any) -> Any:
    """Qwen-Image-Edit's processor: Qwen2-VL's image processor (28-pixel patches, so a 64-pixel reference is a few
    vision tokens), its video processor, and `tokenizer`."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )


# Mistral Small 3's (tekken) control tokens, in their order there, and its chat template cut down to what FLUX.2's
# pipeline sends: a system message and user text or images.
_MISTRAL_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)
_MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' }}{%- endif %}"
    "{%- for part in parts %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if message['role'] == 'system' %}{{- '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[/INST]' }}"
    "{%- else %}{{- eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def tiny_pixtral_processor() -> Any:
    """FLUX.2 [dev]'s tokenizer: Mistral Small 3's processor (Pixtral's image processor and a byte-level BPE
    tokenizer with Mistral's control tokens and chat template), its vocabulary learnt from FLUX.2's system
    message."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PixtralImageProcessor, PixtralProcessor, Qwen2Tokenizer

    vocab, merges = byte_bpe((SYSTEM_MESSAGE,), special_tokens=_MISTRAL_SPECIALS)
    tokenizer = Qwen2Tokenizer(  # byte-level BPE, as tekken is; the class is only its loader
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(_MISTRAL_SPECIALS[3:]),
        model_max_length=131072,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
        errors="replace",
    )
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(patch_size=4, size={"longest_edge": 32}),
        tokenizer=tokenizer,
        patch_size=4,
        spatial_merge_size=2,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
    )


def tiny_mistral3(tokenizer: Any, num_hidden_layers: int) -> Any:
    """Mistral Small 3 (FLUX.2 [dev]'s text encoder) at width 16, with its Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<s>", "</s>", "<pad>", "[IMG]")}
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": padded_vocab(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 37,
            "max_position_embeddings": 2048,
            "num_attention_heads": 2,
            "num_hidden_layers": num_hidden_layers,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "image_size": 32,
            "patch_size": 4,
            "num_channels": 3,
            "head_dim": 8,
        },
        spatial_merge_size=2,
        vision_feature_layer=-1,
        image_token_index=ids["[IMG]"],
        multimodal_projector_bias=False,
        projector_hidden_act="gelu",
    )
    return Mistral3ForConditionalGeneration(config).eval()
