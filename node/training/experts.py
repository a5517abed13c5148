"""The feed-forward of one MoE layer's hosted experts, on tokens grouped by expert, in fixed-size buffers.

Routing sends a different number of tokens to each expert at every step. Running each expert
as an ordinary module makes every intermediate tensor a new size each step, and glibc's heap
then keeps growing with the number of experts a node hosts (freed blocks of one size rarely fit
the next step's). Here the rows routed to all experts (tokens x top_k, the same every step) are
sorted by expert once, and each expert's two matrix products write into its own row range of
buffers shared by all experts; backward does the same. Every allocation of a step is then the
same size as in the step before, whatever the routing, and the arithmetic is that of two
``nn.Linear`` with a GELU between them.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

PARAMS_PER_EXPERT = 4  # up.weight, up.bias, down.weight, down.bias


def row_ranges(counts: Sequence[int]) -> List[Tuple[int, int]]:
    """Each expert's [start, end) rows, in order, from how many rows each one got."""
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


class GroupedExperts(torch.autograd.Function):
    """``y[rows of e] = down_e(gelu(up_e(x[rows of e])))`` for every expert e; rows sorted by expert.

    Call as ``GroupedExperts.apply(x, counts, *params)``, with ``params`` the experts' parameters
    in PARAMS_PER_EXPERT order. An expert with no rows gets zero gradients, not None, so that
    every hosted expert is treated alike by the optimizer.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, counts: List[int], *params: torch.Tensor) -> torch.Tensor:
        ranges = row_ranges(counts)
        pre = x.new_empty(x.shape[0], params[0].shape[0])
        for e, (start, end) in enumerate(ranges):
            if end > start:
                up_w, up_b = params[PARAMS_PER_EXPERT * e], params[PARAMS_PER_EXPERT * e + 1]
                torch.addmm(up_b, x[start:end], up_w.t(), out=pre[start:end])
        hidden = F.gelu(pre)
        y = x.new_empty(x.shape)
        for e, (start, end) in enumerate(ranges):
            if end > start:
                down_w, down_b = params[PARAMS_PER_EXPERT * e + 2], params[PARAMS_PER_EXPERT * e + 3]
                torch.addmm(down_b, hidden[start:end], down_w.t(), out=y[start:end])
        ctx.ranges = ranges
        ctx.save_for_backward(x, pre, hidden, *params)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> Tuple[Any, ...]:
        x, pre, hidden, *params = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grads: List[Any] = [None] * len(params)  # in the order of params
        grad_hidden = torch.empty_like(pre)
        for e, (start, end) in enumerate(ctx.ranges):
            first, g = PARAMS_PER_EXPERT * e, grad_y[start:end]
            torch.mm(g, params[first + 2], out=grad_hidden[start:end])
            grads[first + 2], grads[first + 3] = g.t() @ hidden[start:end], g.sum(0)  # down.weight, down.bias
        grad_pre = torch.ops.aten.gelu_backward(grad_hidden, pre)
        grad_x = torch.empty_like(x)
        for e, (start, end) in enumerate(ctx.ranges):
            first, g = PARAMS_PER_EXPERT * e, grad_pre[start:end]
            torch.mm(g, params[first], out=grad_x[start:end])
            grads[first], grads[first + 1] = g.t() @ x[start:end], g.sum(0)  # up.weight, up.bias
        return (grad_x, None, *grads)
