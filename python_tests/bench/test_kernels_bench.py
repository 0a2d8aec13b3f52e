"""The benchmark suite's bookkeeping (no timing here): floors by hand, the summary's exact keys, the report."""

import math
import os

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
    case = lambda name, impl, backend, ms, **kw: dict(
        name=name, impl=impl, backend=backend, median_ms=ms, p20_ms=ms, p80_ms=ms, peak_mem_gb=kw.get("mem")
    )
    cases = [
        case("batch_topk", "torch.topk(flattened scores)", "torch", 10.0),
        case("paired_encode", "crossdiff_ext", "cpu", 2.0),
        case("batch_topk", "crossdiff_ext", "cpu", 1.0),
        case("sparse_decode", "crossdiff_ext", "cpu", 0.5),
        case("decoder_backward", "crossdiff_ext", "cpu", 1.5),
        case("train_step", "crossdiff_ext CrossCoder", "cpu", 5.0, mem=3.0),
        case("train_step", "dense PyTorch (paper code)", "torch", 20.0),
        dict(case("train_step", "crossdiff_ext CrossCoder", "cpu", 9.0), shape=dict(SHAPE, dict_size=64)),
    ]
    return dict(
        suite="quick",
        device="test",
        date="d",
        commit="c",
        dirty=[],
        torch="t",
        triton="t",
        dtype="float32",
        shape=SHAPE,
        ceilings=dict(matmul=dict(median_ms=1.5, tflops=1.0, what="mm"), copy=dict(bytes_per_s=1e9, what="copy")),
        floors_ms=floors.time_floors_ms(SHAPE, 4, 1.5, 1e9),
        memory_floor_gb=2.0,
        cases=cases,
    )


def test_summary_has_exactly_the_summary_keys_and_uses_the_main_shape():
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


def test_gpu_cases_are_set_beside_the_traffic_ledger():
    from kernels_bench import ledger

    result = synthetic_result()
    result["cases"].append(dict(result["cases"][2], backend="triton", median_ms=2.0))
    suite.summarize(result, ["cpu", "triton"])
    rows = result["ledger_vs_time"]
    assert set(rows) == {"triton"}  # the ledger models the GPU backends only
    modelled = ledger.ledger(SHAPE, dtype="fp32")["backends"]["triton"]["ops"]["batch_topk"]["totals"]
    mb = (modelled["read"] + modelled["written"]) / 1e6
    assert math.isclose(rows["triton"]["batch_topk"]["ledger_mb"], mb)
    assert math.isclose(rows["triton"]["batch_topk"]["time_over_ledger"], 2.0 / (mb * 1e6 / 1e9 * 1e3))
    assert "## Measured time against the traffic ledger" in suite.markdown(result)


def gpu_result():
    """A finished paper-suite result with both GPU backends timed on every op of the auto table."""
    from crossdiff_ext import backends

    cases = []
    for i, op in enumerate(backends.AUTO_GPU_TABLE):
        cuda_ms, triton_ms = (1.0, 2.0) if i % 2 else (3.0, 0.5)
        cases += [
            dict(name=op, impl="crossdiff_ext", backend="cuda", median_ms=cuda_ms),
            dict(name=op, impl="crossdiff_ext", backend="triton", median_ms=triton_ms),
            dict(name=op, impl="crossdiff_ext", backend="cuda", median_ms=0.01, shape=SHAPE),
        ]  # a sweep: ignored
    cases.append(dict(name="batch_topk", impl="torch.topk(flattened scores)", backend="torch", median_ms=0.001))
    return dict(
        suite="paper",
        device="NVIDIA H100 80GB HBM3",
        commit="abc",
        backends=["triton", "cuda"],
        complete=True,
        cases=cases,
    )


def test_auto_table_picks_the_faster_backend_per_op_at_the_main_shape():
    from crossdiff_ext import backends
    from kernels_bench import auto_table

    chosen = auto_table.choose(gpu_result())
    assert list(chosen) == list(backends.AUTO_GPU_TABLE)
    for i, (op, (backend, times)) in enumerate(chosen.items()):
        assert backend == ("cuda" if i % 2 else "triton"), (op, times)
        assert set(times) == {"cuda", "triton"}


