"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local spec computes softmax(QK^T)V unfused: the [batch, heads, query, key]
score tensor goes through memory several times, which dominates long prompts. SDPA fuses
it (memory-efficient kernel with our explicit boolean mask; grouped-query attention
without copying the key/value heads). Same inputs and outputs as
``DotProductAttention``, whose constructor (per-partition head counts, softmax scale) it
reuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SdpaCoreAttention(DotProductAttention):
    def forward(
        self,
        query: torch.Tensor,  # [sq, b, heads, dim]
        key: torch.Tensor,  # [sk, b, groups, dim]
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,  # bool, True where a key is hidden
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SdpaCoreAttention takes neither attention_bias nor packed sequences; use the unfused backend")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        allowed = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1]
        )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
