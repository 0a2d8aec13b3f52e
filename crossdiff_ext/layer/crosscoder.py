"""CrossCoder: the crosscoder layer (BatchTopK or L1/ReLU) over the activations of M models."""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import InputError, require_int
from ..ops.autograd import decode_sparse, encode_sparse
from ..ops.relu_crosscoder import relu_crosscoder
from . import checkpoints, hub, paper_format
from .codes import SparseCodes
from .partition import check_partition, mask_absent_gradient, nonzero_absent_latents, zero_absent_rows_

ACTIVATIONS = ("batch_topk", "relu")
# "independent": each model's encoder rows drawn on their own, as in the paper's released runs; "shared": one draw
# copied to every model, so every latent starts out shared.
INITS = ("independent", "shared")
# Code density above which the ReLU crosscoder decodes densely (see ops/relu_crosscoder.py). Measured on the
# 2-core CPU at B=2048, d=256, F=16384 (kernels_bench/results/cpu-relu-density.md): sparse/dense step time 0.73 at
# density 0.06 and 1.14 at 0.124, so the crossover is near 0.1. GPU backends will want their own measurement.
DENSE_CODE_DENSITY = 0.1


@dataclass
class CrossCoderOutput:
    """What CrossCoder.forward returns: the reconstruction and the codes it was decoded from.

    Attributes:
        recon: [B, M, d] reconstruction, in the same space as forward's x (raw, or normalised with
            normalized=True).
        codes: The batch's SparseCodes.
        min_score: Smallest selected positive score s = f * w of the batch (batch top-k in training); +inf
            otherwise.
    """

    recon: torch.Tensor  # [B, M, d]
    codes: SparseCodes
    # Smallest selected positive score s = f * w of the batch (batch top-k in training); +inf otherwise.
    min_score: Optional[torch.Tensor] = None


def _stack_models(parts):
    """M tensors [B, d] -> [B, M, d]. A view when they are equally strided slices of one buffer at a constant
    positive spacing (e.g. the columns of a [B, M, d] store, or per-model halves of one allocation) and need no
    gradient; one copy (torch.stack) otherwise."""
    first = parts[0]
    if all(isinstance(p, torch.Tensor) for p in parts) and first.dim() == 2 and not any(p.requires_grad for p in parts):
        same = all(
            p.shape == first.shape
            and p.stride() == first.stride()
            and p.dtype == first.dtype
            and p.device == first.device
            and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            for p in parts
        )
        step = parts[1].storage_offset() - first.storage_offset() if len(parts) > 1 else 0
        if (
            same
            and step > 0
            and all(p.storage_offset() == first.storage_offset() + m * step for m, p in enumerate(parts))
        ):
            return first.as_strided(
                (first.shape[0], len(parts), first.shape[1]), (first.stride(0), step, first.stride(1))
            )
    return torch.stack(parts, dim=1)


