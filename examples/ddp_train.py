"""Data-parallel private training with torchrun: DDP + DistributedSampler, made private by dpengine.

    torchrun --nproc_per_node 2 examples/ddp_train.py --epochs 10     # 2 CPU processes (gloo)
    torchrun --nproc_per_node 8 examples/ddp_train.py --backend nccl  # 8 GPUs

Every rank clips its own samples; dpengine all-reduces the clipped sums once per step, rank 0's noise
draw included, so the ranks end each step with identical parameters and the accountant records the
global sample rate. Rank 0 prints one JSON line: world size, epsilon, test accuracy.

Data: scikit-learn's handwritten digits (shipped with scikit-learn, nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from dpengine import PrivacyEngine


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))  # the same split on every rank
    test, train = order[: len(x) // 5], order[len(x) // 5:]
    x = x / 8.0 - 1.0  # pixels 0..16 to [-1, 1]: scaled by the known range, not by statistics of private data
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="expected batch per rank")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    parser.add_argument("--secure-mode", action="store_true", help="OS CSPRNG noise and sampling (deployment)")
    args = parser.parse_args()

    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)

    train, test = digits()
    torch.manual_seed(0)  # DDP broadcasts rank 0's parameters anyway; make_private checks they agree
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=DistributedSampler(train))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    # the secure engine takes no seed; a research run is reproducible with seed=... on every rank
    engine = PrivacyEngine(secure_mode=args.secure_mode, seed=None if args.secure_mode else 0)
    ddp, optimizer, loader = engine.make_private_with_epsilon(
        module=ddp, optimizer=optimizer, data_loader=loader, target_epsilon=args.epsilon, target_delta=args.delta,
        epochs=args.epochs, max_grad_norm=args.max_grad_norm, grad_sample_mode="bk")
    criterion = nn.CrossEntropyLoss()

    steps = int(args.epochs * len(loader) + 0.999999)
    done = 0
    while done < steps:
        for x, y in loader:  # this rank's Poisson batch of its own shard (may be empty)
            optimizer.zero_grad()
            criterion(ddp(x.to(device)), y.to(device)).backward()
            optimizer.step()  # all ranks: clipped sums all-reduced, noise once, identical update
            done += 1
            if done == steps:
                break

    if rank == 0:
        model.eval()
        with torch.no_grad():
            x, y = test.tensors
            accuracy = float((model(x.to(device)).argmax(1).cpu() == y).float().mean())
        print(json.dumps({"world_size": world, "steps": steps, "sample_rate": optimizer.sample_rate,
                          "expected_global_batch": optimizer.expected_batch_size,
                          "noise_multiplier": optimizer.noise_multiplier,
                          "epsilon": engine.get_epsilon(args.delta), "delta": args.delta,
                          "test_accuracy": accuracy}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
