"""Triton kernels for tinymeg's ops (CUDA only).

This module imports everywhere; the kernels exist only where triton imports and CUDA is
present (``AVAILABLE``). None of them is a default implementation (they were written on a
machine without a GPU, and checked there only in triton's interpreter): the autotuner runs one
only after checking its output against the aten-based default and timing it faster, or when
``TINYMEG_OP_IMPL`` forces it. Every launcher takes and returns the same tensors as the op's
other implementations (contiguous inputs, new outputs). Math is float32 inside the kernels.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = torch.cuda.is_available()
except ImportError:  # CPU-only installs: no triton
    AVAILABLE = False

# Widest row a one-block-per-row kernel handles (layer_norm): 16384 float32 in registers.
MAX_ROW = 16384


def supports(x: torch.Tensor) -> bool:
    return AVAILABLE and x.is_cuda


if AVAILABLE:
    # ---- layer_norm ----

    @triton.jit
    def _ln_fwd_kernel(X, W, B, Y, Mean, Rstd, n_cols, eps,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)

    @triton.jit
    def _ln_bwd_kernel(DY, X, W, Mean, Rstd, DX, DWp, DBp, n_rows, n_cols, rows_per_program,
                       HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        # Each program handles a run of rows: dx row by row, and its partial sums of
        # grad_weight / grad_bias in registers, written once (summed by the caller).
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            w = tl.where(mask, 1.0, 0.0)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, rows_per_program):
            row = pid * rows_per_program + i
            if row < n_rows:
                offs = row.to(tl.int64) * n_cols + cols
                x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
                mean = tl.load(Mean + row)
                rstd = tl.load(Rstd + row)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                g = dy * w
                c_xhat = tl.sum(g * xhat, axis=0) / n_cols
                c_mean = tl.sum(g, axis=0) / n_cols
                dx = (g - c_mean - xhat * c_xhat) * rstd
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
                dw += dy * xhat
                db += dy
        tl.store(DWp + pid * n_cols + cols, dw, mask=mask)
        tl.store(DBp + pid * n_cols + cols, db, mask=mask)

    def _row_block(n_cols: int) -> tuple[int, int]:
        if n_cols > MAX_ROW:
            raise NotImplementedError(f"triton layer_norm handles rows up to {MAX_ROW}, got {n_cols}")
        block = triton.next_power_of_2(n_cols)
        return block, min(max(block // 256, 1), 16)

    def layer_norm_forward(x, weight, bias, eps):
        C = x.shape[-1]
        x2 = x.view(-1, C)
        M = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        if M:
            block, warps = _row_block(C)
            _ln_fwd_kernel[(M,)](x2, x2 if weight is None else weight, x2 if bias is None else bias,
                                 y, mean, rstd, C, eps, HAS_W=weight is not None,
                                 HAS_B=bias is not None, BLOCK=block, num_warps=warps)
        return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])

    def layer_norm_backward(dy, x, weight, mean, rstd):
        C = x.shape[-1]
        x2 = x.view(-1, C)
        M = x2.shape[0]
        dx = torch.empty_like(x2)
        block, warps = _row_block(C)
        programs = max(1, min(M, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count))
        rows_per_program = triton.cdiv(M, programs) if M else 0
        dw_partial = torch.zeros((programs, C), dtype=torch.float32, device=x.device)
        db_partial = torch.zeros((programs, C), dtype=torch.float32, device=x.device)
        if M:
            _ln_bwd_kernel[(programs,)](dy.view(-1, C), x2, x2 if weight is None else weight, mean, rstd,
                                        dx, dw_partial, db_partial, M, C, rows_per_program,
                                        HAS_W=weight is not None, BLOCK=block, num_warps=warps)
        pdt = x.dtype if weight is None else weight.dtype
        return dx.view(x.shape), dw_partial.sum(0).to(pdt), db_partial.sum(0).to(pdt)

    # ---- bias_gelu ----

    @triton.jit
    def _tanh(u):
        # through sigmoid: saturates correctly for large |u| (no inf / inf)
        return 2.0 * tl.sigmoid(2.0 * u) - 1.0

    # 0.7978845608028654 = sqrt(2 / pi), written out: triton kernels may not read Python globals.

    @triton.jit
    def _bias_gelu_fwd_kernel(X, B, Y, n, n_cols, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
             + tl.load(B + offs % n_cols, mask=mask, other=0.0).to(tl.float32))
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        tl.store(Y + offs, (0.5 * h * (1.0 + t)).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_gelu_bwd_kernel(DY, X, B, DX, n, n_cols, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
             + tl.load(B + offs % n_cols, mask=mask, other=0.0).to(tl.float32))
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        dgelu = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, (dy * dgelu).to(DX.dtype.element_ty), mask=mask)

    _EW_BLOCK = 1024

    def bias_gelu_forward(x, bias):
        y = torch.empty_like(x)
        n = x.numel()
        if n:
            _bias_gelu_fwd_kernel[(triton.cdiv(n, _EW_BLOCK),)](x, bias, y, n, x.shape[-1], BLOCK=_EW_BLOCK)
        return y

    def bias_gelu_backward(dy, x, bias):
        dx = torch.empty_like(x)
        n = x.numel()
        if n:
            _bias_gelu_bwd_kernel[(triton.cdiv(n, _EW_BLOCK),)](dy, x, bias, dx, n, x.shape[-1], BLOCK=_EW_BLOCK)
        db = dx.view(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
        return dx, db

    # ---- linear_cross_entropy: cuBLAS for the matmuls, triton for softmax / loss / d logits ----

    @triton.jit
    def _ce_kernel(Logits, stride, Targets, Loss, Scale, n_vocab, n_cols, ignore_index,
                   COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        # One row of a logits chunk (n_cols: the padded vocabulary, of which the first n_vocab
        # are classes): online max / sum-exp over the classes, the loss, and (COMPUTE_GRAD)
        # d loss / d logits = (softmax - onehot) * scale, written in place, 0 in padded columns.
        row = tl.program_id(0).to(tl.int64)
        base = Logits + row * stride
        target = tl.load(Targets + row).to(tl.int64)
        valid = target != ignore_index
        target = tl.where(valid, target, 0)
        m = float("-inf")
        s = 0.0
        for start in range(0, n_vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target_logit = tl.load(base + target).to(tl.float32)
        tl.store(Loss + row, tl.where(valid, lse - target_logit, 0.0))
        if COMPUTE_GRAD:
            scale = tl.where(valid, tl.load(Scale), 0.0)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
                p = tl.where(cols < n_vocab, p, 0.0)
                tl.store(base + cols, (p * scale).to(Logits.dtype.element_ty), mask=mask)

    # Logits chunk: at most 2^27 elements (256 MiB in bf16), so a GPT-2 batch of 8 x 1024 tokens
    # takes 4 chunks of big matmuls instead of one 1.6 GiB float32 logits tensor.
    _CE_CHUNK_ELEMENTS = 1 << 27

    def linear_cross_entropy_forward(hidden, weight, targets, vocab_size, ignore_index, reduction, compute_grad):
        from .cross_entropy import chunk_rows  # (cross_entropy imports this module)
        N, C = hidden.shape
        V, w = weight.shape[0], weight  # the whole padded weight: its padded logits are masked
        valid = targets != ignore_index
        scale = (1.0 / valid.sum().clamp(min=1).float()) if reduction == "mean" else \
            torch.ones((), dtype=torch.float32, device=hidden.device)
        losses = torch.empty(N, dtype=torch.float32, device=hidden.device)
        if compute_grad:
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        rows = chunk_rows(N, V, _CE_CHUNK_ELEMENTS)
        block = min(8192, triton.next_power_of_2(V))
        for s in range(0, N, rows):
            h = hidden[s:s + rows]
            logits = h @ w.T  # (n, V) in the inputs' dtype; cuBLAS accumulates in float32
            _ce_kernel[(h.shape[0],)](logits, logits.stride(0), targets[s:s + rows], losses[s:s + rows], scale,
                                      vocab_size, V, ignore_index, COMPUTE_GRAD=compute_grad, BLOCK=block,
                                      num_warps=8)
            if compute_grad:  # logits now holds d loss / d logits
                torch.mm(logits, w, out=grad_hidden[s:s + rows])
                if logits.dtype == torch.float32:
                    grad_weight.addmm_(logits.T, h)
                else:  # accumulate the chunks in float32: one bf16 rounding per chunk, not a running one
                    grad_weight += logits.T @ h
        loss = losses.sum() * scale
        if not compute_grad:
            return loss, hidden.new_empty(0), weight.new_empty(0)
        return loss, grad_hidden, grad_weight.to(weight.dtype)

    # ---- rms_norm ----

    @triton.jit
    def _rms_fwd_kernel(X, W, Y, Rstd, n_cols, eps, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        y = x * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(Rstd + row, rstd)

    @triton.jit
    def _rms_bwd_kernel(DY, X, W, Rstd, DX, DWp, n_rows, n_cols, rows_per_program,
                        HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        # As _ln_bwd_kernel: a run of rows per program, its partial grad_weight written once.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            w = tl.where(mask, 1.0, 0.0)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, rows_per_program):
            row = pid * rows_per_program + i
            if row < n_rows:
                offs = row.to(tl.int64) * n_cols + cols
                x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(Rstd + row)
                xhat = x * rstd
                g = dy * w
                dot = tl.sum(g * xhat, axis=0) / n_cols
                tl.store(DX + offs, ((g - xhat * dot) * rstd).to(DX.dtype.element_ty), mask=mask)
                dw += dy * xhat
        tl.store(DWp + pid * n_cols + cols, dw, mask=mask)

    def rms_norm_forward(x, weight, eps):
        C = x.shape[-1]
        x2 = x.view(-1, C)
        M = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        if M:
            block, warps = _row_block(C)
            _rms_fwd_kernel[(M,)](x2, x2 if weight is None else weight, y, rstd, C, eps,
                                  HAS_W=weight is not None, BLOCK=block, num_warps=warps)
        return y.view(x.shape), rstd.view(x.shape[:-1])

    def rms_norm_backward(dy, x, weight, rstd):
        C = x.shape[-1]
        x2 = x.view(-1, C)
        M = x2.shape[0]
        dx = torch.empty_like(x2)
        block, warps = _row_block(C)
        programs = max(1, min(M, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count))
        rows_per_program = triton.cdiv(M, programs) if M else 0
        dw_partial = torch.zeros((programs, C), dtype=torch.float32, device=x.device)
        if M:
            _rms_bwd_kernel[(programs,)](dy.view(-1, C), x2, x2 if weight is None else weight, rstd, dx,
                                         dw_partial, M, C, rows_per_program, HAS_W=weight is not None,
                                         BLOCK=block, num_warps=warps)
        return dx.view(x.shape), dw_partial.sum(0).to(x.dtype if weight is None else weight.dtype)

    # ---- swiglu ----

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)

    def swiglu_forward(gate, up):
        y = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, _EW_BLOCK),)](gate, up, y, n, BLOCK=_EW_BLOCK)
        return y

    def swiglu_backward(dy, gate, up):
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, _EW_BLOCK),)](dy, gate, up, dg, du, n, BLOCK=_EW_BLOCK)
        return dg, du
