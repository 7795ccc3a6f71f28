"""A request's prompts as the pipeline's conditioning: planned before the job waits for the model (syntax, token
counts, which path, the embeddings' length), encoded in the model's turn (after the job's LoRAs are switched on,
since a LoRA may change the text encoders).

Two paths. A prompt with no weights that fits the text encoder goes to the pipeline as text, exactly as before
prompt syntax existed. A weighted, blended or long one (past CLIP's 77 tokens: encoded in 77-token chunks, not
cut), or one with `clip_skip` on SD 1.x/2.x, is encoded with compel into `prompt_embeds`.

Families with a T5 or a language model as their main encoder (sd3, flux, chroma, zimage, qwenimage, flux2) read
up to `max_sequence_length` tokens (the caller passes the request's or the family's default); what is past it is
cut, and `$meta.truncated` says so. FLUX.1 takes weights through compel on its T5 encoder; the others take none
(compel has no recipe for their encoders): a weighted prompt there is a 422, not silently flattened.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from compel import Compel, ReturnedEmbeddingsType, SplitLongTextMode
from compel.prompt_parser import Blend, Conjunction, FlattenedPrompt, Fragment

from ..errors import WorkerError
from .syntax import Syntax, flattened, is_plain, parse, plain_text

CHUNKED = frozenset({"sd1", "sd2", "sdxl"})
"""Families whose CLIP encoders read long prompts in 77-token chunks."""
NORMALIZED = frozenset({"sd1", "sd2"})
"""Families conditioned on CLIP's last layer, normalized (SDXL: the penultimate layer, not normalized)."""
WEIGHTED = CHUNKED | {"flux"}
"""Families whose prompts may carry weights."""


@dataclass(frozen=True)
class PromptPlan:
    """How one request's prompts become conditioning; decided before its turn on the model."""

    syntax: Syntax
    prompt: Conjunction
    negative: Conjunction | None
    text: str  # the prompt's words, syntax removed: what the pipeline reads on the text path
    negative_text: str | None
    embeds: bool  # compel encodes it (weights, blends, long prompts, SD 1.x/2.x clip_skip)
    tokens: int  # the prompt's tokens in the main text encoder, without start and end markers
    truncated: bool  # some of the prompt or negative prompt is past what the encoder reads
    length: int  # the embeddings' token length on the embeds path (0 on the text path)
    clip_skip: int | None

    @property
    def key(self) -> tuple:
        """What must agree for two requests to share a pipeline call."""
        return (self.embeds, self.length, self.clip_skip)


def planning_tokenizers(pipe: Any) -> dict[str, Any]:
    """Copies of `pipe`'s tokenizers for planning, which runs outside the model's turn: a fast tokenizer used by
    two threads at once, one of them the pipeline setting its truncation, raises "Already borrowed". Made once
    (at load, while nothing else runs) and kept on the pipeline."""
    copies = pipe.__dict__.get("_sdworker_planning")
    if copies is None:
        copies = {
            name: copy.deepcopy(_tokenizer(getattr(pipe, name)))
            for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
            if getattr(pipe, name, None) is not None
        }
        # Its "indexing errors" warning is not true here, for the copies nor for compel's calls in the model's
        # turn: long prompts are chunked.
        for each in [*copies.values(), *(_tokenizer(getattr(pipe, name)) for name in copies)]:
            each.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        pipe.__dict__["_sdworker_planning"] = copies
    return copies


def _tokenizer(component: Any) -> Any:
    """A pipeline's tokenizer, or the tokenizer inside the processor it has in that place (FLUX.2 [dev]'s)."""
    from transformers import ProcessorMixin

    return component.tokenizer if isinstance(component, ProcessorMixin) else component


