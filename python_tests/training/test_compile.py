"""torch.compile(fullgraph=True) of the training step on every backend: the C++ kernels and Triton under its
interpreter on CPU tensors, the CUDA ops and compiled Triton on a GPU. The step traces without graph breaks and
matches eager, including the threshold buffer update."""

import pytest
import torch
from conftest import backend_device, backend_params

import crossdiff_ext as cx


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("activation,dense_code_density", [("batch_topk", 1.0), ("relu", 1.0), ("relu", 0.0)])
def test_training_step_compiles_fullgraph(name, activation, dense_code_density):
    device = backend_device(name)
    cx.set_backend(name)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    k = 4 if activation == "batch_topk" else None
    kwargs = dict(k=k, activation=activation, threshold_start_step=0, dense_code_density=dense_code_density)
    eager = cx.CrossCoder(12, 48, 2, **kwargs, device=device)
    compiled_cc = cx.CrossCoder(12, 48, 2, **kwargs, device=device)
    compiled_cc.load_state_dict(eager.state_dict())

    def step(cc, x):
        out = cc(x)
        return (x - out.recon).norm(dim=-1).mean(), out.codes.values

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for _ in range(3):
        x = torch.randn(10, 2, 12, generator=g).to(device)
        loss_e, values_e = step(eager, x)
        loss_c, values_c = compiled(compiled_cc, x)
        loss_e.backward()
        loss_c.backward()
        torch.testing.assert_close(loss_c, loss_e)
        torch.testing.assert_close(values_c, values_e)
        for (n, p_e), p_c in zip(eager.named_parameters(), compiled_cc.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, msg=n)
        with torch.no_grad():
            for p_e, p_c in zip(eager.parameters(), compiled_cc.parameters()):
                p_e -= 0.01 * p_e.grad
                p_c -= 0.01 * p_c.grad
                p_e.grad = p_c.grad = None
    torch.testing.assert_close(compiled_cc.threshold, eager.threshold)
    assert (float(eager.threshold) > 0) == (activation == "batch_topk")
