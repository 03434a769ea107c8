"""Run by .ci/wheel-check from outside the checkout, in a venv holding only the built wheel and its requirements:
the installed package (not a checkout) computes a tiny two-context op through every impl, and they agree."""
import importlib.metadata
import os
import pathlib
import sys

import torch

import pydistill
from pydistill import token_stats

site = pathlib.Path(pydistill.__file__).resolve().parents[1]
assert site.name == "site-packages", f"pydistill imported from {pydistill.__file__}, not from the installed wheel"
assert not (site / "kernels").exists(), "the wheel installed a top-level `kernels` package"
assert (site / "pydistill" / "py.typed").exists(), "py.typed missing from the wheel"
assert importlib.metadata.version("pydistill-fused") == pydistill.__version__, "version not single-sourced"
assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 so the Triton folds run on the CPU"

torch.manual_seed(0)
n, h, v = 7, 16, 300
hidden = torch.randn(n, h, requires_grad=True)
weight = (torch.randn(v, h) / h ** 0.5).requires_grad_()
teacher = torch.randn(n, h)
targets = torch.randint(0, v, (n,))
results = {}
for impl in ("eager", "torch", "triton"):
    stats = token_stats(hidden, weight, targets=targets, teacher_hidden=teacher, divergence="jsd", beta=0.5,
                        impl=impl)
    grads = torch.autograd.grad((stats.logp + stats.entropy + stats.divergence).sum(), (hidden, weight))
    results[impl] = [stats.logp, stats.entropy, stats.divergence, *grads]
for impl in ("torch", "triton"):
    for got, want in zip(results[impl], results["eager"]):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)
print(f"wheel check: pydistill-fused {pydistill.__version__} from {site}, impls eager/torch/triton agree "
      f"(python {sys.version.split()[0]}, torch {torch.__version__})")
