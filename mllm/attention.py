"""`packed_eager`: attention for training on packed rows without a varlen kernel (CPU).

A packed batch (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`) is one row of several
examples plus their boundaries `cu_seq_lens_q`. flash-attn's varlen kernel attends within each example
directly; it needs CUDA. Without it transformers builds a dense block-diagonal mask over the whole row and
attends over all of it, so the cost grows with the square of the row (16 shapes examples: 1500 tokens)
instead of the examples' (~90 each). And on CPU, SDPA's flash kernel is slow in backward for short
sequences and small heads: at (16, 8 heads, 96, 32) forward + backward in bf16 it takes ~13 ms where
matmul + softmax takes ~3.5 ms.

This function gathers a packed row into a padded batch of its examples, (n, H, T_max, D), runs eager
attention (matmul, float32 softmax, matmul) with a causal + key-padding mask, and scatters the result
back into the row. `branch_ids` (1, L), optional, make a packed example a tree: token i attends to an earlier
token j of its example only when branch_ids[j] is 0 (the shared prefix, e.g. an image) or equals
branch_ids[i], so several continuations of one prefix train in one example as if each were alone (their
position_ids restart after the prefix). Batches that are not packed (no `cu_seq_lens_q`, or a KV cache in use) take
transformers' own eager attention with the mask transformers built. It is registered under
`PACKED_EAGER` in transformers' `AttentionInterface` (and `eager_mask` for its masks), so any HF model
using the attention interface can select it with `model.set_attn_implementation(PACKED_EAGER)`.
"""

from __future__ import annotations

import torch

PACKED_EAGER = "packed_eager"


def packed_eager_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                           cu_seq_lens_q: torch.Tensor | None = None, branch_ids: torch.Tensor | None = None,
                           **kwargs):
    """query (B, Hq, L, D), key/value (B, Hkv, S, D) -> ((B, L, Hq, D), None), as transformers' eager."""
    from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv

    if cu_seq_lens_q is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                       dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    n, longest, gather_index, scatter_index, allowed = _layout(cu_seq_lens_q, query.shape[2], query.device, branch_ids)

    def gather(x: torch.Tensor) -> torch.Tensor:  # (1, H, L, D) -> (n, H, T, D)
        heads, dim = x.shape[1], x.shape[3]
        return x[0].index_select(1, gather_index).view(heads, n, longest, dim).transpose(0, 1)

    q, k, v = gather(query), gather(key), gather(value)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling  # (n, H, T, T)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, v).transpose(1, 2)  # (n, T, H, D)
    out = out.reshape(n * longest, *out.shape[2:]).index_select(0, scatter_index)  # (L, H, D), packed order
    return out.unsqueeze(0), None


_last_layout: tuple = (None, None, None, None)  # (cu_seq_lens, its version, branch_ids, layout): one per pass


def _layout(cu_seq_lens: torch.Tensor, total: int, device: torch.device, branch_ids: torch.Tensor | None = None):
    """(n, T_max, gather index (n*T_max,), scatter index (L,), allowed (n, 1, T, T)) of a packed row. Every
    layer of one forward pass gets the same `cu_seq_lens` tensor, so the layout is computed once per pass."""
    global _last_layout
    cached, version, cached_branches, layout = _last_layout
    if cached is cu_seq_lens and version == cu_seq_lens._version and cached_branches is branch_ids:
        return layout
    bounds = cu_seq_lens.to(device=device, dtype=torch.long)
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]  # (n,)
    n, longest = lengths.numel(), int(lengths.max())
    pos = torch.arange(longest, device=device)
    valid = pos[None, :] < lengths[:, None]  # (n, T): real tokens of each example
    gather_index = (starts[:, None] + pos[None, :]).clamp(max=total - 1).reshape(-1)  # row position of each slot
    scatter_index = valid.reshape(-1).nonzero().squeeze(1)  # slot of each row position (row-major = packed order)
    allowed = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]  # (n, T, T): causal, and only real keys
    if branch_ids is not None:
        branch = branch_ids.reshape(-1).to(device)[gather_index].view(n, longest)  # (n, T)
        allowed = allowed & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None]))
    layout = (n, longest, gather_index, scatter_index, allowed[:, None])
    _last_layout = (cu_seq_lens, cu_seq_lens._version, branch_ids, layout)
    return layout


def register() -> str:
    """Make `PACKED_EAGER` selectable in transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(PACKED_EAGER, packed_eager_attention)
    AttentionMaskInterface.register(PACKED_EAGER, eager_mask)
    return PACKED_EAGER


__all__ = ["PACKED_EAGER", "packed_eager_attention", "register"]
