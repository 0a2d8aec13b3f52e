"""Latent Scaling (docs/math.md, "Reading a crosscoder"): how much each latent explains each model, for every latent
in one streaming pass.

For latent j with probe direction d_j (the chat decoder row by default) and a per-model target y[n, m],
    beta_j(target, m) = <d_j, sum_n f_j(n) y[n, m]> / (||d_j||^2 * sum_n f_j(n)^2),
targets "reconstruction" (y = xhat[n, m], with bias) and "error" (y = x[n, m] - xhat[n, m] + f_j(n) W_dec[j, m],
the residual with latent j's own contribution added back, whose last term sums to <d_j, W_dec[j, m]> * C_j).
nu_error = beta_error(base) / beta_error(chat), nu_reconstruction likewise.

How: the probe is contracted before anything is reduced. Per batch, one per-entry dot (the sparse_values_grad
op, the decoder backward's kernel) gives p[e] = <y[row(e), m], d_j(e)> for every kept code e, and the by-latent
sums of f * p, f^2, f and 1 over a by-latent order of the codes (the latent_order op, as in the decoder
weight gradient) are prefix sums in float64, so they are deterministic. Memory is O(F) per (target, model): no
[latents, tokens, d] tensor, nothing grows with the number of latents scored.

All of it happens in the crosscoder's input space (normalised when the crosscoder has target_rms), where its
decoder rows live; codes are the inference-mode codes (threshold for BatchTopK, ReLU for L1).

Dedicated latents (CrossCoder(partition=...)): a chat-dedicated latent has a chat row and a zero base row, so with
the chat probe it is scored like any chat-only latent (its Delta_norm is exactly 1): beta(base) says how much of
its chat direction the base model's activations carry, and a low nu marks it genuinely chat-specific. A latent
whose probe row is zero (a base-dedicated latent under the chat probe) has no direction to probe: its betas and
nu are NaN, as for a latent that never fired (its activation statistics are still counted), never a division by
a zero norm. Score those with probe="base".
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from .. import ops
from ..data.store import ActivationStore
from ..errors import InputError
from ..layer.crosscoder import CrossCoder

TARGETS = ("reconstruction", "error")

# What Latent Scaling reads: a tensor [N, M, d] of raw activations, an activation store, or an iterable of batches.
ScalingData = Union[torch.Tensor, ActivationStore, Iterable[torch.Tensor]]


@dataclass
class LatentScalingResult:
    """What latent_scaling returns: the betas and nu values of the latents scored, and their firing statistics.

    Every per-latent tensor has one entry per scored latent (n of them, in the order of `latents`).

    Attributes:
        beta: {(target, m): [n] float64} for every target computed and model index m (0 = base, 1 = chat); NaN
            where a latent never fired or its probe decoder row is zero (a latent dedicated to another model).
        nu_error: [n] float64 beta_error(base) / beta_error(chat) (NaN where "error" was not computed or a latent
            never fired).
        nu_reconstruction: [n] float64 beta_reconstruction(base) / beta_reconstruction(chat) (NaN likewise).
        latents: [n] int64 the ids scored (all F by default).
        activation_count: [n] int64 tokens where the latent fired.
        activation_sum: [n] float64 the sum of its f over the data.
        tokens: The number of tokens seen.
        probe: The model index whose decoder row was the probe direction.
        base: Model index of the base model (default 0).
        chat: Model index of the chat model (default 1).
        targets: The targets computed, from ("reconstruction", "error") (default: none).
        activation_max: [n] float64 the largest f over the data (NaN where a latent never fired); None in results
            built without it.
    """

    beta: dict[tuple[str, int], torch.Tensor]
    nu_error: torch.Tensor
    nu_reconstruction: torch.Tensor
    latents: torch.Tensor
    activation_count: torch.Tensor
    activation_sum: torch.Tensor
    tokens: int
    probe: int
    base: int = 0
    chat: int = 1
    targets: tuple[str, ...] = field(default_factory=tuple)
    activation_max: Optional[torch.Tensor] = None

    @property
    def firing_frequency(self) -> torch.Tensor:
        """[n] float64 the fraction of the tokens where the latent fired."""
        return self.activation_count.double() / max(self.tokens, 1)

    @property
    def mean_activation(self) -> torch.Tensor:
        """Mean f over the tokens where the latent fired (NaN if it never did)."""
        count = self.activation_count.double()
        return torch.where(count > 0, self.activation_sum / count.clamp_min(1), torch.full_like(count, math.nan))


def _batches(data: ScalingData, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Sequential [B, M, d] batches of a tensor, an activation store or an iterable of batches."""
    if isinstance(data, (torch.Tensor, ActivationStore)):
        n = data.shape[0] if isinstance(data, torch.Tensor) else len(data)
        if n < 1:
            raise InputError("data holds no tokens")
        for start in range(0, n, batch_size):
            yield data[start : start + batch_size].to(device)
    elif hasattr(data, "__iter__"):
        for i, batch in enumerate(data):
            if not isinstance(batch, torch.Tensor):
                raise InputError(f"batch {i} of data is a {type(batch).__name__}, expected a tensor [B, M, d]")
            yield batch.to(device)
    else:
        raise InputError(
            f"data must be a tensor [N, M, d], an activation store or an iterable of batches, got {type(data).__name__}"
        )


