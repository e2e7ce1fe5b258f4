"""LightningDiT under torch.compile(fullgraph=True) with Inductor's C++ code generation (tens of seconds of
compilation on a CPU, in Inductor's compile workers): equal to eager. The rest: tests/unit/test_lightningdit.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from test_lightningdit import randomize, tiny


def test_compile_fullgraph_matches_eager():
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("g++") is None:
        pytest.skip("no C/C++ compiler on this platform: inductor cannot generate CPU kernels")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize(tiny(use_qknorm=True)).eval()
    x = torch.randn(2, 4, 4, 4)
    t, y = torch.tensor([0.05, 0.6, 0.05, 0.6]), torch.tensor([3, 7, 10, 10])
    xx = torch.cat([x, x])
    with torch.no_grad():
        eager = model(x, t[:2], y[:2])
        compiled = torch.compile(model, fullgraph=True)(x, t[:2], y[:2])
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
        # the CFG path (torch.where interval) also traces without graph breaks
        cfg_fn = torch.compile(model.forward_with_cfg, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(
            cfg_fn(xx, t, y, 4.0, True, 0.1), model.forward_with_cfg(xx, t, y, 4.0, True, 0.1), atol=1e-5, rtol=1e-5
        )
    # training mode (label dropout with torch.rand) traces too
    model.train()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t[:2], y[:2])
    assert out.shape == x.shape
    torch._dynamo.reset()