def test_auto_table_refuses_partial_cpu_or_incomplete_results():
    import pytest

    from kernels_bench import auto_table

    for change, message in [(dict(complete=False), "partial"), (dict(suite="cpu", backends=["cpu"]), "GPU suite")]:
        with pytest.raises(ValueError, match=message):
            auto_table.choose(dict(gpu_result(), **change))
    result = gpu_result()
    result["cases"] = [c for c in result["cases"] if c["name"] != "latent_order" or "shape" in c]
    with pytest.raises(ValueError, match="latent_order"):
        auto_table.choose(result)


def test_auto_table_rewrites_only_its_devices_in_the_data_file(tmp_path, monkeypatch):
    import json

    from crossdiff_ext import backends
    from kernels_bench import auto_table

    tables, sources = auto_table.read_tables()  # the real file holds readable tables
    assert (tables, sources) == (backends.AUTO_GPU_TABLES, backends.AUTO_GPU_SOURCES)
    table = {op: b for op, (b, _) in auto_table.choose(gpu_result()).items()}
    first = auto_table.update(tables, sources, "GPU A", table, "kernels_bench/results/a.json")
    tables2, sources2 = auto_table.update(*first, "GPU B", dict(table, batch_topk="cuda"), "b.json")
    assert tables2 == dict(tables, **{"GPU A": table, "GPU B": dict(table, batch_topk="cuda")})
    assert sources2 == dict(sources, **{"GPU A": "kernels_bench/results/a.json", "GPU B": "b.json"})
    assert auto_table.update(tables2, sources2, "GPU A", table, "c.json")[1]["GPU A"] == "c.json"
    # --write: the whole file rewritten atomically, readable by backends, other devices' tables kept
    path = tmp_path / "auto_tables.json"
    path.write_text(auto_table.render(tables2, sources2))
    assert backends.read_auto_tables(str(path)) == (tables2, sources2)
    result_path = tmp_path / "result.json"
    result_path.write_text(json.dumps(dict(gpu_result(), device="GPU B")))
    monkeypatch.setattr(auto_table, "AUTO_TABLES_JSON", str(path))
    auto_table.main([str(result_path), "--write"])
    tables3, sources3 = backends.read_auto_tables(str(path))
    assert tables3 == dict(tables2, **{"GPU B": table}) and sources3["GPU A"] == "kernels_bench/results/a.json"
    assert sources3["GPU B"].endswith("(commit abc)") and sorted(os.listdir(tmp_path)) == [
        "auto_tables.json",
        "result.json",
    ]