def plan(pipe: Any, family: str, request: Any, default: Syntax, max_sequence_length: int | None) -> PromptPlan:
    """Parse and measure the request's prompts for `pipe`; 422 naming the field for what cannot be run. A request
    that names no syntax gets `default` (PROMPT_SYNTAX), or plain text on a family that takes no weights."""
    syntax = request.prompt_syntax or (default if family in WEIGHTED else "plain")
    prompt = parse(request.prompt, syntax, "prompt")
    negative = None if request.negative_prompt is None else parse(request.negative_prompt, syntax, "negative_prompt")
    weighted = not is_plain(prompt) or (negative is not None and not is_plain(negative))
    if weighted and family not in WEIGHTED:
        field = "prompt" if not is_plain(prompt) else "negative_prompt"
        raise WorkerError(
            "INVALID_INPUTS",
            f'{field}: the {family} family takes no prompt weights; remove them, or send "prompt_syntax": "plain"',
            field,
        )
    clip_skip = request.clip_skip
    if clip_skip:
        encoder = pipe.text_encoder if pipe.text_encoder is not None else pipe.text_encoder_2
        # SD 1.x/2.x read the last layer, SDXL and SD3 the one before: at least one layer must be left to read
        below = encoder.config.num_hidden_layers - (0 if family in NORMALIZED else 1)
        if clip_skip >= below:
            raise WorkerError("INVALID_INPUTS", f"clip_skip must be below {below} for this model", "clip_skip")
    tokenizer, limit = _main_tokenizer(pipe, family, max_sequence_length)
    tokens = _count(pipe, tokenizer, prompt)
    negative_tokens = _count(pipe, tokenizer, negative) if negative is not None else 0
    embeds = weighted or (family in NORMALIZED and bool(clip_skip))
    if family in CHUNKED:
        embeds = embeds or max(tokens, negative_tokens) > limit
        truncated = False
    else:
        truncated = max(tokens, negative_tokens) > limit
    length = 0
    if embeds:
        length = max(_length(pipe, family, part, max_sequence_length) for part in (prompt, negative) if part)
    return PromptPlan(
        syntax=syntax,
        prompt=prompt,
        negative=negative,
        text=plain_text(prompt.prompts[0]) if is_plain(prompt) else request.prompt,
        negative_text=None if negative is None else plain_text(negative.prompts[0]) if is_plain(negative) else "",
        embeds=embeds,
        tokens=tokens,
        truncated=truncated,
        length=length,
        clip_skip=clip_skip,
    )


def encode(pipe: Any, family: str, plan: PromptPlan, max_sequence_length: int | None) -> dict[str, torch.Tensor]:
    """The pipeline's `prompt_embeds` (and negative and pooled ones, where the family takes them) for `plan`."""
    if family == "flux":
        embeds = _conditioning(_t5(pipe, max_sequence_length), _with_tokens(pipe, pipe.tokenizer_2, plan.prompt))
        pooled = _pooled(pipe.tokenizer, pipe.text_encoder, plan.prompt)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    pairs = [
        (getattr(pipe, f"tokenizer{suffix}"), getattr(pipe, f"text_encoder{suffix}"))
        for suffix in ("", "_2")
        if getattr(pipe, f"text_encoder{suffix}", None) is not None
    ]
    skip = (plan.clip_skip or 0) + (0 if family in NORMALIZED else 1)
    positives, negatives = [], []
    for tokenizer, encoder in pairs:
        compel = _compel(tokenizer, encoder, skip, family in NORMALIZED, None)
        positive = _conditioning(compel, _with_tokens(pipe, tokenizer, plan.prompt))
        negative = _conditioning(compel, _with_tokens(pipe, tokenizer, plan.negative or parse("", "plain")))
        positive, negative = compel.pad_conditioning_tensors_to_same_length([positive, negative])
        positives.append(positive)
        negatives.append(negative)
    embeds = torch.cat(positives, dim=-1)
    out = {"prompt_embeds": embeds, "negative_prompt_embeds": torch.cat(negatives, dim=-1)}
    if family == "sdxl":
        tokenizer, encoder = pairs[-1]  # the encoder with the projection gives the pooled embedding
        out["pooled_prompt_embeds"] = _pooled(tokenizer, encoder, plan.prompt)
        if plan.negative is None and pipe.config.get("force_zeros_for_empty_prompt", True):
            out["negative_prompt_embeds"] = torch.zeros_like(embeds)  # as the pipeline does for no negative prompt
            out["negative_pooled_prompt_embeds"] = torch.zeros_like(out["pooled_prompt_embeds"])
        else:
            out["negative_pooled_prompt_embeds"] = _pooled(tokenizer, encoder, plan.negative or parse("", "plain"))
    return out


class _Layer:
    """A CLIP text encoder as compel calls it, answering the hidden state of the layer the family conditions on:
    `skip` layers before the last, through the final layer norm when `normalize`."""

    def __init__(self, encoder: Any, skip: int, normalize: bool) -> None:
        self.encoder, self.skip, self.normalize = encoder, skip, normalize

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def __call__(self, input_ids: torch.Tensor, attention_mask: Any = None, **_: Any) -> Any:
        out = self.encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True)
        if self.normalize and self.skip == 0:
            return SimpleNamespace(last_hidden_state=out.last_hidden_state)
        hidden = out.hidden_states[-(self.skip + 1)]
        if self.normalize:
            hidden = getattr(self.encoder, "text_model", self.encoder).final_layer_norm(hidden)
        return SimpleNamespace(last_hidden_state=hidden)


def _compel(tokenizer: Any, encoder: Any, skip: int | None, normalize: bool, t5_length: int | None) -> Compel:
    """compel over one encoder: CLIP in 77-token chunks split at phrase ends, or T5 cut at `t5_length`."""
    return Compel(
        tokenizer=tokenizer,
        text_encoder=encoder if skip is None else _Layer(encoder, skip, normalize),
        truncate_long_prompts=t5_length is not None,
        returned_embeddings_type=ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
        split_long_text_mode=SplitLongTextMode.PHRASES,
        model_max_length=t5_length,
        device=encoder.device,
    )


