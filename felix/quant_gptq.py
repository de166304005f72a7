"""GPTQ rounding onto a codebook format's grid: error feedback weighted by the layer's input covariance.

Plain rounding takes each weight to its nearest grid value. GPTQ (Frantar et al., 2022) rounds the
columns of W (rows: outputs, columns: inputs) one at a time and moves the not-yet-rounded columns to
cancel each rounding error's effect on the output, as judged by H = E[x xᵀ] of the inputs x:

    err = (w_i - q_i) / U_ii,   W[:, i+1:] -= err U_i,i+1:     (U: upper Cholesky factor of H⁻¹)

which greedily minimizes tr(ΔW H ΔWᵀ) = E|ΔW x|², the mean squared output error over the inputs H was
measured on. With a diagonal H there is nothing to feed back and the result is plain rounding.

The result lies on the format's grid *and is what the format itself encodes it to*: `fake_quant` of it
returns it bit for bit, so a later re-quantization (a server's push, `felix quantize`, an export) keeps
exactly these values. That needs each block's scale to be what the format would derive from the
rounded block, absmax / max|codebook|. So a block's scale is fixed from its current values when its
first column comes up, and the weight that set it (the block's absmax) is rounded to the extreme code
whatever feedback it received since; every other weight is clamped inside the grid by nearest-code
rounding. Blocks follow the format's row-major flat layout, so a block may span several short rows
(SpliceCore b at rank 8: 4 rows of 8).
"""

from __future__ import annotations

import torch

from felix.quant_formats import CodebookFormat, QuantError, QuantFormat


def gptq_hessian_inverse_factor(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, in float64."""
    h = h.double()
    n = h.shape[0]
    diag_mean = float(h.diagonal().mean())
    h = h + max(damp * diag_mean, 1e-12) * torch.eye(n, dtype=torch.float64, device=h.device)
    l_factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise QuantError(f"GPTQ: the input covariance ({n}x{n}) is not positive definite even after damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(l_factor), upper=True)


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, fmt: QuantFormat, damp: float = 0.01) -> torch.Tensor:
    """`weight` (rows x cols) on `fmt`'s grid, rounded column by column with GPTQ error feedback.

    `hessian` is the (cols x cols) second moment of the inputs the weight multiplies; `damp` adds that
    fraction of its mean diagonal. Computed on the CPU in float64 (a column at a time: meant for small
    tensors such as SpliceCore's); returns a float32 CPU tensor with `fake_quant(result) == result` exactly.
    """
    if not isinstance(fmt, CodebookFormat):
        raise QuantError(f"GPTQ rounding supports the codebook formats (rq4, rq3, nf4), not {fmt.name}")
    if weight.dim() != 2:
        raise QuantError(f"GPTQ rounding needs a 2-D weight, got shape {list(weight.shape)}")
    rows, cols = weight.shape
    fmt.check_numel(weight.numel(), f"tensor of shape {list(weight.shape)}")
    if tuple(hessian.shape) != (cols, cols):
        raise QuantError(f"GPTQ: input covariance of shape {list(hessian.shape)} for a weight with {cols} columns")
    if not (torch.isfinite(weight).all() and torch.isfinite(hessian).all()):
        raise QuantError("GPTQ: weight or input covariance contains NaN or inf")
    # as `quantize` refuses it: a block whose absmax / max|codebook| the scale type cannot hold
    peak = float(weight.detach().abs().max())
    if not torch.isfinite(fmt.block_scale(weight.detach().reshape(-1, fmt.block).float().cpu())).all():
        raise QuantError(f"GPTQ ({fmt.name}): a block scale overflows the scale type (|weight| up to {peak:.4g})")
    u = gptq_hessian_inverse_factor(hessian.detach().cpu(), damp)
    w = weight.detach().double().cpu().clone()
    out = torch.empty(rows, cols, dtype=torch.float32)
    table = fmt.codebook
    n_blocks = rows * cols // fmt.block
    block_of = (torch.arange(rows * cols) // fmt.block).reshape(rows, cols)  # the format's flat blocks
    first_col = torch.full((n_blocks,), cols, dtype=torch.long)
    first_col.scatter_reduce_(0, block_of.flatten(), torch.arange(cols).repeat(rows), reduce="amin")
    scale = torch.zeros(n_blocks, dtype=torch.float32)
    pinned = torch.zeros(rows * cols, dtype=torch.bool)  # the weight that set its block's scale
    for i in range(cols):
        starting = (first_col == i).nonzero().flatten()
        if len(starting):
            fed = w.reshape(n_blocks, fmt.block)[starting]  # float64: it may exceed even float32
            blocks = fed.float()
            block_scale = fmt.block_scale(blocks)
            if not torch.isfinite(block_scale).all():  # else every weight of the block comes out inf or NaN
                raise QuantError(
                    f"GPTQ ({fmt.name}): error feedback pushed a block past what the scale type can hold "
                    f"(|weight| up to {float(fed.abs().max()):.4g}, {peak:.4g} in the input); plain rounding "
                    f"stays in range, and a larger damp than {damp} feeds back less")
            scale[starting] = block_scale.flatten()
            pinned[starting * fmt.block + blocks.abs().argmax(dim=1)] = True
        d = scale[block_of[:, i]]
        col = w[:, i].float()
        # a pinned weight takes the extreme code, so the block's absmax, and hence its scale, is re-derived
        target = torch.where(pinned.view(rows, cols)[:, i], col.sign() * fmt.max_abs * d, col)
        q = table[fmt.nearest_codes(target, d).long()] * d
        out[:, i] = q
        err = (w[:, i] - q.double()) / u[i, i]
        w[:, i + 1:] -= err.unsqueeze(1) * u[i, i + 1:].unsqueeze(0)
    return out
