"""Lipschitz clipping: private step time against non-private training of the same Lipschitz network.

Run: python benchmarks/lipschitz_step.py  (writes benchmarks/lipschitz_step.json; medians of 50 steps after
10 warm-up steps, 3 rounds, 2 threads). Both runs keep the network constrained by the same projection after
each step, so the ratio is the cost of privacy alone (the moved gradient, the constraint check, the noise).
"""
import json
import sys
import time, statistics, torch
from torch.utils.data import DataLoader, TensorDataset
from dpengine import PrivacyEngine
from dpengine.lipschitz import GroupSort, InputNormClip, SpectralLinear, TemperatureCrossEntropy, attach_projection
torch.set_num_threads(2)
def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(InputNormClip(8.0), SpectralLinear(64, 128), GroupSort(2), SpectralLinear(128, 10))
x = torch.randn(1280, 64); y = torch.randint(0, 10, (1280,))
loss = TemperatureCrossEntropy(0.125)
def steps(model, opt, batches, n=60):
    ts = []
    for i, (xb, yb) in zip(range(n), batches):
        t = time.perf_counter(); opt.zero_grad(); loss(model(xb), yb).backward(); opt.step(); ts.append(time.perf_counter() - t)
    return statistics.median(ts[10:])
res = {}
for rnd in range(3):
    m = net(); opt = torch.optim.Adam(m.parameters(), lr=1e-2); attach_projection(opt, m)
    dl = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    res.setdefault("nonprivate", []).append(steps(m, opt, (b for _ in range(100) for b in dl)))
    m = net(); opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m, opt, dl = PrivacyEngine(seed=0).make_private(module=m, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=128),
        noise_multiplier=1.0, clipping="lipschitz", loss_lipschitz=loss.lipschitz)
    res.setdefault("private", []).append(steps(m, opt, (b for _ in range(100) for b in dl)))
np_, p_ = statistics.median(res["nonprivate"]), statistics.median(res["private"])
out = {"model": "InputNormClip-SpectralLinear(64,128)-GroupSort-SpectralLinear(128,10)", "batch": 128, "threads": 2, "nonprivate_ms": np_ * 1e3, "private_ms": p_ * 1e3, "ratio": p_ / np_, "rounds_s": res}
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/lipschitz_step.json", "w"), indent=1)
print(f"lipschitz MLP 64-128-10, batch 128, 2 threads: non-private (with projection) {np_*1e3:.2f} ms, private {p_*1e3:.2f} ms, ratio {p_/np_:.2f}x; rounds {res}")
