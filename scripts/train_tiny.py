"""Train the embedded default model and its metric classifier on scikit-learn's bundled digits.

    python scripts/train_tiny.py --steps 5000 --out checkpoints

1. A small classifier (eval.digits.DigitsClassifier) on a fixed 75/25 split of the 1,797 digits,
   with +-1 pixel shifts as augmentation; its held-out accuracy is recorded.
2. A class-conditional pixel-space DiT (8x8x1, patch 2 -> 16 tokens, hidden 128, depth 6,
   4 heads) with DiT's diffusion (1000 linear betas, learned sigma, hybrid eps-MSE + VLB loss,
   10 % label dropout for guidance), AdamW, and an EMA of the weights, which is what ships.

Deterministic given --seed (and the same torch build and thread count): all randomness comes
from seeded generators, and the step count, not the clock, ends training.
Writes dit-tiny-digits.pt (bare EMA state dict), digits-classifier.pt and dit-tiny-digits.json
(config, data provenance, command, losses, accuracy, sha256 of both files).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval.digits import DigitsClassifier, digits_to_unit, load_digits_uint8
from rfc.models.dit import DiT, DiTConfig
from rfc.samplers.diffusion import GaussianDiffusion
from rfc.utils.files import file_digest

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                        class_dropout_prob=0.1, num_classes=10, learn_sigma=True)


def random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each (B, 1, 8, 8) image by -1..1 pixels in each direction, padding with background."""
    padded = F.pad(x, (1, 1, 1, 1), value=float(x.min()))
    dx = torch.randint(0, 3, (x.shape[0],), generator=g)
    dy = torch.randint(0, 3, (x.shape[0],), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(x.shape[0])])


def train_classifier(images_u8: np.ndarray, labels: np.ndarray, seed: int,
                     epochs: int) -> tuple[DigitsClassifier, dict]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g).numpy()
    n_train = int(0.75 * len(labels))
    tr, te = perm[:n_train], perm[n_train:]
    torch.manual_seed(seed)  # the layers' default init uses the global RNG; seed it for determinism
    clf = DigitsClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    x_all = torch.from_numpy(images_u8)
    y_all = torch.from_numpy(labels)
    for _ in range(epochs):
        order = torch.from_numpy(tr)[torch.randperm(len(tr), generator=g)]
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            x = DigitsClassifier.prepare(x_all[idx])
            x = random_shift(x, g)
            loss = F.cross_entropy(clf.head(clf.body(x)), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(x_all[te]).argmax(1) == y_all[te]).float().mean().item()
        train_acc = (clf(x_all[tr]).argmax(1) == y_all[tr]).float().mean().item()
    return clf, {"heldout_accuracy": acc, "train_accuracy": train_acc, "n_train": len(tr), "n_heldout": len(te),
                 "epochs": epochs, "split_seed": seed}


def train_dit(images: np.ndarray, labels: np.ndarray, args: argparse.Namespace) -> tuple[DiT, dict]:
    torch.manual_seed(args.seed)
    model = DiT(TINY_CONFIG)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = GaussianDiffusion(1000, None, learn_sigma=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    x_all = torch.from_numpy(digits_to_unit(images)).unsqueeze(1)  # (N, 1, 8, 8) in [-1, 1]
    y_all = torch.from_numpy(labels)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(y_all), (args.batch_size,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        y = model.y_embedder.token_drop(y, generator=g)
        t = torch.randint(diffusion.num_timesteps, (args.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = diffusion.q_sample(x0, t, noise)
        loss = diffusion.training_losses(model(x_t, t, y), x0, x_t, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))  # warm-up so early EMA is not all init
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            recent = float(np.mean(losses[-args.log_every :]))
            print(f"step {step}/{args.steps}  loss {recent:.4f}  {time.perf_counter() - t0:.0f}s", flush=True)
    stats = {"final_loss_mean_last_100": float(np.mean(losses[-100:])), "train_seconds": time.perf_counter() - t0}
    return ema.eval(), stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--classifier-epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it bit-wise)")
    p.add_argument("--log-every", type=int, default=250)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)

    images_u8, labels = load_digits_uint8()
    from sklearn.datasets import load_digits

    raw = load_digits().images  # 0..16 integers, the model trains on these scaled to [-1, 1]

    clf, clf_stats = train_classifier(images_u8, labels, args.seed, args.classifier_epochs)
    print(f"classifier held-out accuracy {clf_stats['heldout_accuracy']:.4f}", flush=True)
    clf_path = args.out / "digits-classifier.pt"
    torch.save(clf.state_dict(), clf_path)

    ema, dit_stats = train_dit(raw, labels, args)
    dit_path = args.out / "dit-tiny-digits.pt"
    torch.save(ema.state_dict(), dit_path)

    meta = {
        "command": "python scripts/train_tiny.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_config": TINY_CONFIG.__dict__,
        "diffusion": "1000 linear betas 1e-4..0.02, learned sigma, loss = eps MSE + VLB (mean detached)",
        "data": "scikit-learn load_digits(): 1,797 8x8 grey images, 10 classes (UCI optical recognition of "
                "handwritten digits, test set), pixel values 0..16 scaled to [-1, 1]",
        "classifier": clf_stats,
        "dit": dit_stats,
        "files": {dit_path.name: file_digest(dit_path), clf_path.name: file_digest(clf_path)},
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    (args.out / "dit-tiny-digits.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["files"], indent=2))


if __name__ == "__main__":
    main()
