"""Train the small Fashion-MNIST CNN shipped as ``captum_gig/weights/fashion_mnist_cnn.safetensors``.

    nice python benchmarks/paper/train_fashion_mnist.py            # 4 epochs; ~10 min on 2 idle CPU cores (44 min measured on a heavily shared machine)

Deterministic for a seed on CPU (single data order, seeded init). Trains with
AdamW and a one-cycle learning rate on the 60,000 training images (random
horizontal flips only), evaluates on the 10,000 test images, and writes the
weights (float32 safetensors, ~0.3 MB) plus a JSON note with the accuracy.
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from captum_gig._io import atomic_write_text
from captum_gig.zoo import FashionMNISTCNN, fashion_mnist, fashion_mnist_weights_path


def evaluate(model, x, y, batch=1000):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=fashion_mnist_weights_path())
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    model = FashionMNISTCNN()
    steps = args.epochs * ((len(x_train) + args.batch_size - 1) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = evaluate(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(x_train):.4f}  test acc {acc:.4f}  "
              f"({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    acc = evaluate(model, x_test, y_test)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    note = {"test_accuracy": acc, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "train_seconds": round(time.time() - t0, 1), "widths": list(model.widths)}
    tmp = args.out + ".tmp"
    save_file(state, tmp, metadata={"captum_gig": json.dumps(note)})
    os.replace(tmp, args.out)
    atomic_write_text(os.path.splitext(args.out)[0] + ".json", json.dumps(note, indent=2) + "\n")
    print(f"test accuracy {acc:.4f}; wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
