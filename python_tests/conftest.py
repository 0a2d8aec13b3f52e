"""Shared fixtures: the backends under test, per-dtype tolerances, exact-arithmetic inputs, NaN poisoning."""

import math
import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter (it must be on before triton is imported; the
# package imports triton only on the first Triton launch). A GPU machine runs them compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Exact comparisons of half/bf16 encoder outputs against the fp32-accumulated reference need cuBLAS to reduce
    # in fp32 too: PyTorch lets it reduce split-K partial sums in half/bf16 by default (docs/backends.md).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    # One Triton encoder config: autotuning would time every config for every new shape the tests draw.
    os.environ.setdefault("CROSSDIFF_TRITON_ENCODE_CONFIG", "first")

import crossdiff_ext as cx  # noqa: E402

# Fresh random inputs every run (CONTRIBUTING.md, test rules); the seed is printed in the header and can be replayed.
SEED = int(os.environ.get("CROSSDIFF_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"crossdiff test seed: {SEED} (replay with CROSSDIFF_TEST_SEED={SEED})"


def rng(salt):
    """A generator for one test case: the run's seed mixed with a per-case salt."""
    return torch.Generator().manual_seed((SEED * 1_000_003 + salt) % (2**63))


# Backends compared against "reference" in every op test. The CPU kernels always; GPU backends where built and
# a GPU exists; "triton" on the CPU only under TRITON_INTERPRET=1.
KERNEL_BACKENDS = [b for b in cx.available_backends() if b not in ("auto", "reference")]


def backend_device(name):
    if name == "cpu":
        return "cpu"
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return "cuda"


def backend_params():
    params = []
    for name in KERNEL_BACKENDS:
        marks = [pytest.mark.gpu] if backend_device(name) == "cuda" else []
        if backend_device(name) == "cuda" and not torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="needs a CUDA GPU"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


# rtol/atol against the fp32 reference, by dtype. Low precision compares after both sides rounded once.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
DTYPES = list(TOLERANCES)


def dtypes_for(name):
    # Triton's interpreter has no real bf16 arithmetic (docs/backends.md).
    if name == "triton" and backend_device(name) == "cpu":
        return [torch.float32, torch.float16]
    return DTYPES


def close(actual, expected, dtype=None, scale=1.0):
    tol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (16 wide): each matmul then skips the thread pool's hand-off,
    which costs far more than the matmul on a busy machine (a module of 28 such tests: 50 s -> 10 s on a shared
    2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def plant_specials(t, g, nan=0, inf=0, neg_inf=0, neg_zero=0, zero=0):
    """Writes NaN, +inf, -inf, -0 and 0 (that many of each) at distinct random places of the CPU tensor t; returns t."""
    flat = t.view(-1)
    places = torch.randperm(flat.numel(), generator=g)
    start = 0
    for value, n in ((math.nan, nan), (math.inf, inf), (-math.inf, neg_inf), (-0.0, neg_zero), (0.0, zero)):
        flat[places[start : start + n]] = value
        start += n
    return t


def grid_tensor(shape, low, high, denominator, dtype, device="cpu", generator=None):
    """Random values k / denominator for integer k in [low, high]: products and sums of a few of these are exact
    in fp32, so every backend and the reference round the same exact value and must agree bit for bit."""
    k = torch.randint(low, high + 1, shape, generator=generator)
    return (k.float() / denominator).to(dtype=dtype, device=device)


@pytest.fixture
def poison():
    """Uninitialised memory reads back as NaN (floats) / max int: a kernel that skips a write fails."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    cx.set_backend("auto")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Paths of a tiny random base and chat transformers model with one tokenizer (tiny_models.py)."""
    import tiny_models

    return tiny_models.make_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture
def data(tmp_path):
    """A small JSONL corpus of texts and conversations in the tiny models' vocabulary (tiny_models.py)."""
    import tiny_models

    return tiny_models.write_corpus(tmp_path)
