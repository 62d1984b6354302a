"""amp=bf16 in both pi-layer implementations, in-place products included (mutation audit: the reference
pi-layer's backward outside the forward's autocast, and the chunked layer's accumulating ``addmm_`` left in
float32 under autocast, passed every earlier test: it checked the chunked layer and out-of-place products)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tttlab.pilimit import precision
from tttlab.pilimit.nets import InfMLP

PRODUCTS = {"mm", "addmm", "bmm", "addmm_", "baddbmm", "baddbmm_", "addbmm", "addbmm_", "matmul", "dot"}


class Products(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.phase, self.seen = "fwd", set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in PRODUCTS:
            self.seen.add((self.phase, func.overloadpacket.__name__, out.dtype))
        return out


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize("chunk_size", [4, None])
def test_every_product_of_both_impls_is_bfloat16_forward_and_backward(impl, chunk_size):
    torch.manual_seed(0)
    net = InfMLP(12, 3, r=6, depth=2, chunk_size=chunk_size, impl=impl)
    x, y = torch.randn(5, 12), torch.randint(0, 3, (5,))
    rec = Products()  # r=6 rows: two chunks at chunk_size 4, one without chunking
    with rec:
        with precision.autocast("cpu", "bf16"):
            loss = F.cross_entropy(net(x).float(), y)
        rec.phase = "bwd"
        loss.backward()
    assert {p for p, _, _ in rec.seen} == {"fwd", "bwd"}, rec.seen
    assert {d for _, _, d in rec.seen} == {torch.bfloat16}, sorted(map(str, rec.seen))
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