@contextlib.contextmanager
def inference_pass(
    cc: CrossCoder, data: ScalingData, batch_size: int, *, desc: Optional[str] = None
) -> Iterator[Iterator[torch.Tensor]]:
    """One read of `data` for inference: yields an iterator of its sequential batches on cc's device while cc is
    in eval mode (its mode is restored afterwards, also on errors), with a tqdm bar over tokens when `desc` is
    given."""
    was_training = cc.training
    cc.eval()
    bar = None
    if desc is not None:
        from tqdm.auto import tqdm

        total = data.shape[0] if isinstance(data, torch.Tensor) else len(data) if hasattr(data, "__len__") else None
        bar = tqdm(total=total, desc=desc, unit="tok", dynamic_ncols=True)

    def batches() -> Iterator[torch.Tensor]:
        for x in _batches(data, batch_size, cc.W_enc.device):
            yield x
            if bar is not None:
                bar.update(x.shape[0])

    try:
        yield batches()
    finally:
        if bar is not None:
            bar.close()
        cc.train(was_training)


def _segment_sums(q, col_ptr, perm):
    """Per-latent sums of the columns of q [nnz, Q] (entries in row order) over the latent order: float64 prefix
    sums taken at the segment ends, so the result does not depend on thread scheduling."""
    prefix = torch.cumsum(q[perm].double(), dim=0)
    prefix = torch.cat([prefix.new_zeros(1, q.shape[1]), prefix])
    return prefix[col_ptr[1:]] - prefix[col_ptr[:-1]]


def _model_index(name, value, n_models):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_models:
        raise InputError(f"{name} must be a model index in [0, {n_models}), got {value!r}")
    return value


