"""Packing prompts that share a prefix into one row, the prefix computed once.

A log-likelihood benchmark scores each question once per answer choice: MMLU sends the
same context four times with " A", " B", " C" and " D" after it, and few-shot prompts of
one subject begin with the same examples. Scored one row each, the shared context goes
through the model once per request. Packed, it goes through once per pack: the row holds
the prefix, then each member's own tokens, and attention lets a member's tokens see the
prefix and themselves but never another member's (``ModelRunner.prefill_packed``). Every
token keeps its position in its own prompt, so a member gets the logits it would get
alone, up to floating-point reassociation.

Packing is a pure function of the prompts, so every tensor-parallel rank builds the same
packs without talking to the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PREFIX_SEGMENT = 0  # segment of the shared tokens (and of padding); member k's own tokens are segment k + 1


@dataclass(frozen=True)
class Pack:
    """One row of shared prefix then each member's own tokens."""

    tokens: list[int]
    positions: list[int]  # of each token in its own prompt
    segments: list[int]  # PREFIX_SEGMENT, or k + 1 for member k's own tokens
    members: list[int]  # index of each member in the prompts given to ``pack_prompts``
    member_slots: list[list[int]]  # slot in ``tokens`` of each token of member k's prompt

    def __len__(self) -> int:
        return len(self.tokens)


def pack_prompts(prompts: Sequence[Sequence[int]], *, share: bool = True) -> list[Pack]:
    """Packs covering every prompt once; with ``share=False`` one pack per prompt.

    Prompts are visited in lexicographic order, where those with a common prefix are
    neighbours, and a prompt joins the pack before it while the pack's common prefix is at
    least half of its longest member and the pack is at most twice that long: a pack that
    shares little would only add masked attention, and a very long one costs attention
    quadratic in its length.
    """
    order = sorted(range(len(prompts)), key=lambda i: tuple(prompts[i]))
    groups: list[tuple[list[int], int]] = []  # members, and the length of their common prefix
    for index in order:
        prompt = prompts[index]
        if share and groups:
            members, prefix_length = groups[-1]
            shared = _common_prefix_length(prompts[members[0]], prompt, prefix_length)
            if _worth_packing([len(prompts[i]) for i in members] + [len(prompt)], shared):
                groups[-1] = (members + [index], shared)
                continue
        groups.append(([index], len(prompt)))
    return [_pack([list(prompts[i]) for i in members], members, shared) for members, shared in groups]


def _worth_packing(lengths: list[int], shared: int) -> bool:
    longest = max(lengths)
    packed_length = shared + sum(length - shared for length in lengths)
    return 2 * shared >= longest and packed_length <= 2 * longest


def _common_prefix_length(left: Sequence[int], right: Sequence[int], at_most: int) -> int:
    # Within a pack the prefix only shrinks, so it never needs comparing beyond ``at_most``.
    limit = min(len(left), len(right), at_most)
    for i in range(limit):
        if left[i] != right[i]:
            return i
    return limit


def _pack(prompts: list[list[int]], members: list[int], shared: int) -> Pack:
    tokens, positions = prompts[0][:shared], list(range(shared))
    segments, member_slots = [PREFIX_SEGMENT] * shared, []
    for k, prompt in enumerate(prompts):
        own = prompt[shared:]
        member_slots.append(list(range(shared)) + list(range(len(tokens), len(tokens) + len(own))))
        tokens += own
        positions += range(shared, len(prompt))
        segments += [k + 1] * len(own)
    return Pack(tokens, positions, segments, members, member_slots)
