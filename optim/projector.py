"""GaLore's gradient projector as plain functions on tensors.

A projected m x n matrix keeps an orthonormal basis of its gradient's dominant subspace: ``left``
(P, m x k, low-rank gradient P^T G of shape k x n), ``right`` (Q, k x n, low-rank gradient G Q^T of
shape m x k) or ``full`` (both, P^T G Q^T of shape k x k), with k = min(rank, m, n). The bases live
in the optimizer state as tensors; nothing here holds state.
"""

import functools

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("exact", "randomized")


def projection_side(proj_type: str, shape: torch.Size) -> str:
    """Which side of an m x n matrix a ``proj_type`` projects: 'left', 'right' or 'full'.

    ``std`` projects the larger side away (right when m >= n), ``reverse_std`` the smaller one; the
    choice depends only on the weight's shape, so it never changes during training.
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def effective_rank(rank: int, shape: torch.Size) -> int:
    """The basis size k: a rank at or above the smaller side keeps every direction."""
    return min(rank, shape[0], shape[1])


def low_rank_shape(side: str, shape: torch.Size, k: int) -> tuple[int, int]:
    """Shape of the projected gradient (and of the Adam moments)."""
    m, n = shape
    return {"left": (k, n), "right": (m, k), "full": (k, k)}[side]


def exact_basis(matrix: torch.Tensor, k: int, side: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(P, Q) from a full SVD of ``matrix``, as galore-torch computes them.

    The SVD runs in float32 (float64 stays float64); the same call on the same float32 gradient
    gives galore-torch's basis bit for bit, which reproducing it needs (the moments it keeps across
    refreshes depend on the singular vectors' signs).
    """
    a = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    left = u[:, :k] if side in ("left", "full") else None
    right = vh[:k] if side in ("right", "full") else None
    return left, right


def randomized_basis(matrix: torch.Tensor, k: int, side: str, oversample: int, power_iters: int,
                     generator: torch.Generator, sketch_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(P, Q) from a randomized range finder with Rayleigh-Ritz extraction (Halko et al. 2011).

    Subspace iteration on the Gram operator of the side being kept (A^T A for Q, A A^T for P), from
    a Gaussian start of k + oversample columns, with a QR on the kept (usually smaller) side after
    each of ``power_iters`` applications; the k leading Ritz vectors of the final subspace form the
    basis. Every large product is a matmul, so this costs O(m n (k + oversample) power_iters)
    against the O(m n min(m, n)) of a full SVD. The large products may run in a lower
    ``sketch_dtype`` (None: the matrix's): they only choose the subspace, while the QRs and the
    small eigenproblem run in float32 (or float64), so the basis is orthonormal to that precision
    whatever the sketch's.
    """
    a = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    m, n = a.shape
    width = min(k + oversample, m, n)
    # For 'full' iterate on the smaller side, then read both bases off an SVD of the thin product.
    iterate_right = side == "right" or (side == "full" and n <= m)
    op = a if iterate_right else a.T
    sketch_dtype = sketch_dtype or a.dtype
    sketch_op = op.to(sketch_dtype)
    x = torch.randn(op.shape[1], width, generator=generator, device=a.device, dtype=a.dtype)
    for _ in range(power_iters):
        x = torch.linalg.qr((sketch_op.T @ (sketch_op @ x.to(sketch_dtype))).to(a.dtype)).Q
    c = (sketch_op @ x.to(sketch_dtype)).to(a.dtype)
    if side == "full":
        u_c, _, wh = torch.linalg.svd(c, full_matrices=False)
        outer, inner = u_c[:, :k], x @ wh[:k].T
        return (outer, inner.T) if iterate_right else (inner, outer.T)
    _, w = torch.linalg.eigh(c.T @ c)
    ritz = x @ w[:, -k:].flip(-1)  # eigh sorts ascending; the basis is ordered by singular value
    return (None, ritz.T) if iterate_right else (ritz, None)


SKETCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sketch_dtype_for(option: str, grad: torch.Tensor) -> torch.dtype:
    """The dtype of a randomized refresh's large products: ``option`` is auto, float32 or bfloat16.

    auto lowers float32 and bfloat16 gradients to ``default_sketch_dtype`` of their device, but
    keeps float64 gradients in float64: asking for float64 is asking for its precision.
    """
    if option != "auto":
        return SKETCH_DTYPES[option]
    if grad.dtype == torch.float64:
        return torch.float64
    return default_sketch_dtype(grad.device.type)


@functools.cache
def default_sketch_dtype(device_type: str) -> torch.dtype:
    """bfloat16 where matmuls run natively in it (CUDA, CPUs with AVX512-BF16 or AMX), else float32."""
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device_type == "cpu":
        caps = torch.cpu.get_capabilities()
        return torch.bfloat16 if caps.get("avx512_bf16") or caps.get("amx_bf16") else torch.float32
    return torch.float32


def align_signs(new: torch.Tensor, old: torch.Tensor, vectors_dim: int) -> torch.Tensor:
    """Flip each basis vector of ``new`` that points away from the same vector of ``old``.

    A randomized basis has arbitrary signs at every refresh; aligning them keeps kept moments
    meaningful along directions that did not move. ``vectors_dim`` is the dimension that indexes the
    basis vectors (1 for P, m x k; 0 for Q, k x n).
    """
    dots = (new * old).sum(dim=1 - vectors_dim, keepdim=True)
    return new * torch.where(dots < 0, -1.0, 1.0).to(new.dtype)


def project(grad: torch.Tensor, side: str, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """The low-rank gradient: P^T G, G Q^T or P^T G Q^T."""
    if side == "left":
        return left.T @ grad
    if side == "right":
        return grad @ right.T
    return left.T @ grad @ right.T


def add_projected_back_(param: torch.Tensor, low: torch.Tensor, side: str, left: torch.Tensor | None,
                        right: torch.Tensor | None, alpha: float) -> None:
    """param += alpha * (low mapped back to the full space), in one fused matmul-add.

    Factors in another dtype (a bf16 basis mapping a float32 update onto a float32 working copy of a
    bf16 weight) are cast to the parameter's; when the dtypes agree nothing is copied.
    """
    low = low.to(param.dtype)
    left = None if left is None else left.to(param.dtype)
    right = None if right is None else right.to(param.dtype)
    if side == "left":
        param.addmm_(left, low, alpha=alpha)
    elif side == "right":
        param.addmm_(low, right, alpha=alpha)
    else:
        param.addmm_(left @ low, right, alpha=alpha)


def change_of_basis(side: str, old_left: torch.Tensor | None, old_right: torch.Tensor | None,
                    new_left: torch.Tensor | None, new_right: torch.Tensor | None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(R_left, R_right) with x_new = R_left x_old R_right for a low-rank x in the old coordinates.

    x_old stands for the full-space matrix P_old x_old Q_old; its coordinates in the new basis are
    P_new^T P_old x_old Q_old Q_new^T, the best approximation within the new subspace.
    """
    r_left = new_left.T @ old_left if side in ("left", "full") else None
    r_right = old_right @ new_right.T if side in ("right", "full") else None
    return r_left, r_right


def apply_change(x: torch.Tensor, r_left: torch.Tensor | None, r_right: torch.Tensor | None) -> torch.Tensor:
    """R_left x R_right, with either factor absent."""
    if r_left is not None:
        x = r_left @ x
    if r_right is not None:
        x = x @ r_right
    return x
