"""Floors: the least time (and memory) each case could take on this device, from ceilings measured in the same
run. A floor is a lower bound under stated assumptions, not a model of our kernels:

  paired_encode      the cuBLAS / ATen GEMM of the same shape (bias and ReLU are free in an epilogue)
  batch_topk         read f [B, F] once (the selection must look at every score) + write the K codes
  threshold_select   the same
  sparse_decode      gather K rows of W [M*d] (no reuse assumed: rows are hit ~k*B/F times, mostly from DRAM at
                     paper scale) + write out [B, M*d] + read the codes
  decoder_backward   values grad (gather K rows of W, read grad_out once, write K values)
                     + weight grad (gather K rows of grad_out, write grad_W [F, M*d]) + the latent order (read the
                     codes, write perm and rows)
  train_step         encoder GEMM + batch_topk + sparse_decode + decoder_backward + the encoder's weight
                     gradient (gather K rows of x, write grad_W_enc) + Adam (read param, grad, m, v; write param,
                     m, v for every parameter)
Bytes move at the measured copy bandwidth (bytes read + bytes written per second).
Memory floor of a training step: parameters + gradients + Adam's two moments + one [B, F] activation buffer
(gradients count because Adam reads them: without a fused optimizer-in-backward they must exist at the same time
as the state).
"""


def shape_numbers(shape, elt, index_bytes=4):
    B, M, d, F, k = (shape[n] for n in ("batch", "n_models", "d_model", "dict_size", "k"))
    D, K = M * d, k * B
    n_params = 2 * F * D + F + D
    return dict(
        B=B,
        M=M,
        d=d,
        F=F,
        k=k,
        D=D,
        K=K,
        elt=elt,
        index_bytes=index_bytes,
        n_params=n_params,
        codes_bytes=K * (elt + index_bytes) + (B + 1) * 8,
    )


def byte_counts(shape, elt, index_bytes=4):
    n = shape_numbers(shape, elt, index_bytes)
    B, F, D, K, codes = n["B"], n["F"], n["D"], n["K"], n["codes_bytes"]
    order = codes + 2 * K * 8 + (F + 1) * 8
    return {
        "batch_topk": B * F * elt + codes,
        "threshold_select": B * F * elt + codes,
        "sparse_decode": K * D * elt + B * D * elt + codes,
        "decoder_backward": (K * D * elt + B * D * elt + K * elt) + (K * D * elt + F * D * elt) + order,
        "encoder_weight_grad": K * D * elt + F * D * elt + order,
        "adam": 7 * n["n_params"] * elt,
    }


def time_floors_ms(shape, elt, gemm_ms, bytes_per_s, index_bytes=4):
    """{case: floor ms} for the op cases and the training step."""
    b = byte_counts(shape, elt, index_bytes)
    ms = {name: v / bytes_per_s * 1e3 for name, v in b.items()}
    floors = {
        "paired_encode": gemm_ms,
        "batch_topk": ms["batch_topk"],
        "threshold_select": ms["threshold_select"],
        "sparse_decode": ms["sparse_decode"],
        "decoder_backward": ms["decoder_backward"],
    }
    floors["train_step"] = (
        gemm_ms
        + ms["batch_topk"]
        + ms["sparse_decode"]
        + ms["decoder_backward"]
        + ms["encoder_weight_grad"]
        + ms["adam"]
    )
    floors["train_step_parts_ms"] = dict(
        encoder_gemm=gemm_ms, **{k: v for k, v in ms.items() if k not in ("threshold_select",)}
    )
    return floors


def memory_floor_bytes(shape, elt):
    n = shape_numbers(shape, elt)
    return 4 * n["n_params"] * elt + n["B"] * n["F"] * elt
