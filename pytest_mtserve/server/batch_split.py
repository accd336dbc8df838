"""Splitting a batch into forward passes of similar prompt lengths.

Triton hands the engine whatever arrived together, and a batch runs padded to its longest
prompt: one five-shot MMLU prompt of 2,700 tokens among seven of 500 makes every row cost
2,700 slots, with attention growing with the square of that width. Rows sorted by length
are cut into consecutive groups wherever the padding saved outweighs the fixed cost of one
more pass (and of its decode steps). Each group then runs as a batch of its own; a row's
result does not depend on the group it lands in (see ``engine``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from pytest_mtserve.server.architecture import ModelArchitecture

# Fixed cost of one forward pass in tokens' worth of matrix work: on a GPU a pass of a small
# model is mostly kernel launches; on the CPU it is a few hundred small ops.
_PASS_COST_TOKENS = {"cuda": 2048.0, "cpu": 64.0}
# A key costs about this many times its FLOPs' share: the unfused [rows, heads, query, key]
# score tensor goes through memory several times. Fitted to CPU prefills of the demo model
# (1 x 2,724 tokens: 28.6 s, 4 x 1,300: 32.8 s, 8 rows up to 2,724: 270 s).
_ATTENTION_MEMORY_FACTOR = 5.0


@dataclass(frozen=True)
class ForwardCost:
    """Relative cost of forward passes, in units of one token through the model's matrices."""

    per_pass: float  # fixed cost of one pass, in tokens
    attention_width: float  # keys at which a token's attention costs as much as its matrices

    @classmethod
    def for_model(cls, arch: ModelArchitecture, device_type: str) -> ForwardCost:
        # Per token and layer: ~2(4h^2 + 3h*ffn) FLOPs of matrices, 4h per key of attention.
        matrices_over_attention = (4 * arch.hidden_size**2 + 3 * arch.hidden_size * arch.ffn_hidden_size) / (2 * arch.hidden_size)
        return cls(per_pass=_PASS_COST_TOKENS[device_type], attention_width=matrices_over_attention / _ATTENTION_MEMORY_FACTOR)

    def of_group(self, rows: int, width: int, decode_steps: int) -> float:
        prefill = rows * width * (1 + width / self.attention_width)
        decode = decode_steps * (self.per_pass + rows * (1 + (width + decode_steps) / self.attention_width))
        return self.per_pass + prefill + decode


def split_by_length(lengths: list[int], new_tokens: list[int], cost: ForwardCost) -> list[range]:
    """Consecutive groups of rows, already sorted by ``lengths`` ascending, of least total cost.

    ``new_tokens[i]``: tokens row i generates (each beyond the first costs a decode step).
    """
    if any(a > b for a, b in pairwise(lengths)):
        raise ValueError("rows must be sorted by prompt length")
    count = len(lengths)
    best = [0.0] + [float("inf")] * count  # best[j]: least cost of rows [0, j)
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        steps = 0
        for start in range(end - 1, -1, -1):  # group [start, end), widest row end - 1
            steps = max(steps, new_tokens[start] - 1)
            total = best[start] + cost.of_group(end - start, lengths[end - 1], steps)
            if total < best[end]:
                best[end], cut[end] = total, start
    groups: list[range] = []
    end = count
    while end > 0:
        groups.append(range(cut[end], end))
        end = cut[end]
    return groups[::-1]
