"""The benchmark suite's bookkeeping (no timing here): floors by hand, the summary's exact keys, the report."""
import math

from kernels_bench import floors, suite

SHAPE = dict(batch=8, n_models=2, d_model=4, dict_size=32, k=2)


def test_byte_floors_by_hand():
    B, D, F, K, elt = 8, 8, 32, 16, 2
    codes = K * (elt + 4) + (B + 1) * 8
    counted = floors.byte_counts(SHAPE, elt)
    assert counted["batch_topk"] == B * F * elt + codes
    assert counted["sparse_decode"] == K * D * elt + B * D * elt + codes
    n_params = 2 * F * D + F + D
    assert counted["adam"] == 7 * n_params * elt
    assert floors.memory_floor_bytes(SHAPE, elt) == 4 * n_params * elt + B * F * elt
    t = floors.time_floors_ms(SHAPE, elt, gemm_ms=1.0, bytes_per_s=1e9)
    parts = t["train_step_parts_ms"]
    assert math.isclose(t["train_step"], sum(parts.values()))
    assert parts["encoder_gemm"] == 1.0 and math.isclose(parts["batch_topk"], counted["batch_topk"] / 1e6)


def synthetic_result():
    case = lambda name, impl, backend, ms, **kw: dict(name=name, impl=impl, backend=backend, median_ms=ms,
                                                      p20_ms=ms, p80_ms=ms, peak_mem_gb=kw.get("mem"))
    cases = [case("batch_topk", "torch.topk(flattened scores)", "torch", 10.0),
             case("paired_encode", "crossdiff_ext", "cpu", 2.0), case("batch_topk", "crossdiff_ext", "cpu", 1.0),
             case("sparse_decode", "crossdiff_ext", "cpu", 0.5), case("decoder_backward", "crossdiff_ext", "cpu", 1.5),
             case("train_step", "crossdiff_ext CrossCoder", "cpu", 5.0, mem=3.0),
             case("train_step", "dense PyTorch (paper code)", "torch", 20.0),
             dict(case("train_step", "crossdiff_ext CrossCoder", "cpu", 9.0), shape=dict(SHAPE, dict_size=64))]
    return dict(suite="quick", device="test", date="d", commit="c", dirty=[], torch="t", triton="t", dtype="float32",
                shape=SHAPE, ceilings=dict(matmul=dict(median_ms=1.5, tflops=1.0, what="mm"),
                                           copy=dict(bytes_per_s=1e9, what="copy")),
                floors_ms=floors.time_floors_ms(SHAPE, 4, 1.5, 1e9), memory_floor_gb=2.0, cases=cases)


def test_summary_has_exactly_the_issue_keys_and_uses_the_main_shape():
    result = synthetic_result()
    suite.summarize(result, ["cpu"])
    s = result["summary"]
    assert tuple(s) == suite.SUMMARY_KEYS
    assert s["train_step_speedup_vs_dense"] == 4.0  # the sweep case (9 ms, another shape) is not the main shape's
    assert s["topk_speedup_vs_torch_topk"] == 10.0 and s["encoder_fraction_of_cublas"] == 0.75
    assert s["peak_memory_over_floor"] == 1.5
    assert math.isclose(s["decoder_fwd_over_byte_floor"], 0.5 / result["floors_ms"]["sparse_decode"])
    text = suite.markdown(result)
    assert "train_step_speedup_vs_dense | 4.000" in text and "## Training-step sweeps" in text