class CrossCoder(nn.Module):
    """A crosscoder over M >= 2 models (docs/math.md: "The crosscoder", "BatchTopK crosscoder").

    Parameters use the layout W_enc, W_dec [F, M, d], b_enc [F], b_dec [M, d]. With activation="batch_topk",
    training-mode encoding keeps the k * B largest f * w over the whole batch (w = sum_m ||W_dec[j, m]||) and
    tracks the inference threshold like BatchNorm tracks its statistics: after `threshold_start_step` training
    batches, threshold <- min selected score first, then threshold_beta * threshold + (1 - beta) * min.
    Evaluation-mode encoding keeps f where f * w > threshold. activation="relu" is the L1 crosscoder: every
    positive f is kept; its forward runs the decoder and backward densely when more than `dense_code_density` of
    the batch's [B, F] codes are active (cheaper there), sparsely otherwise.

    Input normalisation (target_rms set): the crosscoder works on x_n[:, m] = (x[:, m] - input_mean[m]) *
    input_scale[m] with input_scale[m] = target_rms / sqrt(sum_i input_std[m, i]^2), so every model's centred
    activations have RMS norm target_rms and no model dominates the loss by its scale (the normaliser of the
    paper's dictionary_learning code, keep_relative_variance=True). encode/forward take raw activations and
    decode/forward return raw ones (the normalisation is undone); normalized=True skips both maps for inputs
    already in the normalised space, which is where the trainer computes the loss. The statistics are buffers,
    saved with the model; set them with set_input_normalization (cx.train does it from the data).

    init: "independent" (default) draws every model's encoder rows on their own, as the paper's runs did;
    "shared" gives every model the same rows, so every latent starts out shared (see reset_parameters).

    partition: dedicated latents (layer/partition.py). With partition = (n_0, ..., n_{M-1}) (for two models
    (n_base_only, n_chat_only)), the first n_0 latents belong to model 0 only, the next n_1 to model 1 only, and
    the rest are shared. A dedicated latent's encoder and decoder rows of the other models are exactly zero and
    stay so: every gradient that reaches W_enc and W_dec through this module (compute_weights, partition_masked)
    is zero there, so Adam, weight decay and clipping leave them at zero. The same kernels run; they see the zero
    rows.

    compute_dtype (an attribute, not saved): when set to a narrower dtype than the parameters', the ops run on
    copies of the weights cast to it (mixed precision with fp32 master weights) and inputs must have it.

    Args:
        d_model: d, the width of every model's activations (an int >= 1).
        dict_size: F, the number of latents (an int >= 1).
        n_models: M, the number of models (an int >= 2).
        k: Latents per row on average for activation="batch_topk" (an int in [1, dict_size]); must be None for
            "relu".
        activation: "batch_topk" (the BatchTopK crosscoder) or "relu" (the L1 crosscoder).
        dtype: Parameter dtype: float32, float16 or bfloat16.
        device: Device of the parameters and buffers.
        threshold_start_step: Training batches after which the inference threshold is tracked.
        threshold_beta: Decay of the threshold's running average, in [0, 1).
        dense_code_density: Code density above which the ReLU crosscoder decodes densely, in [0, 1] (default
            DENSE_CODE_DENSITY, measured: see there).
        target_rms: RMS norm of every model's centred, normalised activations (a finite number > 0); None turns
            input normalisation off.
        init: "independent" or "shared" (see above and reset_parameters).
        partition: None (every latent shared), or one count per model of the latents dedicated to it, in model
            order: ints >= 0 summing to at most dict_size (see above).

    Raises:
        InputError: An argument is out of its range or of the wrong type (the message names it).
    """

    def __init__(
        self,
        d_model: int,
        dict_size: int,
        n_models: int = 2,
        k: Optional[int] = None,
        activation: str = "batch_topk",
        *,
        dtype: torch.dtype = torch.float32,
        device: Optional[Union[torch.device, str]] = None,
        threshold_start_step: int = 1000,
        threshold_beta: float = 0.999,
        dense_code_density: float = DENSE_CODE_DENSITY,
        target_rms: Optional[float] = None,
        init: str = "independent",
        partition: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        for name, value, low in (("d_model", d_model, 1), ("dict_size", dict_size, 1), ("n_models", n_models, 2)):
            require_int(name, value, low)
        if activation not in ACTIVATIONS:
            raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if activation == "batch_topk":
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= dict_size:
                raise InputError(f"k must be an int in [1, dict_size = {dict_size}] for batch_topk, got {k!r}")
        elif k is not None:
            raise InputError(f"k is only used by activation='batch_topk'; got k={k!r} with activation={activation!r}")
        if init not in INITS:
            raise InputError(f"init must be one of {INITS}, got {init!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if not 0.0 <= dense_code_density <= 1.0:
            raise InputError(f"dense_code_density must be in [0, 1], got {dense_code_density}")
        if not 0.0 <= threshold_beta < 1.0:
            raise InputError(f"threshold_beta must be in [0, 1), got {threshold_beta}")
        if target_rms is not None and not (
            isinstance(target_rms, (int, float))
            and not isinstance(target_rms, bool)
            and math.isfinite(target_rms)
            and target_rms > 0
        ):
            raise InputError(f"target_rms must be a finite number > 0 or None, got {target_rms!r}")
        self.partition = check_partition(partition, n_models, dict_size)
        self.target_rms = None if target_rms is None else float(target_rms)
        self.compute_dtype = None
        self.d_model, self.dict_size, self.n_models = d_model, dict_size, n_models
        self.k, self.activation, self.init = k, activation, init
        self.threshold_start_step, self.threshold_beta = int(threshold_start_step), float(threshold_beta)
        self.dense_code_density = float(dense_code_density)
        shape = (dict_size, n_models, d_model)
        factory = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.empty(shape, **factory))
        self.b_enc = nn.Parameter(torch.zeros(dict_size, **factory))
        self.W_dec = nn.Parameter(torch.empty(shape, **factory))
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_model, **factory))
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32, device=device))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.int64, device=device))
        if self.target_rms is not None:
            # fp32 whatever the parameters' dtype; identity until set_input_normalization is called.
            stats = dict(dtype=torch.float32, device=device)
            self.register_buffer("input_mean", torch.zeros(n_models, d_model, **stats))
            self.register_buffer("input_std", torch.ones(n_models, d_model, **stats))
            self.register_buffer("input_scale", torch.ones(n_models, **stats))
        self.reset_parameters()

    def config(self) -> dict[str, Any]:
        """Constructor arguments (what config.json stores).

        Returns:
            {argument: value} with the dtype as its name (e.g. "float32"); device is not included.
        """
        return dict(
            d_model=self.d_model,
            dict_size=self.dict_size,
            n_models=self.n_models,
            k=self.k,
            activation=self.activation,
            threshold_start_step=self.threshold_start_step,
            threshold_beta=self.threshold_beta,
            dense_code_density=self.dense_code_density,
            target_rms=self.target_rms,
            init=self.init,
            partition=None if self.partition is None else list(self.partition),
            dtype=str(self.W_enc.dtype).removeprefix("torch."),
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the parameters as the paper's runs did, and reset the threshold tracking.

        A Kaiming-uniform encoder, drawn independently for every model (init="independent") or once and copied to
        all (init="shared"); decoder = encoder (our layout is already the transpose of the reference's); BatchTopK
        scales every [latent, model] row to unit norm as the reference code does (norm_init_scale=1), L1 keeps the
        Kaiming scale. Each model's draw is a [d, F] matrix (fan-in F) in both modes, so the two differ only in
        independence. Biases 0; the trainer later sets b_dec to a geometric median. The threshold goes back to
        unset (-1) and num_batches_tracked to 0. A dedicated latent keeps the draw of its own model only: its
        other rows are zero.
        """
        draws = 1 if self.init == "shared" else self.n_models
        rows = []
        for _ in range(draws):
            base = torch.empty(self.d_model, self.dict_size, dtype=torch.float32, device=self.W_enc.device)
            nn.init.kaiming_uniform_(base)
            rows.append(base.T)  # [F, d]
        full = torch.stack(rows, dim=1).expand(-1, self.n_models, -1)  # [F, M, d]
        if self.activation == "batch_topk":
            full = full / full.norm(dim=2, keepdim=True).clamp_min(1e-12)
        self.W_enc.copy_(full)
        self.W_dec.copy_(full)
        zero_absent_rows_(self.W_enc, self.partition)
        zero_absent_rows_(self.W_dec, self.partition)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(-1.0)
        self.num_batches_tracked.zero_()

    # ------------------------------------------------------------------------------------ input normalisation

    @torch.no_grad()
    def set_input_normalization(self, mean: torch.Tensor, variance: torch.Tensor) -> None:
        """Set the normaliser from the raw activations' per-model, per-feature mean and variance.

        input_scale[m] = target_rms / sqrt(sum_i variance[m, i] + 1e-8).

        Args:
            mean: [M, d] mean of the raw activations (e.g. ActivationStore.mean).
            variance: [M, d] variance of the raw activations, >= 0 (e.g. ActivationStore.variance).

        Raises:
            InputError: The crosscoder was built without target_rms, or mean / variance are not finite [M, d]
                tensors (or the variance is negative).
        """
        if self.target_rms is None:
            raise InputError("set_input_normalization needs a crosscoder built with target_rms (e.g. 1.0)")
        expected = (self.n_models, self.d_model)
        for name, t in (("mean", mean), ("variance", variance)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(f"{name} must be a tensor [M, d] = {list(expected)}, got {shape}")
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"{name} holds non-finite values")
        if bool((variance < 0).any()):
            raise InputError("variance must be >= 0")
        variance = variance.to(self.input_std.device, torch.float64)
        self.input_mean.copy_(mean)
        self.input_std.copy_(variance.sqrt())
        self.input_scale.copy_(self.target_rms / (variance.sum(1) + 1e-8).sqrt())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw activations to the crosscoder's input space (x unchanged without target_rms).

        Args:
            x: [B, M, d] raw activations.

        Returns:
            [B, M, d] (x - input_mean) * input_scale, computed in fp32, in x's dtype.
        """
        if self.target_rms is None:
            return x
        return ((x.float() - self.input_mean) * self.input_scale[:, None]).to(x.dtype)

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of normalize: map the crosscoder's space back to raw activations (y unchanged without target_rms).

        Args:
            y: [B, M, d] in the crosscoder's (normalised) space.

        Returns:
            [B, M, d] raw activations, computed in fp32, in y's dtype.
        """
        if self.target_rms is None:
            return y
        return (y.float() / self.input_scale[:, None] + self.input_mean).to(y.dtype)

    # -------------------------------------------------------------------------------------------- precision

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype inputs must have: compute_dtype when set, else the parameters'."""
        return self.compute_dtype or self.W_enc.dtype

    def compute_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights the ops run on, in the compute dtype.

        Returns:
            (W_enc, b_enc, W_dec, b_dec): differentiable casts of the fp32 master weights under mixed precision,
            the parameters themselves otherwise; with dedicated latents W_enc and W_dec pass through
            partition_masked (the same values, no copy).
        """
        params = (self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        dtype = self.compute_dtype
        if dtype is not None and dtype != self.W_enc.dtype:
            params = tuple(p.to(dtype) for p in params)
        W_enc, b_enc, W_dec, b_dec = params
        return self.partition_masked(W_enc), b_enc, self.partition_masked(W_dec), b_dec

    def partition_masked(self, W: torch.Tensor) -> torch.Tensor:
        """W_enc or W_dec (or a cast of either) for a computation to differentiate: the same values, with the
        gradient of the dedicated latents' absent rows zeroed on its way back (see the class docstring). Every
        loss in the library reads the weights through it or through compute_weights; a loss of your own should
        too.

        Args:
            W: [F, M, d] this crosscoder's encoder or decoder weights, or a cast of them.

        Returns:
            W itself when the crosscoder has no dedicated latents (or W needs no gradient); else a view of W whose
            backward zeroes the absent rows' gradient.
        """
        return mask_absent_gradient(W, self.partition)

    def check_partition_rows(self, source: str = "crosscoder") -> None:
        """Check that every dedicated latent's absent encoder and decoder rows are exactly zero.

        Args:
            source: What the weights came from, for the message (e.g. a checkpoint's path).

        Raises:
            InputError: Some absent row is not zero (the message names the first latents).
        """
        for name in ("W_enc", "W_dec"):
            bad = nonzero_absent_latents(getattr(self, name), self.partition)
            if bad.numel():
                raise InputError(
                    f"{source}: {name} has non-zero rows for {bad.numel()} dedicated latents of partition "
                    f"{list(self.partition)} (first: {bad[:5].tolist()}); a dedicated latent's other models' "
                    "rows must be exactly zero"
                )

    def decoder_norm_weights(self) -> torch.Tensor:
        """The selection weights w_j = sum_m ||W_dec[j, m]||_2, detached (selection is not differentiated).

        Returns:
            [F] float32.
        """
        return torch.linalg.vector_norm(self.W_dec.detach(), dim=2, dtype=torch.float32).sum(1)

    def as_batch(self, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """Check an input batch and bring it to the [B, M, d] layout the ops take.

        Args:
            x: A tensor [B, M, d], or a tuple / list of M tensors [B, d] (one per model; stacked as a view when
                they are equally strided slices of one buffer, else copied).

        Returns:
            [B, M, d] with B >= 1, in the input dtype (input_dtype) and on the crosscoder's device.

        Raises:
            InputError: x has the wrong type, number of models, shape, dtype or device, or no rows.
        """
        if isinstance(x, (tuple, list)):
            if len(x) != self.n_models:
                raise InputError(f"x must hold one [B, d] tensor per model (n_models = {self.n_models}), got {len(x)}")
            x = _stack_models(tuple(x))
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a tensor [B, M, d] or a tuple of M tensors [B, d], got {type(x).__name__}")
        expected = (self.n_models, self.d_model)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise InputError(
                f"x must have shape [B, M, d] = [B, {self.n_models}, {self.d_model}], got {tuple(x.shape)}"
            )
        if x.shape[0] < 1:
            raise InputError("x must have at least one row (B >= 1)")
        if x.dtype != self.input_dtype:
            what = "compute dtype" if self.compute_dtype else "dtype"
            raise InputError(f"x must have the crosscoder's {what} {self.input_dtype}, got {x.dtype}")
        if x.device != self.W_enc.device:
            raise InputError(f"x must be on the crosscoder's device {self.W_enc.device}, got {x.device}")
        return x

    def _encode(self, x, use_threshold, weights, with_order=False):
        B, F = x.shape[0], self.dict_size
        W_enc, b_enc = weights[0], weights[1]
        if self.activation == "relu":
            w = torch.ones(F, dtype=torch.float32, device=x.device)
            return encode_sparse(x, W_enc, b_enc, w, "threshold", 0.0)
        use_threshold = (not self.training) if use_threshold is None else use_threshold
        w = self.decoder_norm_weights()
        if use_threshold:
            theta = float(self.threshold)
            if theta < 0:
                raise RuntimeError(
                    "the inference threshold is unset (-1): train in training mode past threshold_start_step "
                    f"({self.threshold_start_step} batches), set cc.threshold, or call encode(x, use_threshold=False)"
                )
            return encode_sparse(x, W_enc, b_enc, w, "threshold", theta, with_order=with_order)
        if not 1 <= self.k <= F:
            raise InputError(f"k must be in [1, dict_size = {F}] (K = k * B <= B * F), got k = {self.k}")
        out = encode_sparse(x, W_enc, b_enc, w, "topk", self.k * B, with_order=with_order)
        if self.training:
            self.track_threshold(out[3])
        return out

    @torch.no_grad()
    def track_threshold(self, min_score: torch.Tensor) -> None:
        """Update the inference threshold from a training batch's smallest selected score, like BatchNorm's stats.

        After threshold_start_step batches: threshold <- min_score at first, then threshold_beta * threshold +
        (1 - threshold_beta) * min_score. A non-finite min_score (no positive score selected) leaves it unchanged.
        num_batches_tracked counts every call.

        Args:
            min_score: Scalar fp32 tensor: the smallest selected positive score s = f * w of the batch.
        """
        step = self.num_batches_tracked
        new = torch.where(
            self.threshold < 0,
            min_score,
            self.threshold_beta * self.threshold + (1.0 - self.threshold_beta) * min_score,
        )
        # Written with tensor ops (no .item()) so the update compiles without graph breaks.
        keep = (step <= self.threshold_start_step) | ~torch.isfinite(min_score)
        self.threshold.copy_(torch.where(keep, self.threshold, new))
        self.num_batches_tracked.add_(1)

    def encode(
        self,
        x: Union[torch.Tensor, Sequence[torch.Tensor]],
        use_threshold: Optional[bool] = None,
        *,
        normalized: bool = False,
    ) -> SparseCodes:
        """Encode a batch into sparse codes.

        Args:
            x: [B, M, d] (or a tuple of M [B, d]) activations.
            use_threshold: Select with the inference threshold (True) or by batch top-k (False); None: threshold
                in eval mode, batch top-k in training mode (which also tracks the threshold). Ignored by
                activation="relu", which keeps every positive f.
            normalized: x is already in the normalised space (see the class docstring).

        Returns:
            The batch's SparseCodes (B rows, dict_size latents).

        Raises:
            InputError: x is not a valid batch (see as_batch).
            RuntimeError: use_threshold with the threshold still unset (-1).
        """
        x = self.as_batch(x)
        if not normalized:
            x = self.normalize(x)
        values, indices, row_ptr, _ = self._encode(x, use_threshold, self.compute_weights())
        return SparseCodes(values, indices, row_ptr, x.shape[0], self.dict_size)

    def decode(self, codes: SparseCodes, *, normalized: bool = False) -> torch.Tensor:
        """Decode sparse codes: xhat = codes W_dec + b_dec.

        Args:
            codes: SparseCodes of this crosscoder's dict_size latents.
            normalized: Return xhat in the normalised space instead of mapping it back to raw activations.

        Returns:
            [B, M, d] reconstruction in the compute dtype.

        Raises:
            InputError: codes have another number of latents.
        """
        if codes.n_latents != self.dict_size:
            raise InputError(f"codes have {codes.n_latents} latents, the crosscoder has {self.dict_size}")
        return self._decode(codes, self.compute_weights(), normalized)

    def _decode(self, codes, weights, normalized):
        recon = decode_sparse(codes.values, codes.indices, codes.row_ptr, weights[2], weights[3], codes.order)
        return recon if normalized else self.denormalize(recon)

    def forward(self, x: Union[torch.Tensor, Sequence[torch.Tensor]], *, normalized: bool = False) -> CrossCoderOutput:
        """Encode and decode a batch (batch top-k in training mode, the threshold in eval mode).

        Args:
            x: [B, M, d] (or a tuple of M [B, d]) raw activations, or normalised ones with normalized=True.
            normalized: x is already in the normalised space; recon is returned there too.

        Returns:
            CrossCoderOutput whose recon is in the same space as x.

        Raises:
            InputError: x is not a valid batch (see as_batch).
            RuntimeError: Eval mode with the threshold still unset (-1).
        """
        x = self.as_batch(x)
        if not normalized:
            x = self.normalize(x)
        weights = self.compute_weights()
        if self.activation == "relu":
            recon, values, indices, row_ptr = relu_crosscoder(x, *weights, self.dense_code_density)
            codes = SparseCodes(values, indices, row_ptr, x.shape[0], self.dict_size)
            recon = recon if normalized else self.denormalize(recon)
            return CrossCoderOutput(recon, codes, torch.full((), math.inf, device=x.device))
        # A step that will train the weights sorts its codes by latent once, for both weight gradients.
        with_order = torch.is_grad_enabled() and (weights[0].requires_grad or weights[2].requires_grad)
        values, indices, row_ptr, min_score, *order = self._encode(x, None, weights, with_order)
        codes = SparseCodes(values, indices, row_ptr, x.shape[0], self.dict_size, order[0] if order else None)
        return CrossCoderOutput(self._decode(codes, weights, normalized), codes, min_score)

    def extra_repr(self) -> str:
        """The constructor settings shown by repr(module).

        Returns:
            "d_model=..., dict_size=..., n_models=..., activation=..., dtype=..." (k, target_rms and partition
            when set).
        """
        k = f", k={self.k}" if self.k is not None else ""
        rms = f", target_rms={self.target_rms}" if self.target_rms is not None else ""
        part = f", partition={self.partition}" if self.partition is not None else ""
        return (
            f"d_model={self.d_model}, dict_size={self.dict_size}, n_models={self.n_models}, "
            f"activation={self.activation!r}{k}{rms}{part}, dtype={self.W_enc.dtype}"
        )

    def save_pretrained(self, directory: Union[os.PathLike, str]) -> None:
        """Save the crosscoder as `directory`/model.safetensors and config.json, each written atomically.

        Args:
            directory: Target directory, created if needed; an existing checkpoint there is replaced.
        """
        checkpoints.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: Union[os.PathLike, str],
        *,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[Union[torch.dtype, str]] = None,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        cache_dir: Optional[Union[os.PathLike, str]] = None,
        token: Optional[Union[str, bool]] = None,
    ) -> "CrossCoder":
        """Load a crosscoder written by save_pretrained or push_to_hub, the whole crosscoder of a latent-parallel
        checkpoint, or the paper's (dictionary_learning) crosscoder, from a local path or a Hub repo id.

        Nothing loaded runs code: weights are safetensors, or torch files read with weights_only=True.

        Args:
            directory: The checkpoint directory (or its model.safetensors); a sharded step directory of
                distributed training (its shards are merged); a directory in one of the dictionary_learning
                layouts (see load_dictionary_learning); or a Hub repo id (owner/name) holding any of these.
            device: Where to put the parameters (default CPU).
            dtype: Override of the stored parameter dtype (a torch dtype or its name).
            revision: For a repo id: the branch, tag or commit (default main).
            subfolder: A folder inside the directory or repo that holds the checkpoint.
            cache_dir: For a repo id: the Hub cache (default huggingface_hub's; HF_HUB_OFFLINE=1 reads only it).
            token: For a repo id: a Hub token (default huggingface_hub's, e.g. HF_TOKEN).

        Returns:
            The crosscoder, in eval mode.

        Raises:
            FileNotFoundError: config.json or model.safetensors is missing.
            InputError: The repo or revision is not on the Hub (or not cached offline), or the files are not a
                valid checkpoint of this format or the paper's (the message says why).
        """
        local = hub.resolve(directory, revision=revision, subfolder=subfolder, cache_dir=cache_dir, token=token)
        if paper_format.is_dictionary_learning(local):
            return paper_format.load_as(cls, local, dtype=dtype, device=device)
        return checkpoints.from_pretrained(cls, local, device=device, dtype=dtype)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        facts: Optional[hub.CardFacts] = None,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[Union[str, bool]] = None,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
    ) -> str:
        """Upload the crosscoder in our format (model.safetensors + config.json) with a generated model card
        (README.md: models, layer, dictionary size, k or mu, tokens trained, FVE per model, how to load it).

        Args:
            repo_id: The target repo (owner/name); created when it does not exist.
            facts: What the card says beyond the crosscoder's config (hub.CardFacts: models, layer, tokens
                trained, FVE per model, mu); what is not given reads "not recorded".
            subfolder: A folder in the repo to upload into (e.g. one per layer).
            revision: The branch to commit to (default main).
            private: Visibility of a repo created here.
            token: A Hub token (default huggingface_hub's, e.g. HF_TOKEN).
            commit_message: The commit message.
            create_pr: Open a pull request instead of committing.

        Returns:
            The commit's (or pull request's) URL.
        """
        return hub.push_to_hub(
            self,
            repo_id,
            facts=facts,
            subfolder=subfolder,
            revision=revision,
            private=private,
            token=token,
            commit_message=commit_message,
            create_pr=create_pr,
        )