@torch.inference_mode()
def latent_scaling(
    cc: CrossCoder,
    data: ScalingData,
    targets: Union[str, Sequence[str]] = TARGETS,
    probe: Union[str, int] = "chat",
    *,
    latents: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    batch_size: int = 4096,
    base: int = 0,
    chat: int = 1,
    progress: bool = False,
) -> LatentScalingResult:
    """Latent Scaling of every latent of `cc` (or of `latents`) over `data`, in one streaming pass.

    See the module docstring for the betas, the nu ratios and how they are computed (O(F) memory, deterministic
    float64 sums, in the crosscoder's input space with its inference-mode codes).

    Args:
        cc: The crosscoder (a BatchTopK one needs its inference threshold set).
        data: A tensor [N, M, d] of raw activations, an activation store, or an iterable of such batches.
        targets: "reconstruction", "error", or a sequence of distinct ones (default both).
        probe: The model whose decoder row is the probe direction: "chat" (the paper, default), "base", or a
            model index.
        latents: A 1-D tensor or list of the latent ids to score; None: all F.
        batch_size: Tokens per batch read from a tensor or store (default 4096).
        base: Model index of the base model (default 0).
        chat: Model index of the chat model (default 1).
        progress: Show a tqdm bar over tokens.

    Returns:
        A LatentScalingResult over the latents scored.

    Raises:
        InputError: cc is not a CrossCoder; targets, probe, base, chat, batch_size or latents are invalid; the
            BatchTopK threshold is unset; data is not a tensor, store or iterable of tensors; a batch is not
            [B, M, d]; or data yielded no batches.
    """
    targets, base, chat, probe_m = _check_settings(cc, targets, probe, base, chat, batch_size)
    latents = _latent_ids(latents, cc.dict_size)
    _check_threshold(cc)
    W_dec = cc.W_dec.detach().float()
    probe_rows = W_dec[:, probe_m].contiguous()  # [F, d]
    columns = [(t, m) for t in targets for m in range(cc.n_models)]
    with inference_pass(cc, data, batch_size, desc="latent scaling" if progress else None) as batches:
        sums, largest, tokens = _stream_sums(cc, batches, columns, probe_rows)
    beta = _betas(sums, columns, probe_rows, W_dec)
    nan = torch.full((cc.dict_size,), math.nan, dtype=torch.float64, device=sums.device)

    def ratio(target: str) -> torch.Tensor:
        if target not in targets:
            return nan
        return beta[(target, base)] / beta[(target, chat)]

    count, f_sum = sums[:, -1].round().to(torch.int64), sums[:, -2]
    ids = torch.arange(cc.dict_size, device=sums.device) if latents is None else latents.to(sums.device)
    pick = lambda t: t[ids].cpu()
    return LatentScalingResult(
        beta={k: pick(v) for k, v in beta.items()},
        nu_error=pick(ratio("error")),
        nu_reconstruction=pick(ratio("reconstruction")),
        latents=ids.cpu(),
        activation_count=pick(count),
        activation_sum=pick(f_sum),
        tokens=tokens,
        probe=probe_m,
        base=base,
        chat=chat,
        targets=targets,
        activation_max=pick(torch.where(count > 0, largest, torch.full_like(largest, math.nan))),
    )


