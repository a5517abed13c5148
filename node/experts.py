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
        grads: List[torch.Tensor] = []
        grad_hidden = torch.empty_like(pre)
        for e, (start, end) in enumerate(ctx.ranges):
            down_w = params[PARAMS_PER_EXPERT * e + 2]
            g = grad_y[start:end]
            torch.mm(g, down_w, out=grad_hidden[start:end])
            grads.append(g.t() @ hidden[start:end])  # down.weight
            grads.append(g.sum(0))  # down.bias
        grad_pre = torch.ops.aten.gelu_backward(grad_hidden, pre)
        grad_x = torch.empty_like(x)
        up_grads: List[torch.Tensor] = []
        for e, (start, end) in enumerate(ctx.ranges):
            up_w = params[PARAMS_PER_EXPERT * e]
            g = grad_pre[start:end]
            torch.mm(g, up_w, out=grad_x[start:end])
            up_grads.append(g.t() @ x[start:end])  # up.weight
            up_grads.append(g.sum(0))  # up.bias
        ordered: List[torch.Tensor] = []
        for e in range(len(ctx.ranges)):
            ordered += [up_grads[2 * e], up_grads[2 * e + 1], grads[2 * e], grads[2 * e + 1]]
        return (grad_x, None, *ordered)