def test_auto_tables_file_is_package_data():
    import ast

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "setup.py")) as fh:
        tree = ast.parse(fh.read())
    package_data = [
        ast.literal_eval(k.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for k in node.keywords
        if k.arg == "package_data"
    ]
    assert package_data and "auto_tables.json" in package_data[0]["crossdiff_ext"]
    with open(os.path.join(root, "MANIFEST.in")) as fh:
        assert "crossdiff_ext/auto_tables.json" in fh.read().split()


def test_breakdown_groups_our_ops_and_leaves_the_rest_as_other():
    import torch

    import crossdiff_ext as cx
    from kernels_bench import breakdown

    cc, x = suite.build(
        cx, dict(batch=64, n_models=2, d_model=16, dict_size=256, k=4), torch.device("cpu"), torch.float32
    )
    step = suite.ours_step(cx, cc, x, "cpu")
    step()
    b = breakdown.profile_step(step, "cpu", step_ms=123.0, steps=2)
    assert {
        "paired_encode",
        "batch_topk",
        "sparse_decode",
        "sparse_values_grad",
        "sparse_weight_grad",
        "optimizer",
    } <= set(b["groups_ms"])
    assert all(ms > 0 for ms in b["groups_ms"].values())
    assert b["step_ms"] == 123.0 and b["profiled_step_ms"] > sum(b["groups_ms"].values())
    assert math.isclose(b["other_ms"], b["profiled_step_ms"] - sum(b["groups_ms"].values()))
    assert b["top"] and b["top"][0]["self_ms"] >= b["top"][-1]["self_ms"]
    text = "\n".join(breakdown.markdown(b, "t"))
    assert "| batch_topk |" in text and "other" in text


def test_quick_suite_runs_end_to_end_and_writes_its_result(tmp_path, monkeypatch):
    # The whole suite at a tiny CPU shape: every case, the breakdown, Latent Scaling and one sweep shape (the
    # paper suite is the same code on a GPU); then a run whose budget is spent before the sweeps.
    import json

    import torch

    tiny = dict(batch=64, n_models=2, d_model=16, dict_size=256, k=4)
    monkeypatch.setitem(
        suite.SUITES, "quick", dict(device="cpu", dtype=torch.float32, shape=tiny, f_sweep=[512], k_sweep=[4])
    )
    result = suite.main(["--suite", "quick", "--reps", "1", "--out", str(tmp_path / "q")])
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["complete"] and saved["summary"] == result["summary"] and tuple(saved["summary"]) == suite.SUMMARY_KEYS
    names = {(c["name"], c["backend"]) for c in saved["cases"] if "median_ms" in c and "shape" not in c}
    for op in (
        "paired_encode",
        "batch_topk",
        "threshold_select",
        "sparse_decode",
        "sparse_values_grad",
        "latent_order",
        "sparse_weight_grad",
        "decoder_backward",
        "train_step",
        "inference_forward",
        "latent_scaling",
    ):
        assert (op, "cpu") in names, op
    sweep = [(c["shape"]["dict_size"], c["impl"]) for c in saved["cases"] if "shape" in c and "median_ms" in c]
    assert sweep == [
        (512, "crossdiff_ext CrossCoder"),
        (512, "dense PyTorch (paper code)"),
        (512, "dense PyTorch (paper code) + torch.compile"),
    ]
    assert saved["latent_scaling_throughput_vs_forward"]["cpu"] > 0
    assert "batch_topk" in saved["breakdown"]["cpu"]["groups_ms"]
    text = (tmp_path / "q.md").read_text()
    assert "Where our training step's time goes (cpu)" in text and "Partial result" not in text
    suite.main(["--suite", "quick", "--reps", "1", "--no-profile", "--budget-min", "0", "--out", str(tmp_path / "b")])
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["sweeps_skipped"] == [dict(tiny, dict_size=512)] and not saved["breakdown"]
    assert "Not run (time budget): F=512 k=4." in (tmp_path / "b.md").read_text()


def test_lean_suite_records_a_failing_backend_and_measures_the_rest(tmp_path, monkeypatch):
    # A first GPU run must keep every number it can: a kernel that crashes (a Triton compile error, say) or
    # disagrees with the reference becomes an error case, and the other cases, the peer and the files remain.
    import json

    import torch

    import crossdiff_ext as cx
    from crossdiff_ext import ops

    tiny = dict(batch=32, n_models=2, d_model=8, dict_size=64, k=2)
    monkeypatch.setitem(
        suite.SUITES, "quick", dict(device="cpu", dtype=torch.float32, shape=tiny, f_sweep=[], k_sweep=[])
    )
    real_topk = ops.batch_topk

    def broken_topk(f, w, K, relu=False):
        if cx.get_backend() == "cpu" and f.shape[0] == tiny["batch"]:
            raise TypeError("a kernel that fails to compile")
        return real_topk(f, w, K, relu)

    monkeypatch.setattr(ops, "batch_topk", broken_topk)
    suite.main(["--suite", "quick", "--lean", "--backends", "cpu", "--reps", "1", "--out", str(tmp_path / "q")])
    saved = json.loads((tmp_path / "q.json").read_text())
    errors = {c["name"]: c["error"] for c in saved["cases"] if "error" in c}
    assert errors["batch_topk"] == "TypeError: a kernel that fails to compile"
    timed = {c["name"] for c in saved["cases"] if "median_ms" in c}
    assert {"paired_encode", "sparse_decode", "decoder_backward", "train_step"} <= timed and "batch_topk" in timed
    assert "error" in saved["selection_kernels"]["cpu"] and saved["complete"]
    assert "TypeError: a kernel that fails to compile" in (tmp_path / "q.md").read_text()
