"""Prompts as users write them: A1111/compel weighting, seed 002's sub-prompts, long prompts and clip_skip."""

from .encode import PromptPlan, encode, plan
from .syntax import SYNTAXES, Syntax, parse

__all__ = ["SYNTAXES", "PromptPlan", "Syntax", "encode", "parse", "plan"]
