"""Prompt syntaxes, parsed into compel's prompt objects (a Conjunction of Blends or FlattenedPrompts of weighted
Fragments), which `encode` turns into embeddings.

- `a1111`, the community's habit (A1111 and ComfyUI): `(word:1.3)`, `(word)` = x1.1, `((word))` = x1.21,
  `[word]` = /1.1, escapes `\\(` `\\)` `\\[` `\\]` `\\\\`; and seed 002's weighted sub-prompts,
  `tabby cat:0.25 white duck:0.75`, blended in proportion to their weights.
- `compel`: compel's own syntax (`word++`, `(word)1.3`, `("a", "b").blend(1, 2)`, `("a", "b").and()`).
- `plain`: the text as it is.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from compel.prompt_parser import (
    Blend,
    Conjunction,
    CrossAttentionControlledFragment,
    FlattenedPrompt,
    Fragment,
    PromptParser,
)

from ..errors import WorkerError

Syntax = Literal["a1111", "compel", "plain"]
SYNTAXES: tuple[Syntax, ...] = ("a1111", "compel", "plain")
MAX_WEIGHT = 10.0
"""The largest weight a word may have; far below it images are already noise."""
MAX_COMPEL_DEPTH = 4
"""How deep compel's brackets may nest: its parser's time grows about fourfold with each level."""

# One token of A1111's attention syntax: an escape, a bracket, `:weight)` closing a round bracket, a run of text,
# or a lone backslash or colon (text).
_ATTENTION = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|[\\:]")
_SUBPROMPT_WEIGHT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?=\s|$)")


def parse(text: str, syntax: Syntax, field: str = "prompt") -> Conjunction:
    """`text` in `syntax` as compel's prompt objects. A prompt that cannot be parsed, a weight outside
    0..MAX_WEIGHT, or a feature this worker does not run is a 422 naming `field`."""
    if syntax == "plain":
        return Conjunction([FlattenedPrompt([Fragment(text)])])
    if syntax == "compel":
        if _depth(text) > MAX_COMPEL_DEPTH:
            raise WorkerError(
                "INVALID_INPUTS", f"{field}: compel brackets nest deeper than {MAX_COMPEL_DEPTH} levels", field
            )
        try:
            conjunction = PromptParser().parse_conjunction(text)
        except Exception as err:
            raise WorkerError("INVALID_INPUTS", f"{field}: not valid compel syntax ({err})"[:300], field) from None
        if conjunction.lora_weights:
            raise WorkerError("INVALID_INPUTS", f"{field}: withLora() is not read here; use the loras field", field)
        _check(conjunction, field)
        for prompt in flattened(conjunction):  # compel drops the spaces between its fragments: put them back
            for fragment in prompt.children[:-1]:
                if not fragment.text.endswith(" "):
                    fragment.text += " "
        return conjunction
    parts = _subprompts(text)
    if len(parts) == 1:
        conjunction = Conjunction([FlattenedPrompt(_attention(parts[0][0]))])
    else:
        blend = Blend([FlattenedPrompt(_attention(part)) for part, _ in parts], [w for _, w in parts])
        conjunction = Conjunction([blend])
    _check(conjunction, field)
    return conjunction


def flattened(conjunction: Conjunction) -> list[FlattenedPrompt]:
    """Every FlattenedPrompt in `conjunction`, blends opened."""
    return [
        member
        for prompt in conjunction.prompts
        for member in (prompt.prompts if isinstance(prompt, Blend) else [prompt])
    ]


def plain_text(prompt: FlattenedPrompt) -> str:
    """The words of `prompt` without syntax or weights."""
    return "".join(fragment.text for fragment in prompt.children)


def is_plain(conjunction: Conjunction) -> bool:
    """Whether `conjunction` is one text with every weight 1: the pipeline's own encoding gives its embeddings."""
    return (
        len(conjunction.prompts) == 1
        and isinstance(conjunction.prompts[0], FlattenedPrompt)
        and all(fragment.weight == 1 for fragment in conjunction.prompts[0].children)
    )


def _depth(text: str) -> int:
    """How deep unescaped round brackets nest in `text`."""
    depth = deepest = 0
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth = max(depth - 1, 0)
    return deepest


def _check(conjunction: Conjunction, field: str) -> None:
    for prompt in conjunction.prompts:
        if isinstance(prompt, Blend):
            weights = [float(weight) for weight in prompt.weights]
            if not all(math.isfinite(w) and -MAX_WEIGHT <= w <= MAX_WEIGHT for w in weights) or sum(weights) <= 0:
                raise WorkerError(
                    "INVALID_INPUTS",
                    f"{field}: blend weights must each be within -{MAX_WEIGHT:g}..{MAX_WEIGHT:g} and add up to more "
                    f"than 0 (got {', '.join(f'{w:g}' for w in weights)})",
                    field,
                )
    for prompt in flattened(conjunction):
        for fragment in prompt.children:
            if isinstance(fragment, CrossAttentionControlledFragment):
                raise WorkerError("INVALID_INPUTS", f"{field}: .swap() (attention control) is not run here", field)
            if not 0 <= fragment.weight <= MAX_WEIGHT:
                raise WorkerError(
                    "INVALID_INPUTS",
                    f"{field}: the weight {fragment.weight:g} of {fragment.text.strip()[:40]!r} is outside "
                    f"0..{MAX_WEIGHT:g}",
                    field,
                )


def _subprompts(text: str) -> list[tuple[str, float]]:
    """Seed 002's `tabby cat:0.25 white duck:0.75 hybrid`: each `:number` outside brackets ends a sub-prompt of that
    weight; text after the last one weighs 1. Fewer than two sub-prompts: the whole text, as it is."""
    parts: list[tuple[str, float]] = []
    depth, start, index = 0, 0, 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char in "([":
            depth += 1
        elif char in ")]":
            depth = max(depth - 1, 0)
        elif (
            char == ":"
            and depth == 0
            and index > start
            and not text[index - 1].isdigit()  # 10:30, 16:9: a time or a ratio, not a weight
            and (number := _SUBPROMPT_WEIGHT.match(text, index + 1))
        ):
            if text[start:index].strip():
                parts.append((text[start:index], float(number.group())))
            index = start = number.end() + 1  # the space after the weight is the separator
            continue
        index += 1
    rest = text[start:]
    if rest.strip():
        parts.append((rest, 1.0))
    return parts if len(parts) > 1 else [(text, 1.0)]


def _attention(text: str) -> list[Fragment]:
    """A1111's emphasis: the text in runs of equal weight. An unclosed bracket weighs everything after it."""
    pieces: list[list] = []  # [text, weight]
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if len(token) == 2 and token[0] == "\\":
            pieces.append([token[1], 1.0])
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif token == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            pieces.append([token, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    runs: list[list] = []
    for piece_text, weight in pieces:
        weight = round(weight, 6)  # ((x)) and (x:1.21) are one weight
        if runs and runs[-1][1] == weight:
            runs[-1][0] += piece_text
        elif piece_text:
            runs.append([piece_text, weight])
    return [Fragment(piece_text, weight) for piece_text, weight in runs] or [Fragment("")]