def _t5(pipe: Any, max_sequence_length: int | None) -> Compel:
    """compel over FLUX.1's T5 encoder."""
    return _compel(pipe.tokenizer_2, pipe.text_encoder_2, None, True, max_sequence_length)


def _conditioning(compel: Compel, conjunction: Conjunction) -> torch.Tensor:
    with torch.inference_mode():
        return compel.build_conditioning_tensor_for_conjunction(conjunction)[0]


def _pooled(tokenizer: Any, encoder: Any, conjunction: Conjunction) -> torch.Tensor:
    """CLIP's pooled embedding of the prompt's words (cut at 77 tokens, as the pipelines do); a blend's is the
    blend of its members'."""
    parts = conjunction.prompts
    if len(parts) == 1 and isinstance(parts[0], Blend):
        total = sum(parts[0].weights)
        return sum(
            weight / total * _pooled_text(tokenizer, encoder, plain_text(member))
            for member, weight in zip(parts[0].prompts, parts[0].weights, strict=True)
        )
    return _pooled_text(tokenizer, encoder, " ".join(plain_text(member) for member in flattened(conjunction)))


def _pooled_text(tokenizer: Any, encoder: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    with torch.inference_mode():
        out = encoder(torch.tensor([ids], device=encoder.device), output_hidden_states=False)
    return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output


def _with_tokens(pipe: Any, tokenizer: Any, conjunction: Conjunction) -> Conjunction:
    """`conjunction` as `tokenizer` reads it: each textual-inversion token spelled as the tokens its vectors were
    loaded under, and fragments it reads no token in (white space between brackets) left out."""
    convert = getattr(pipe, "maybe_convert_prompt", None)

    def each(prompt: FlattenedPrompt) -> FlattenedPrompt:
        fragments = [Fragment(convert(f.text, tokenizer) if convert else f.text, f.weight) for f in prompt.children]
        kept = [f for f in fragments if tokenizer(f.text, add_special_tokens=False, verbose=False).input_ids]
        return FlattenedPrompt(kept or [Fragment("")])

    return Conjunction(
        [
            Blend([each(member) for member in part.prompts], part.weights, part.normalize_weights)
            if isinstance(part, Blend)
            else each(part)
            for part in conjunction.prompts
        ],
        conjunction.weights,
    )


def _main_tokenizer(pipe: Any, family: str, max_sequence_length: int | None) -> tuple[Any, int]:
    """The (planning copy of the) tokenizer of the encoder that reads the most of a prompt, and how many tokens
    it reads (start and end markers aside)."""
    copies = planning_tokenizers(pipe)
    if family == "flux":
        return copies["tokenizer_2"], max_sequence_length - 1
    if family == "sd3" and getattr(pipe, "text_encoder_3", None) is not None:
        return copies["tokenizer_3"], max_sequence_length - 1
    tokenizer = copies.get("tokenizer") or copies["tokenizer_2"]
    if family in CHUNKED or family == "sd3":
        return tokenizer, tokenizer.model_max_length - 2
    return tokenizer, max_sequence_length - 1  # a T5's or a language model's: what the pipeline reads


def _count(pipe: Any, tokenizer: Any, conjunction: Conjunction) -> int:
    """Tokens of `conjunction`'s words: its parts' added up, a blend's longest member's."""
    total = 0
    for part in _with_tokens(pipe, tokenizer, conjunction).prompts:
        members = part.prompts if isinstance(part, Blend) else [part]
        total += max(
            sum(len(tokenizer(f.text, add_special_tokens=False, verbose=False).input_ids) for f in member.children)
            for member in members
        )
    return total


def _length(pipe: Any, family: str, conjunction: Conjunction, max_sequence_length: int | None) -> int:
    """The token length compel's embeddings of `conjunction` will have (chunks of 77 for CLIP)."""
    copies = planning_tokenizers(pipe)  # counted outside the model's turn: not the pipeline's own tokenizers
    if family == "flux":
        tokenizer = copies["tokenizer_2"]
        compel = _compel(tokenizer, pipe.text_encoder_2, None, True, max_sequence_length)
    else:
        tokenizer = copies.get("tokenizer") or copies["tokenizer_2"]
        compel = _compel(tokenizer, pipe.text_encoder or pipe.text_encoder_2, 0, True, None)
    provider = compel.conditioning_provider
    total = 0
    for part in _with_tokens(pipe, tokenizer, conjunction).prompts:
        members = part.prompts if isinstance(part, Blend) else [part]
        total += max(
            provider.get_token_ids_and_expand_weights(
                [f.text for f in member.children], [f.weight for f in member.children], device="cpu"
            )[0].shape[0]
            for member in members
        )
    return total
