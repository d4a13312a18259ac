"""Which architectures rsp_fast explains: every torchvision classification and video
classification model and a sample of timm's CNN families, random weights (nothing downloaded).

Per model: ``ok`` (finite attribution, with the conservation error ΣR_in + dropped − ΣR₀, also
relative to max(Σ|R_in|, |ΣR₀|): each purge doubles the positive and negative parts, so in
very deep nets float32 keeps the map but not its sum),
``refused`` (UnsupportedModelError or RSPError, with its message: the expected answer for
attention models), or ``crash`` (any other exception: a bug). Writes JSON rows and prints a
summary by status and by the reason models were refused.

    python benchmarks/model_coverage.py --json docs/coverage.json               # all of it (~15 min)
    python benchmarks/model_coverage.py --timm-per-family 2 --no-torchvision    # a quick sample

``--agreement`` also explains each ``ok`` model in float64 twice more: each sample of the batch
alone (``batch_error``: RSP must treat samples independently) and on the ``torch`` reference
backend (``backend_error``, against the default backend), both relative to the map's largest
magnitude; about three times as long.
"""
from __future__ import annotations

import argparse
import collections
import re
import json
import random
import sys
import time
import warnings
from pathlib import Path

import torch

import rsp_fast

sys.path.insert(0, str(Path(__file__).parent))
from utils import output_path  # noqa: E402


def _count(value: str) -> int:
    """argparse type: a whole number, 0 or more."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number, 0 or more")
    return int(value)


# timm modules holding CNNs (transformer-only modules are left out: they are refused by name)
TIMM_CNN_FAMILIES = (
    "byobnet convmixer convnext cspnet cspnext densenet dla dpn efficientnet fasternet ghostnet hardcorenas hgnet hrnet "
    "inception_next inception_resnet_v2 inception_v3 inception_v4 lcnetv2 mambaout metaformer mobilenetv3 mobilenetv5 "
    "nasnet nfnet pnasnet rdnet regnet repghost repvit res2net resnest resnet resnetv2 rexnet selecsls senet sknet "
    "starnet tresnet vgg vovnet xception xception_aligned").split()
# the largest variants take minutes each on two cores and add nothing their family lacks
TOO_LARGE = ("_xl", "_xxl", "_huge", "_giant", "1280gf", "640gf", "320gf", "_e6", "_e8", "f7", "f6", "f5", "_l2", "_b7", "_b8")


def check(name: str, model: torch.nn.Module, shape: tuple) -> dict:
    """``shape``: one input's (C, H, W), or (C, T, H, W) for a clip."""
    row = {"model": name}
    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    t0 = time.perf_counter()
    try:
        explainer = rsp_fast.RSP(model.eval())
        ex = explainer.explain(x, record=True)
        # a forward that changes what its graph holds (a flag, a hook) would be traced at every call
        plan = explainer._plan_for(x)
        with torch.no_grad():
            model(x)
        row["plan_kept"] = explainer._plan_for(x) is plan
        total_0 = ex.initial.flatten(1).sum(1)
        error = (ex.attribution.flatten(1).sum(1) + ex.dropped - total_0).abs()
        magnitude = torch.maximum(ex.attribution.flatten(1).abs().sum(1), total_0.abs())
        finite = bool(torch.isfinite(ex.attribution).all())
        row.update(status="ok" if finite else "crash", layer=ex.layer, conservation_error=error.max().item(),
                   relative_conservation_error=(error / magnitude.clamp_min(1e-30)).max().item(),
                   **({} if finite else {"message": "non-finite attribution"}))
    except (rsp_fast.UnsupportedModelError, rsp_fast.RSPError) as exc:
        row.update(status="refused", message=str(exc).split(" Supported:")[0][:500])
    except Exception as exc:  # a bug: report it, go on with the next model
        row.update(status="crash", message=f"{type(exc).__name__}: {exc}"[:500])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def agreement(model: torch.nn.Module, shape: tuple) -> dict:
    """In float64: the batch against each sample alone, and the torch backend against the default."""
    torch.manual_seed(0)
    model = model.double().eval()
    x = torch.randn(2, *shape, dtype=torch.float64)
    R = rsp_fast.RSP(model).attribute(x)
    scale = R.abs().max().clamp_min(1e-300)
    alone = torch.cat([rsp_fast.RSP(model).attribute(x[i:i + 1]) for i in range(len(x))])
    reference = rsp_fast.RSP(model, backend="torch").attribute(x)
    return {"batch_error": ((R - alone).abs().max() / scale).item(),
            "backend_error": ((R - reference).abs().max() / scale).item()}


