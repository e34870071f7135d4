"""The CPU fast path of model.py: the same equations, computed the way that runs fastest on a CPU.

model.py is the paper, computed plainly; that is what runs on CUDA and MPS. When the model's parameters are
on the CPU it calls this module at two places instead:

    e = energies(projected, hidden, score_weight)   # SoftAttention: the attention energies, (M, W, P)
    steps = TeacherForcing(model, memory)           # forward(): steps.rows(n), the memory of the n rows still
                                                    # writing, and steps.linears, the per-step linears

`enabled(tensor)` makes the choice: the fast path for tensors on the CPU, unless FORCE says otherwise. Each
trick below computes what the plain path computes, values and gradients (tests/test_fastpath.py); what each
one gained is in docs/performance.md:
- energies through a sigmoid: w^T tanh(x) = 2 w^T sigmoid(2x) - sum(w), and the constant -sum(w) is the same at
  every location, so softmax gives the same alpha. PyTorch's CPU sigmoid is about 5x faster than its tanh (AVX2);
- without autograd (decoding), the energies a few images at a time in one reused, cache-sized block;
- the weight gradients of the linears applied at every step (W_h h of attention, the cell's W_z z and W_h h)
  computed once over all the steps' rows, not one small matmul and one weight-sized add per step;
- the gradients of each step's rows [:n] of the memory summed into one buffer, not a zero-filled
  memory-sized gradient per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import Memory, ShowAttendTell

# None: the fast path for tensors on the CPU, the plain one elsewhere; True / False: always / never (tests,
# benchmarks). A process-wide switch, not part of a model's config or checkpoint: both paths give the same results.
FORCE: bool | None = None


def enabled(x: torch.Tensor) -> bool:
    """Whether the model, whose parameter `x` is, takes the fast path: on the CPU in float32, not under autocast
    (mixed precision takes the plain path, whose ops autocast knows)."""
    if FORCE is not None:
        return FORCE
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


# ------------------------------------------------------------------------------------- attention energies


def energies(projected: torch.Tensor, hidden: torch.Tensor, score_weight: torch.Tensor,
             block_floats: int = 2**18) -> torch.Tensor:
    """e' = 2 w^T sigmoid(2 (W_a a + b + W_h h)) = e + sum(w): the paper's energies up to a constant per row.

    projected: (M, P, A) W_a a + b; hidden: (M, W, 1, A) W_h h, W rows per image; score_weight: (1, A) w^T.
    Returns (M, W, P). With autograd the (M, W, P, A) sum is made whole and kept for the backward; without,
    it is made a block of images at a time (block_floats floats), see _energies_in_blocks.
    """
    if torch.is_grad_enabled() and (projected.requires_grad or hidden.requires_grad or score_weight.requires_grad):
        return _SigmoidEnergies.apply(projected, hidden, score_weight)
    return _energies_in_blocks(projected, hidden, score_weight, block_floats)


class _SigmoidEnergies(torch.autograd.Function):
    """e' with autograd: the sum 2 (W_a a + b + W_h h) made once, its sigmoid taken in place and kept for the
    backward (no second (M, W, P, A) tensor), whose gradient flows to both terms as from one sum."""

    @staticmethod
    def forward(ctx, projected: torch.Tensor, hidden: torch.Tensor, score_weight: torch.Tensor) -> torch.Tensor:
        y = torch.add(2 * hidden, projected.unsqueeze(1), alpha=2).sigmoid_()  # (M, W, P, A) sigmoid(2 x)
        ctx.save_for_backward(y, score_weight)
        return (y @ (2 * score_weight.T)).squeeze(3)  # (M, W, P)

    @staticmethod
    def backward(ctx, grad_e: torch.Tensor):
        y, score_weight = ctx.saved_tensors
        M, W, P, A = y.shape
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = 2 * (grad_e.reshape(1, -1) @ y.view(-1, A))  # (1, A)
        # d e' / d x = 4 w sigmoid'(2 x): the outer product (a matmul, as autograd's would be), then sigmoid'
        grad_x = grad_e.unsqueeze(3) @ (4 * score_weight)  # (M, W, P, A)
        grad_x = torch.ops.aten.sigmoid_backward.grad_input(grad_x, y, grad_input=grad_x)  # in place
        grad_projected = grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_projected = grad_x.sum(1) if W > 1 else grad_x.squeeze(1)  # (M, P, A)
        if ctx.needs_input_grad[1]:
            grad_hidden = grad_x.sum(2, keepdim=True)  # (M, W, 1, A)
        return grad_projected, grad_hidden, grad_weight


def _energies_in_blocks(projected: torch.Tensor, hidden: torch.Tensor, score_weight: torch.Tensor,
                        block_floats: int = 2**18) -> torch.Tensor:
    """e' without autograd, a few images at a time: (M, P, A), (M, W, 1, A), (1, A) -> (M, W, P).

    In decoding the (M, W, P, A) sum need not exist whole: a beam search over 250 images x 3 beams would write
    and read 75 MB per step for it. One block of about 1 MB is reused and stays in cache, so the sum, the
    sigmoid and the product with w each cost one cache-resident pass (docs/performance.md).
    """
    M, P, A = projected.shape
    W = hidden.size(1)
    hidden2, w = 2 * hidden, 2 * score_weight.T  # (M, W, 1, A), (A, 1)
    images = max(1, block_floats // (W * P * A))
    e = projected.new_empty(M, W, P, 1)
    block = projected.new_empty(min(images, M), W, P, A)
    for start in range(0, M, images):
        m = min(images, M - start)
        rows = slice(start, start + m)
        x = torch.add(hidden2[rows], projected[rows].unsqueeze(1), alpha=2, out=block[:m])  # (m, W, P, A) 2 x
        torch.matmul(x.sigmoid_(), w, out=e[rows])  # (m, W, P, 1)
    return e.squeeze(3)


# ------------------------------------------------------------------------------------------ teacher forcing


class TeacherForcing:
    """What forward() reads at each step on the CPU: rows(n), the memory rows [:n] of the captions still writing
    (their gradients summed in one buffer, _StepPrefixes), and linears, the step linears (W_h of attention, the
    cell's W_z and W_h) whose weight gradients wait for all the steps (_StepLinear), or None without autograd."""

    def __init__(self, model: "ShowAttendTell", memory: "Memory"):
        self._prefixes = _StepPrefixes(memory)
        self.linears: tuple[Callable[[torch.Tensor], torch.Tensor], ...] | None = None
        if torch.is_grad_enabled():
            self.linears = tuple(_batched_weight_grad(m) for m in (model.attention.hidden_proj, model.gates_z, model.gates_h))

    def rows(self, n: int) -> "Memory":
        return self._prefixes.rows(n)


def _batched_weight_grad(layer: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """layer as a function of x whose weight (and bias) gradients are one matmul over all the calls' rows.

    Autograd would compute each step's weight gradient as a small (out, n_t) x (n_t, in) matmul and add it to
    the weight's gradient, a weight-sized pass per step (16 MB for W_z at the paper's sizes). Here each call's
    backward only computes its input's gradient and keeps (grad_out, input); a pass-through node in front of
    all the calls (autograd runs it after the last of them) computes the weight's and bias' gradients once.
    """
    if not layer.weight.requires_grad:
        return layer
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (grad_out, input) of each call, filled in backward
    weight, bias = _BatchedWeightGrad.apply(layer.weight, layer.bias, kept)
    return lambda x: _StepLinear.apply(x, weight, bias, kept)


class _BatchedWeightGrad(torch.autograd.Function):
    """Identity on (weight, bias) in forward; in backward, their gradients from the kept (grad_out, input) pairs."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bias: torch.Tensor | None, kept: list):
        ctx.kept, ctx.has_bias = kept, bias is not None
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), (bias.view_as(bias) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor | None, grad_bias: torch.Tensor | None):
        if ctx.kept:
            grad_out = torch.cat([g for g, _ in ctx.kept])  # (S, out)
            dw = grad_out.T @ torch.cat([x for _, x in ctx.kept])  # (out, in)
            grad_weight = dw if grad_weight is None else grad_weight + dw
            if ctx.has_bias:
                db = grad_out.sum(0)  # (out,)
                grad_bias = db if grad_bias is None else grad_bias + db
            ctx.kept.clear()
        return grad_weight, grad_bias if ctx.has_bias else None, None


class _StepLinear(torch.autograd.Function):
    """x W^T + b whose backward gives x its gradient and keeps (grad_out, x) for _BatchedWeightGrad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kept: list) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.kept = kept
        ctx.set_materialize_grads(False)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return None, None, None, None
        x, weight = ctx.saved_tensors
        ctx.kept.append((grad, x))
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None, None


class _StepPrefixes:
    """The rows [:n] of each memory tensor for one step of teacher forcing.

    Autograd gives the backward of every step's x[:n] a gradient the size of all of x, zero-filled past row n,
    and then adds it to the sum of the others: at imcap's default sizes that filled and added 12.8 MB per
    step for W_a a alone. Here each step's slice adds its gradient into rows [:n] of one buffer per tensor,
    and a pass-through node in front of all the slices hands that buffer on as x's gradient once, after the
    last of them (autograd runs it last: every slice depends on it).
    """

    def __init__(self, memory: "Memory"):
        # the gradient sums, made on first use; a plain list, so the autograd nodes that share it hold no cycle
        self.buffers: list[torch.Tensor | None] = [None] * len(memory)
        self.memory = type(memory)(*(_GradientSum.apply(m, self.buffers, i) if m.requires_grad else m
                                     for i, m in enumerate(memory)))

    def rows(self, n: int) -> "Memory":
        return type(self.memory)(*(_PrefixRows.apply(m, n, self.buffers, i) if m.requires_grad else m[:n]
                                   for i, m in enumerate(self.memory)))


class _GradientSum(torch.autograd.Function):
    """Identity in forward; in backward, x's gradient is the buffer its _PrefixRows slices added into."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, buffers: list, i: int) -> torch.Tensor:
        ctx.buffers, ctx.i = buffers, i
        ctx.set_materialize_grads(False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        total = ctx.buffers[ctx.i]
        ctx.buffers[ctx.i] = None  # handed on once
        if grad is not None:  # x also used whole, outside the steps
            total = grad if total is None else total + grad
        return total, None, None


class _PrefixRows(torch.autograd.Function):
    """x[:n] whose backward adds into buffers[i] and gives x no gradient of its own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, buffers: list, i: int) -> torch.Tensor:
        ctx.n, ctx.buffers, ctx.i, ctx.shape = n, buffers, i, x.shape
        ctx.set_materialize_grads(False)
        return x[:n]

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is not None:
            buffers = ctx.buffers
            if buffers[ctx.i] is None:
                buffers[ctx.i] = grad.new_zeros(ctx.shape)
            buffers[ctx.i][: ctx.n] += grad
        return None, None, None, None
