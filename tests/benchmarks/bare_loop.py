"""A bare PyTorch training loop: the yardstick of ``bench_overhead.py``.

    python tests/benchmarks/bare_loop.py <data.pt> <times.json> [epochs]

Trains timm's ``resnet10t`` from scratch as the default job does (batch 64, reshuffled every
epoch; AdamW with the fused kernel the project uses, lr 0.002, weight decay 0.05 on weights only; linear warm-up over 10 % of the steps,
then cosine to 1 %; dropout 0.1 before the head), validates every epoch, keeps the best weights,
saves them, and tests them once. No framework: plain tensors prepared by the benchmark from the
project's own data module (the same split, the same pixels). Writes the wall-clock time of the
first training step, each epoch's training time, the accuracies, and the same phases as the
project's ``epoch_timer.py`` (validation, the best weights kept and saved, test).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time

import timm
import torch
import torch.nn.functional as F


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # biases and norm layers
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=True)  # the project's default kernel


def _warmup_cosine(total: int, warmup_fraction: float = 0.1, min_ratio: float = 0.01):
    warmup = max(1, round(total * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    right = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return right / len(x)


def main(data_path: str, out_path: str, epochs: int = 5, batch: int = 64) -> None:
    data = torch.load(data_path, weights_only=True)
    x, y = data["train_x"], data["train_y"]
    torch.manual_seed(1)
    model = timm.create_model("resnet10t", num_classes=int(data["classes"]), drop_rate=0.1)
    optimizer = _optimizer(model, lr=0.002, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
    record = {"first_step": None, "epochs": [], "val_acc": [], "n_train": len(x), "sanity": 0.0}
    record["val"] = record["checkpoints"] = 0.0
    best, best_acc = None, -1.0
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(x)).split(batch):
            if record["first_step"] is None:
                record["first_step"] = time.time()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        record["epochs"].append(time.perf_counter() - start)
        mark = time.perf_counter()
        acc = _accuracy(model, data["val_x"], data["val_y"])
        record["val_acc"].append(acc)
        record["val"] += time.perf_counter() - mark
        mark = time.perf_counter()
        if acc > best_acc:
            best, best_acc = copy.deepcopy(model.state_dict()), acc
        record["checkpoints"] += time.perf_counter() - mark
    mark = time.perf_counter()
    torch.save(best, out_path + ".best.pt")
    record["checkpoints"] += time.perf_counter() - mark
    record["fit_end"] = record["test_start"] = time.time()
    model.load_state_dict(best)
    record["test_acc"] = _accuracy(model, data["test_x"], data["test_y"])
    record["test_end"] = record["exit"] = time.time()
    with open(out_path, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
