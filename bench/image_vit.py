"""2:4 sparsity of a small vision transformer trained here on scikit-learn's digits.

No pretrained ViT can be downloaded on this machine, so this trains one: a transformers
``ViTForImageClassification`` (4 layers, hidden 128, 4 heads, MLP 256, float32) on scikit-learn's
bundled 8x8 digits (1797 images, 10 classes), upsampled to 32x32 and cut into 4x4 patches (64 patches
and the class token). The split is fixed (``train_test_split(test_size=0.25, stratify, random_state=0)``:
1347 training and 450 test images) and so is the training (seed 0); the trained model is cached
outside the repository (``--cache``) and its test accuracy is printed and recorded.

Then, per seed (the calibration images and the learner's randomness; the trained model is the
same), Wanda 2:4 of every linear of the encoder (q/k/v/o, fc1, fc2 of every layer; the patch
embedding and the classifier stay dense) with

- no permutation (``method=identity``),
- the RIA-style heuristic (``method=ria``, exact fold),
- the learned permutation (``method=learned``, ``objective=end_to_end``, exact fold: cross-entropy
  on the calibration images' labels plus alpha times the hidden-state distillation), at the
  configuration's 80 steps of ``--per-step`` images and for 240 steps of 32 images,

and, as the bound, unstructured 50% Wanda. Every pruned model is folded (a standard
``ViTForImageClassification``) and evaluated on the 450 test images: top-1 accuracy and mean
cross-entropy. "Recovered" is the share of the accuracy lost to 2:4 that a method wins back:
``(acc - acc_2:4) / (acc_dense - acc_2:4)``.

Run: ``flock /tmp/nmperm-cpu.lock python bench/image_vit.py`` (about 3 minutes on 2 cores, the
training included); writes ``bench/results/image-vit-digits-2of4-3seeds.{json,md}``. ``--set FIELD=VALUE``
sets ``PermuteConfig`` fields of the learned rows (``--set lr_end=0.01 --output /tmp/vit-lr-end-0.01``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from result_files import write_pair  # noqa: E402

from nmperm_plugin import PermuteConfig, permute_  # noqa: E402
from nmperm_plugin.core.nm import NMPattern, is_nm  # noqa: E402
from recipes import parse_overrides  # noqa: E402

METHODS = {
    "2:4, no permutation": dict(method="identity"),
    "2:4, RIA-style permutation": dict(method="ria"),
    "2:4, learned (end_to_end)": dict(method="learned", objective="end_to_end"),
    "2:4, learned (end_to_end), 240 steps of 32": dict(
        method="learned", objective="end_to_end", end_to_end_steps=240, sequences_per_step=32
    ),
    "unstructured 50% (bound)": dict(method="identity", unstructured=True),
}
NO_PERM, BOUND = "2:4, no permutation", "unstructured 50% (bound)"
MODEL = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
    image_size=32, patch_size=4, num_channels=1, num_labels=10,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed split of scikit-learn's digits: images ``[N, 1, 32, 32]`` in [-1, 1], labels ``[N]``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False) * 2 - 1
    labels = torch.tensor(data.target)
    train, test = train_test_split(torch.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0)
    return images[train], labels[train], images[test], labels[test]


def shifted(images: torch.Tensor, generator: torch.Generator, most: int = 2) -> torch.Tensor:
    """Each image moved by up to ``most`` pixels in each direction (the training augmentation)."""
    padded = F.pad(images, (most,) * 4, value=-1.0)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * most + 1, (len(images), 2), generator=generator)
    return torch.stack([p[:, y : y + size, x : x + size] for p, (y, x) in zip(padded, offsets.tolist(), strict=True)])


def train(images: torch.Tensor, labels: torch.Tensor, epochs: int, log) -> torch.nn.Module:
    """A ViT trained from scratch (seed 0): AdamW, cosine learning rate, batches of 64, shifted images."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**MODEL))
    generator = torch.Generator().manual_seed(0)
    batches = -(-len(images) // 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=epochs * batches, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for index in order.split(64):
            loss = model(shifted(images[index], generator), labels=labels[index]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss) * len(index)
        log(f"epoch {epoch + 1}/{epochs}: training loss {total / len(images):.4f}")
    return model.eval()


def trained_model(args, images, labels, log) -> tuple[torch.nn.Module, float, bool]:
    """The cached trained model, or a new one; the seconds its training took; whether it was cached."""
    from transformers import ViTForImageClassification

    cache = Path(args.cache)
    if (cache / "config.json").exists():
        seconds = json.loads((cache / "training.json").read_text())["seconds"]
        log(f"trained model from {cache} (trained in {seconds:.0f} s)")
        return ViTForImageClassification.from_pretrained(cache).eval(), seconds, True
    start = time.monotonic()
    model = train(images, labels, args.epochs, log)
    model.save_pretrained(cache)
    seconds = time.monotonic() - start
    (cache / "training.json").write_text(json.dumps({"seconds": seconds, "epochs": args.epochs}))
    return model, seconds, False


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 accuracy (%) and mean cross-entropy on ``images``."""
    logits = torch.cat([model(pixel_values=x).logits for x in images.split(150)])
    accuracy = 100.0 * float((logits.argmax(-1) == labels).float().mean())
    return {"top1": round(accuracy, 2), "cross_entropy": round(float(F.cross_entropy(logits, labels)), 4)}


def calibration(images, labels, count: int, seed: int) -> list[dict]:
    """``count`` training images drawn with ``seed``, in batches of 32, with their labels."""
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return [{"pixel_values": images[i], "labels": labels[i]} for i in index.split(32)]


def prune(dense, data, method: dict, args, seed: int) -> tuple[torch.nn.Module, dict]:
    """A copy of ``dense`` pruned (Wanda 2:4 or unstructured) with ``method``, folded; its seconds and
    the share of the Wanda score its masks keep (``retained_ratio``, mean over layers)."""
    model = copy.deepcopy(dense)
    settings = dict(sequences_per_step=args.per_step, select_sequences=args.select, end_to_end_steps=args.steps)
    learned = parse_overrides(args.set) if method["method"] == "learned" else {}
    config = PermuteConfig(pattern="2:4", scorer="wanda", fold="exact", seed=seed, **(settings | method | learned))
    start = time.monotonic()
    sidecar, _ = permute_(model, data, config)
    seconds = time.monotonic() - start
    if not method.get("unstructured"):
        bad = [n for n in sidecar.frames if not is_nm(model.get_submodule(n).weight, NMPattern(2, 4))]
        if bad:
            raise AssertionError(f"not 2:4 after folding: {bad}")
    figures = {"seconds": round(seconds, 1)}
    if not method.get("unstructured"):  # the sidecar's ratio is the N:M one, not the unstructured mask's
        figures["retained_ratio"] = round(sidecar.figures["retained_ratio"], 4)
    return model, figures


def recovered(value: float, dense: float, floor: float) -> float | None:
    """The share (%) of the 2:4 loss a method wins back; None when 2:4 lost nothing."""
    return None if dense == floor else round(100.0 * (value - floor) / (dense - floor), 1)


def shares(rows: list[dict], dense: dict, name: str, key: str) -> list[float]:
    """Per seed, the share of the 2:4 loss in ``key`` (top-1 or cross-entropy) that ``name`` recovers."""
    floors = {r["seed"]: r[key] for r in rows if r["method"] == NO_PERM}
    found = [recovered(r[key], dense[key], floors[r["seed"]]) for r in rows if r["method"] == name]
    return [share for share in found if share is not None]


def summary(rows: list[dict], dense: dict) -> dict:
    """Per method: median, min and max over seeds of accuracy, cross-entropy and the recovered shares."""
    out = {}
    for name in METHODS:
        mine = [r for r in rows if r["method"] == name]
        out[name] = {
            key: {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
            for key, vals in (
                ("top1", [r["top1"] for r in mine]),
                ("cross_entropy", [r["cross_entropy"] for r in mine]),
                ("recovered_percent", shares(rows, dense, name, "top1")),
                ("cross_entropy_recovered_percent", shares(rows, dense, name, "cross_entropy")),
                ("seconds", [r["seconds"] for r in mine]),
                ("retained_ratio", [r["retained_ratio"] for r in mine if "retained_ratio" in r]),
            )
            if vals
        }
    return out


def spread(stats: dict, key: str, fmt: str) -> str:
    if key not in stats:
        return "n/a"
    s = stats[key]
    return f"{s['median']:{fmt}} ({s['min']:{fmt}} to {s['max']:{fmt}})"


def markdown(result: dict) -> str:
    dense, table, test = result["dense"], result["summary"], result["data"]["test"]
    lost = sorted(round(test * (dense["top1"] - r["top1"]) / 100) for r in result["rows"] if r["method"] == NO_PERM)
    lines = [
        f"# ViT on scikit-learn digits, Wanda 2:4, {len(result['seeds'])} seed(s)",
        "",
        "A small model trained here, not a pretrained one: transformers `ViTForImageClassification`, "
        f"{MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, {MODEL['num_attention_heads']} heads, "
        f"MLP {MODEL['intermediate_size']}, 32x32 inputs (the 8x8 digits upsampled) in 4x4 patches, trained "
        f"{result['training']['epochs']} epochs on {result['data']['train']} images; test set "
        f"{result['data']['test']} images (fixed split). Calibration: {result['settings']['calibration']} training "
        "images per seed (with labels). Every q/k/v/o/fc1/fc2 linear is pruned.",
        "",
        f"Dense: top-1 **{dense['top1']:.2f}%**, test cross-entropy {dense['cross_entropy']:.4f}.",
        "",
        "| method | top-1 % (median, min to max) | recovered share of the 2:4 top-1 loss (%) | test cross-entropy "
        "| recovered share of the 2:4 cross-entropy increase (%) | Wanda score kept | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, stats in table.items():
        top1, ce = (
            ("0 (reference)",) * 2
            if name == NO_PERM
            else (spread(stats, "recovered_percent", ".1f"), spread(stats, "cross_entropy_recovered_percent", ".1f"))
        )
        lines.append(
            f"| {name} | {spread(stats, 'top1', '.2f')} | {top1} | {spread(stats, 'cross_entropy', '.4f')} | {ce} "
            f"| {spread(stats, 'retained_ratio', '.4f')} | {stats['seconds']['median']:.1f} |"
        )
    lines += [
        "",
        "Recovered: `(top1 - top1[2:4, no permutation]) / (top1[dense] - top1[2:4, no permutation])` per seed "
        f"(the same with the test cross-entropy), median (min to max) over seeds. One test image is "
        f"{100 / test:.2f}% of top-1, and 2:4 without permutation costs {lost[0]} to {lost[-1]} of the {test} test "
        f"images: the top-1 shares move by {100 / max(lost[-1], 1):.0f} to {100 / max(lost[0], 1):.0f} points "
        "per image; "
        "the cross-entropy shares are the finer measure. Wanda score kept: the share of the layers' summed "
        "Wanda scores that the masks keep (the heuristics' objective; the sidecar's `retained_ratio`).",
        "",
        f"Command: `{result['command']}`; {result['host']}; this run {result['seconds']:.0f} s "
        + (
            f"with the model trained earlier in {result['training']['seconds']:.0f} s (cached in `--cache`)."
            if result["training"].get("cached")
            else f"including the training, {result['training']['seconds']:.0f} s."
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=128, help="calibration images per seed")
    parser.add_argument("--per-step", type=int, default=16, help="images per learning step")
    parser.add_argument("--select", type=int, default=64, help="images that rank hard permutations")
    parser.add_argument("--steps", type=int, default=None, help="end_to_end steps (default: the configuration's)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="PermuteConfig fields of the learned rows"
    )
    parser.add_argument("--cache", default="/tmp/nmperm-image-vit", help="where the trained model is kept")
    parser.add_argument("--output", default=str(ROOT / "bench/results/image-vit-digits-2of4-3seeds"))
    parser.add_argument("--from-json", help="recompute the summary and the table of a result file, run nothing")
    args = parser.parse_args()
    started = time.time()
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["summary"] = summary(result["rows"], result["dense"])
        result.pop("provenance", None)
        write(result, Path(args.output), started, train_dtype=None, inputs=[Path(args.from_json)])
        return
    start = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - start:6.0f} s] {message}", flush=True)

    train_x, train_y, test_x, test_y = digits()
    dense, training_seconds, cached = trained_model(args, train_x, train_y, log)
    dense.requires_grad_(False)
    dense_eval = evaluate(dense, test_x, test_y)
    log(f"dense: {dense_eval}")
    rows = []
    for seed in args.seeds:
        data = calibration(train_x, train_y, args.calibration, seed)
        for name, method in METHODS.items():
            model, figures = prune(dense, data, method, args, seed)
            rows.append({"seed": seed, "method": name, **evaluate(model, test_x, test_y), **figures})
            log(f"seed {seed} {name}: {rows[-1]}")
    result = {
        "command": "python bench/image_vit.py " + " ".join(sys.argv[1:]),
        "host": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": MODEL,
        "data": {"dataset": "sklearn.datasets.load_digits", "train": len(train_y), "test": len(test_y)},
        "training": {"epochs": args.epochs, "seconds": round(training_seconds, 1), "seed": 0, "cached": cached},
        "settings": {
            "calibration": args.calibration,
            "sequences_per_step": args.per_step,
            "select_sequences": args.select,
            "end_to_end_steps": args.steps or PermuteConfig(fold="exact").total_steps,
            "scorer": "wanda",
            "fold": "exact",
            "learned_overrides": parse_overrides(args.set),
        },  # fmt: skip
        "seeds": args.seeds,
        "dense": dense_eval,
        "rows": rows,
        "summary": summary(rows, dense_eval),
    }
    result["seconds"] = round(time.monotonic() - start, 1)
    write(result, Path(args.output), started, train_dtype=parse_overrides(args.set).get("train_dtype", "auto"))


def write(result: dict, output: Path, started: float, train_dtype: str | None = "auto", inputs=None) -> None:
    """``output``.json and .md, and the table on stdout."""
    write_pair(
        output, result, markdown(result), seeds=result["seeds"], started=started, train_dtype=train_dtype, inputs=inputs
    )
    print(markdown(result))


if __name__ == "__main__":
    main()