def torchvision_models():
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        size = 224 if name.startswith(("vit_", "swin", "maxvit")) else 96
        yield f"torchvision/{name}", (lambda n=name, k=kwargs: torchvision.models.get_model(n, num_classes=10, **k)), (3, size, size)
    for name in torchvision.models.list_models(module=torchvision.models.video):
        clip = (3, 16, 224, 224) if name.startswith(("mvit", "swin3d", "s3d")) else (3, 8, 64, 64)  # these fix their size
        yield f"torchvision/{name}", (lambda n=name: torchvision.models.get_model(n, num_classes=10)), clip


def timm_models(per_family: int, seed: int):
    import timm

    rng = random.Random(seed)
    for family in TIMM_CNN_FAMILIES:
        names = [n for n in timm.list_models(module=family) if not any(s in n for s in TOO_LARGE)]
        for name in sorted(rng.sample(names, min(per_family, len(names)))):
            yield f"timm/{name}", (lambda n=name: timm.create_model(n, pretrained=False, num_classes=10)), (3, 128, 128)


def _first_reason(message: str) -> str:
    """What the first refused places lack, from "no RSP rule for <places>: <what>; ... (between ...)"."""
    first = re.sub(r" \(between the input and layer .*$", "", message.split("; ")[0])
    return first.split(": ", 1)[-1][:90]


def summarise(rows: list[dict]) -> str:
    by_status = collections.Counter(r["status"] for r in rows)
    lines = [f"{len(rows)} models: " + ", ".join(f"{by_status[s]} {s}" for s in ("ok", "refused", "crash"))]
    ok = [r for r in rows if r["status"] == "ok"]
    worst = max(ok, key=lambda r: r["conservation_error"], default=None)
    if worst is not None:
        relative = max(r["relative_conservation_error"] for r in ok)
        lines.append(f"conservation error |ΣR_in + dropped − ΣR₀| (float32, ΣR₀ = 1 per sample): largest "
                     f"{worst['conservation_error']:.2e} ({worst['model']}); relative to max(Σ|R_in|, |ΣR₀|), largest {relative:.2e}")
    retraced = [r["model"] for r in ok if not r.get("plan_kept", True)]
    lines.append(f"traced again at every call: {len(retraced)} models" + (f" ({', '.join(retraced)})" if retraced else ""))
    reasons = collections.Counter(_first_reason(r["message"]) for r in rows if r["status"] != "ok")
    for key in ("batch_error", "backend_error"):
        checked = [r for r in ok if key in r]
        if checked:
            worst = max(checked, key=lambda r: r[key])
            lines.append(f"{key} (float64, relative to max |R|): largest {worst[key]:.1e} ({worst['model']}), {len(checked)} models")
    lines += [f"  {count:3d} × {reason}" for reason, count in reasons.most_common()]
    lines += [f"  CRASH {r['model']}: {r['message']}" for r in rows if r["status"] == "crash"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm-per-family", type=_count, default=8, help="models sampled per timm family (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="which timm models are sampled")
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--json", type=output_path, help="write the rows here")
    parser.add_argument("--agreement", action="store_true", help="batch against single samples, torch backend against the default")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    sources = [] if args.no_torchvision else list(torchvision_models())
    if args.timm_per_family:
        sources += list(timm_models(args.timm_per_family, args.seed))
    rows = []
    for name, build, shape in sources:
        try:
            model = build()
        except Exception as exc:  # the library's own constructor failed: not ours to count
            print(f"skip {name}: {type(exc).__name__}: {exc}"[:200], flush=True)
            continue
        rows.append(check(name, model, shape))
        if args.agreement and rows[-1]["status"] == "ok":
            try:
                rows[-1].update(agreement(model, shape))
            except Exception as exc:  # it ran in float32: a bug
                rows[-1].update(status="crash", message=f"float64 agreement: {type(exc).__name__}: {exc}"[:500])
        extra = "".join(f" {k} {rows[-1][k]:.1e}" for k in ("batch_error", "backend_error") if k in rows[-1])
        print(f"{rows[-1]['status']:8s} {name} ({rows[-1]['seconds']} s){extra}", flush=True)
    print(summarise(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
