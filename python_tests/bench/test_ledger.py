"""The traffic ledger (kernels_bench/ledger.py): its launch model follows the code, and its resource reader parses
what cuobjdump prints."""

import glob
import os

import pytest

from crossdiff_ext import _extension
from kernels_bench import ledger

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def small():
    return ledger.ledger("small")


def test_every_backend_has_every_op_and_a_training_step(small):
    for entry in small["backends"].values():
        assert set(entry["ops"]) == {
            "paired_encode",
            "batch_topk",
            "sparse_decode",
            "sparse_values_grad",
            "latent_order",
            "sparse_weight_grad",
        }
        for op in entry["ops"].values():
            t = op["totals"]
            assert t["launches"] == len(op["launches"]) > 0
            assert t["read"] == sum(x["read"] for x in op["launches"])
            assert op["over_floor"] == pytest.approx((t["read"] + t["written"]) / op["floor_bytes"])


def test_the_training_step_sorts_by_latent_once(small):
    # ops/autograd.py computes the codes' latent order once per step (python_tests/layer/test_crosscoder.py checks
    # the layer does); the ledger must count what runs.
    assert ledger.ORDER_PER_STEP == 1
    for entry in small["backends"].values():
        order_kernels = {x["kernel"] for x in entry["ops"]["latent_order"]["launches"]}
        in_step = [x for x in entry["train_step"]["launches"] if x["op"] == "latent_order"]
        assert len(in_step) == len(order_kernels)


def test_batch_topk_passes_over_f(small):
    for backend, entry in small["backends"].items():
        passes = entry["ops"]["batch_topk"]["totals"]["f_passes"]
        assert passes == 2, backend  # the usual case: level 0 and the stage pass


def test_the_encoder_writes_f_once_and_no_relu_pass_reads_it(small):
    # The crosscoder's encoder writes pre-activations; the selection applies the ReLU as it reads them.
    for backend, entry in small["backends"].items():
        encode = entry["ops"]["paired_encode"]
        assert encode["totals"]["f_passes"] == 0, backend
        assert [x["kernel"] for x in encode["launches"]] == [encode["launches"][0]["kernel"]], backend


def test_resources_come_from_a_build_of_the_current_sources(tmp_path):
    # A build embeds its source hash; a stale one (another commit's .gpu_build) is skipped, not read.
    from crossdiff_ext._build_hash import source_hash

    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "op.cpp").write_text("int f() { return 1; }\n")
    stale, current = tmp_path / "stale.so", tmp_path / "current.so"
    stale.write_bytes(b"\0ELF..." + b"0123456789abcdef" + b"...")
    current.write_bytes(b"\0ELF..." + source_hash(str(csrc)).encode() + b"...")
    missing = str(tmp_path / "missing.so")
    assert ledger.current_build([missing, str(stale), str(current)], str(csrc)) == (str(current), [str(stale)])
    assert ledger.current_build([str(stale)], str(csrc)) == (None, [str(stale)])


SAMPLE = """
Fatbin elf code:
================
arch = sm_80
Resource usage:
 Function _ZN3foo6kernelEv:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90a
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN3foo6kernelEv:
  REG:38 STACK:8 SHARED:2208 LOCAL:4 CONSTANT[0]:632 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_is_parsed_per_arch():
    rows = ledger.parse_resource_usage(SAMPLE)
    assert rows == [
        dict(arch="sm_80", kernel="_ZN3foo6kernelEv", registers=40, stack=0, shared=0, local=0),
        dict(arch="sm_90a", kernel="_ZN3foo6kernelEv", registers=38, stack=8, shared=2208, local=4),
    ]


def test_cuda_resources_of_the_build_name_every_kernel():
    so = glob.glob(os.path.join(ROOT, "crossdiff_ext", "_C*.so"))
    if not so or not _extension.load().cuda_kernels():
        pytest.skip("the in-tree extension has no CUDA kernels (built without nvcc)")
    if ledger._tool("cuobjdump") is None:
        pytest.skip("no cuobjdump (on the PATH or bundled with triton)")
    names = {r["kernel"].split("<")[0] for r in ledger.cuda_resources(so[0])}
    for kernel in ("decode_kernel", "values_grad_kernel", "weight_grad_kernel"):
        assert kernel in names, sorted(names)
    assert any("histogram" in n for n in names), sorted(names)