def _check_settings(cc, targets, probe, base, chat, batch_size):
    """(targets as a tuple, base, chat, probe model index) once every setting of latent_scaling is valid for cc."""
    if not isinstance(cc, CrossCoder):
        raise InputError(f"cc must be a crossdiff_ext.CrossCoder, got {type(cc).__name__}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets or any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets):
        raise InputError(f"targets must be distinct names from {TARGETS}, got {targets!r}")
    base, chat = _model_index("base", base, cc.n_models), _model_index("chat", chat, cc.n_models)
    if base == chat:
        raise InputError(f"base and chat must be different models, got {base} for both")
    probe_m = {"chat": chat, "base": base}.get(probe, probe)
    probe_m = _model_index("probe ('chat', 'base' or a model index)", probe_m, cc.n_models)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return targets, base, chat, probe_m


def _check_threshold(cc):
    """A BatchTopK crosscoder needs its inference threshold for the inference-mode codes."""
    if cc.activation == "batch_topk" and float(cc.threshold) < 0:
        raise InputError(
            "the crosscoder's inference threshold is unset (-1): Latent Scaling needs the "
            "inference-mode codes; train past threshold_start_step or set cc.threshold"
        )


def _latent_ids(latents, dict_size):
    """The latent ids to score as a 1-D int64 tensor, or None for all of them."""
    if latents is None:
        return None
    latents = torch.as_tensor(latents, dtype=torch.int64).flatten()
    if latents.numel() and (int(latents.min()) < 0 or int(latents.max()) >= dict_size):
        raise InputError(
            f"latents must be ids in [0, {dict_size}), got range [{int(latents.min())}, {int(latents.max())}]"
        )
    return latents


def _stream_sums(cc, batches, columns, probe_rows):
    """One pass over the batches: (per-latent float64 sums [F, len(columns) + 3] of f * p per column, f^2, f and
    1; the largest f per latent; the number of tokens)."""
    probe_W = probe_rows[:, None, :]  # [F, 1, d]: the per-entry dot over one model's coordinates
    F, device = cc.dict_size, cc.W_enc.device
    sums = torch.zeros(F, len(columns) + 3, dtype=torch.float64, device=device)
    largest = torch.zeros(F, dtype=torch.float64, device=device)  # f > 0 where kept; max is order-independent
    tokens = 0
    for x in batches:
        if x.dim() != 3 or tuple(x.shape[1:]) != (cc.n_models, cc.d_model):
            raise InputError(f"batches must be [B, M, d] = [B, {cc.n_models}, {cc.d_model}], got {tuple(x.shape)}")
        codes, q = _batch_products(cc, x, columns, probe_W)
        col_ptr, perm, _ = ops.latent_order(codes.indices, codes.row_ptr, F)
        sums += _segment_sums(q, col_ptr, perm)
        largest.scatter_reduce_(0, codes.indices.long(), codes.values.double(), reduce="amax")
        tokens += x.shape[0]
    if tokens == 0:
        raise InputError("data yielded no batches")
    return sums, largest, tokens


def _batch_products(cc, x, columns, probe_W):
    """(the batch's inference-mode codes, q [nnz, len(columns) + 3]: per kept code, f * p for each (target, model)
    column, then f^2, f and 1)."""
    xn = cc.normalize(x.float()).to(cc.input_dtype)
    codes = cc.encode(xn, use_threshold=cc.activation == "batch_topk", normalized=True)
    recon = cc.decode(codes, normalized=True).float()
    f = codes.values.float()
    q = []
    for target, m in columns:
        y = recon[:, m] if target == "reconstruction" else xn[:, m].float() - recon[:, m]
        p = ops.sparse_values_grad(y[:, None, :].contiguous(), codes.indices, codes.row_ptr, probe_W)
        q.append(f * p)
    q += [f * f, f, (f != 0).float()]
    return codes, torch.stack(q, dim=1)


def _betas(sums, columns, probe_rows, W_dec):
    """{(target, m): [F] float64 beta} from the streamed sums (NaN where a latent never fired)."""
    C = sums[:, len(columns)]
    denom = probe_rows.double().pow(2).sum(-1) * C
    fired = denom > 0
    beta = {}
    for i, (target, m) in enumerate(columns):
        numer = sums[:, i]
        if target == "error":  # f_j W_dec[j, m] added back: <d_j, W_dec[j, m]> * C_j
            numer = numer + (probe_rows.double() * W_dec[:, m].double()).sum(-1) * C
        beta[(target, m)] = torch.where(
            fired, numer / torch.where(fired, denom, torch.ones_like(denom)), torch.full_like(denom, math.nan)
        )
    return beta


def latent_scaling_reference(
    cc: CrossCoder,
    x: torch.Tensor,
    targets: Sequence[str] = TARGETS,
    probe: int = 1,
    latents: Optional[Iterable[int]] = None,
) -> dict[tuple[str, int], torch.Tensor]:
    """The closed form written out per latent with dense tensors, as the paper's code computes it (a
    [latents, tokens, d] tensor): for tests on small inputs only."""
    with torch.no_grad():
        cc.eval()
        xn = cc.normalize(x.float()).to(cc.input_dtype)
        f = cc.encode(xn, use_threshold=cc.activation == "batch_topk", normalized=True).to_dense().double()
        recon = cc.decode(
            cc.encode(xn, use_threshold=cc.activation == "batch_topk", normalized=True), normalized=True
        ).double()
        W = cc.W_dec.detach().double()
        ids = range(cc.dict_size) if latents is None else [int(j) for j in latents]
        out = {}
        for target in targets:
            for m in range(cc.n_models):
                betas = []
                for j in ids:
                    d = W[j, probe]
                    fj = f[:, j]
                    if target == "reconstruction":
                        y = recon[:, m]
                    else:
                        y = xn[:, m].double() - recon[:, m] + fj[:, None] * W[j, m]
                    model = fj[:, None] * d  # [N, d]: beta * f_j d_j is the prediction
                    den = model.pow(2).sum()
                    betas.append(float((y * model).sum() / den) if den > 0 else math.nan)
                out[(target, m)] = torch.tensor(betas, dtype=torch.float64)
        return out
