"""Train the `tiny` backbone: the BSQ VAE, then the transformer with its word-level text encoder.

    python -m toprovar.tiny.train                       # both stages, toprovar/conf/train_tiny.yaml
    python -m toprovar.tiny.train stage=vae vae.steps=200 device=cpu
    python -m toprovar.tiny.train stage=transformer vae_weights=/path/vae.safetensors
    python -m toprovar.tiny.train export_to=toprovar/assets/tiny

Data is drawn on the fly from the procedural scene generator (toprovar.tiny.scenes, split
"train": the held-out colour/shape pairs never appear) and rendered on the device; step i uses
scenes of seed (seed, i), so a run is reproducible from its seed and resumes exactly. The VAE
learns to reconstruct through the multi-scale BSQ of tiny's schedule (pixel L1 + L2 + edge
L1). The transformer is trained as Infinity is: teacher forcing over all scales in one pass
(`InfinityTransformer.forward_teacher`), bitwise cross-entropy, bitwise self-correction (random
bit flips on the inputs of all but the last scale), text dropped to `cfg_uncond` for
classifier-free guidance, EMA weights exported.

Nothing is lost on interruption: each stage checkpoints to the run folder every
`checkpoint_every_s` seconds and at `max_minutes`, and a re-run with the same `out_dir` resumes.
The exported weights are float16 safetensors (`<out_dir>/weights/`); `export_to=` copies them
to the shipped folder. `metrics.json` holds what the model card reports.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toprovar.errors import UserError
from toprovar.models.bsq import BitFlipNoise
from toprovar.models.registry import resolve_device
from toprovar.models.transformer import InfinityTransformer, random_state_dict
from toprovar.models.vae import BSQVAE
from toprovar.schedules import tokens_per_scale
from toprovar.schemas import EvalConfig, TrainConfig, TransformerTrainConfig, typed_config
from toprovar.tiny.model import TINY_SCHEDULES, TINY_TRANSFORMER, TINY_VAE, save_text_encoder, text_encoder_config
from toprovar.tiny.text import PAD, WordTextEncoder

STAGES = ("vae", "transformer", "all")


SCHEDULE = TINY_SCHEDULES.full_schedule(1.0)
TOKENS = tokens_per_scale(SCHEDULE)


# -- helpers ---------------------------------------------------------------------------------------


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up, cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_scenes(
    seed: int,
    step: int,
    count: int,
    split: str = "train",
    kind_weights: dict[str, float] | None = None,
    contrast: bool = False,
):
    """The `count` scenes of one training step (deterministic in seed and step)."""
    from toprovar.tiny.scenes import relation_contrast, sample_scenes

    scenes = sample_scenes(count, seed=seed * 1_000_003 + step, split=split, kind_weights=kind_weights)
    if not contrast:
        return scenes
    batch = []
    for i, scene in enumerate(scenes):
        batch.append(scene)
        if scene.kind == "position":
            batch.append(relation_contrast(scene, swap_order=i % 2 == 0))
        if len(batch) >= count:
            break
    return batch[:count]


def save_half(module: nn.Module, path: Path) -> None:
    """float16 safetensors of the floating tensors, others as they are (what the repo ships)."""
    from safetensors.torch import save_file

    # Copies: the VAE registers its quantizer twice (quantizer / quantize), safetensors wants no aliases.
    state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).clone()
        for k, v in module.state_dict().items()
    }
    save_file(state, str(path))


class EMA:
    """Exponential moving average of a module's parameters (warm-started: short runs average less)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.float(), 1 - d)

    def copy_to(self, module: nn.Module) -> None:
        state = module.state_dict()
        module.load_state_dict({k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in state.items()})


class _Checkpoint:
    """Periodic, atomic training checkpoints in the run folder."""

    def __init__(self, path: Path, every_s: float, max_minutes: float | None):
        self.path, self.every_s = path, every_s
        path.parent.mkdir(parents=True, exist_ok=True)
        self.last = time.monotonic()
        self.deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes

    def load(self) -> dict[str, Any] | None:
        return torch.load(self.path, map_location="cpu", weights_only=False) if self.path.exists() else None

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def after_step(
        self, stage: str, step: int, steps: int, model: nn.Module, opt: torch.optim.Optimizer, log: list, **extra: Any
    ) -> None:
        """After step `step` of `steps`: at the last step, when a save is due or when the time is up,
        save the state dicts of model and opt, `extra`, the step count and the loss log; time up
        before the last step stops the run (SystemExit) with how to resume."""
        done = step + 1 == steps
        if done or self.due() or self.out_of_time():
            self.save({"model": model.state_dict(), "opt": opt.state_dict(), **extra, "step": step + 1, "log": log})
            if not done and self.out_of_time():
                resume = f"re-run with out_dir={self.path.parent} to resume"  # the run folder
                raise SystemExit(f"stopped at {stage} step {step + 1} (max_minutes); {resume}")


def _optimizer_step(opt: torch.optim.Optimizer, loss: Tensor, params) -> None:
    """Backward from `loss`, the gradients of `params` clipped to norm 1, one step of `opt`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _log_loss(log: list[dict[str, float]], bar, step: int, loss: Tensor) -> None:
    """Every 50 steps the loss into `log` and onto the progress bar; the bar advances a step."""
    if step % 50 == 0:
        log.append({"step": step, "loss": float(loss.detach())})
        bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
    bar.update(1)


def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=5.0)


# -- stage 1: VAE ----------------------------------------------------------------------------------


def vae_loss(vae: BSQVAE, images: Tensor, edge_weight: float) -> tuple[Tensor, Tensor]:
    """Reconstruction through tiny's multi-scale BSQ; returns (loss, reconstruction)."""
    z = vae.encoder(images)
    codes = vae.quantize_multiscale(z, vae.vae_schedule(SCHEDULE)).summed_codes.squeeze(2)
    rec = vae.decoder(codes.to(z.dtype)).float()
    loss = F.l1_loss(rec, images) + F.mse_loss(rec, images)
    if edge_weight:

        def grads(x: Tensor) -> tuple[Tensor, Tensor]:
            return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]

        (ry, rx), (iy, ix) = grads(rec), grads(images)
        loss = loss + edge_weight * (F.l1_loss(ry, iy) + F.l1_loss(rx, ix))
    return loss, rec


def train_vae(cfg: TrainConfig, out: Path, device: torch.device) -> BSQVAE:
    from toprovar.tiny.scenes import render

    c = cfg.vae
    torch.manual_seed(cfg.seed)
    vae = BSQVAE(TINY_VAE).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=c.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ckpt = _Checkpoint(out / "vae.ckpt", cfg.checkpoint_every_s, cfg.max_minutes)
    start, log = 0, []
    if (state := ckpt.load()) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, log = state["step"], state["log"]
    bar = _progress(c.steps, start, "vae")
    for step in range(start, c.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, c.steps, c.warmup, c.lr)
        images = render(batch_scenes(cfg.seed, step, c.batch), device=device)
        with _autocast(device):
            loss, _ = vae_loss(vae, images, c.edge_weight)
        _optimizer_step(opt, loss, vae.parameters())
        _log_loss(log, bar, step, loss)
        ckpt.after_step("vae", step, c.steps, vae, opt, log)
    bar.close()
    (out / "vae_loss.json").write_text(json.dumps(log))
    return vae.eval()


@torch.no_grad()
def vae_psnr(vae: BSQVAE, count: int, device: torch.device, batch: int = 64) -> float:
    """PSNR (uint8, dB) of held-out renders reconstructed through the full multi-scale BSQ."""
    from toprovar.metrics import psnr
    from toprovar.tiny.scenes import render, sample_scenes

    scenes = sample_scenes(count, seed=987_654, split="heldout")
    values = []
    for i in range(0, count, batch):
        images = render(scenes[i : i + batch], device=device)
        codes = vae.quantize_multiscale(vae.encode(images), vae.vae_schedule(SCHEDULE)).summed_codes
        rec = vae.decode(codes)
        to8 = lambda x: ((x.float() + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu()  # noqa: E731
        values.append(psnr(to8(rec), to8(images)).reshape(-1))
    return float(torch.cat(values).mean())


# -- stage 2: transformer + text encoder ----------------------------------------------------------


def token_weights(power: float, device: torch.device) -> Tensor:
    """Per-token loss weights, mean 1: a token of scale s weighs tokens_s^-power."""
    w = torch.cat([torch.full((n,), float(n) ** -power) for n in TOKENS])
    return (w * (len(w) / w.sum())).to(device)


def teacher_loss(
    model: InfinityTransformer, cond: Any, inputs: Tensor, bits: Tensor, weights: Tensor, rope: Tensor
) -> Tensor:
    """Weighted bitwise cross-entropy of the teacher-forced logits (static shapes: compilable)."""
    logits = model.forward_teacher(cond, inputs, SCHEDULE, rope)
    ce = F.cross_entropy(logits.reshape(-1, 2), bits.reshape(-1), reduction="none").view(bits.shape)
    return (ce.mean(-1) * weights[None]).mean()


def transformer_loss(
    model: InfinityTransformer,
    text_encoder: WordTextEncoder,
    vae: BSQVAE,
    images: Tensor,
    captions: list[str],
    c: TransformerTrainConfig,
    weights: Tensor,
    rope: Tensor,
    generator: torch.Generator,
    loss_fn: Any = teacher_loss,
) -> Tensor:
    device = images.device
    with torch.no_grad():
        noise = BitFlipNoise(layers=len(SCHEDULE) - 1, strength=c.bitflip_strength) if c.bitflip_strength else None
        inputs, targets = vae.teacher_forcing(images, SCHEDULE, noise=noise, generator=generator)
    # Text padded to the longest caption the grammar makes: the same shapes every step.
    ids, lens = text_encoder.tokenize(captions, pad_to=text_encoder.config.max_words)
    text = text_encoder(ids.to(device), lens).features
    drop = torch.rand(len(captions), generator=generator, device=device) < c.cfg_drop
    uncond = model.cfg_uncond[: text.shape[1]][None].to(text.dtype)
    text = torch.where(drop[:, None, None], uncond, text)
    cond = model.encode_condition(text, lens.tolist(), with_uncond=False)
    return loss_fn(model, cond, inputs, torch.cat(targets, dim=1), weights, rope)


def _decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for n, p in module.named_parameters() if p.ndim >= 2 and "cfg_uncond" not in n]
    rest = [p for n, p in module.named_parameters() if not (p.ndim >= 2 and "cfg_uncond" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class _Pair(nn.Module):
    """Transformer + text encoder as one module (one optimizer, one EMA, one checkpoint)."""

    def __init__(self, model: InfinityTransformer, text_encoder: WordTextEncoder):
        super().__init__()
        self.model, self.text_encoder = model, text_encoder


def _load_exported(pair: _Pair, folder: Path) -> None:
    """Start from exported (float16) transformer + text encoder weights, e.g. to train longer."""
    from toprovar.models.checkpoint import load_into
    from toprovar.tiny.model import load_text_encoder

    load_into(pair.model, folder / "transformer.safetensors")
    text = load_text_encoder(folder / "text_encoder.safetensors")
    if text.config.vocabulary != pair.text_encoder.config.vocabulary:
        raise UserError(f"{folder}: its text encoder has another vocabulary than the scene captions")
    # An encoder saved before `order_layers` existed lacks those layers: they start at their
    # zero-branch initialisation (the encoder computes what the file's did).
    missing, unexpected = pair.text_encoder.load_state_dict(text.state_dict(), strict=False)
    if unexpected or any(not key.startswith("order.") for key in missing):
        raise UserError(
            f"{folder}: its text encoder does not fit this one (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def vocabulary() -> tuple[str, ...]:
    from toprovar.tiny.scenes import VOCABULARY

    return (PAD, *sorted(set(VOCABULARY) - {PAD}))


def train_transformer(cfg: TrainConfig, out: Path, device: torch.device, vae: BSQVAE) -> _Pair:
    from toprovar.tiny.scenes import render

    c = cfg.transformer
    torch.manual_seed(cfg.seed + 1)
    model = InfinityTransformer(TINY_TRANSFORMER)
    model.load_state_dict(random_state_dict(TINY_TRANSFORMER, seed=cfg.seed))
    pair = _Pair(model, WordTextEncoder(text_encoder_config(vocabulary())))
    if cfg.init_from:
        _load_exported(pair, Path(cfg.init_from))
    pair = pair.to(device).train()
    vae = vae.to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(_decay_groups(pair, c.weight_decay), lr=c.lr, betas=(0.9, 0.95))
    ema = EMA(pair, c.ema)
    ckpt = _Checkpoint(out / "transformer.ckpt", cfg.checkpoint_every_s, cfg.max_minutes)
    start, log = 0, []
    if (state := ckpt.load()) is not None:
        pair.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
        start, log = state["step"], state["log"]
    weights = token_weights(c.scale_weight_power, device)
    rope = model.rope_table(SCHEDULE, device)
    loss_fn = torch.compile(teacher_loss) if c.compile and device.type == "cuda" else teacher_loss
    bar = _progress(c.steps, start, "transformer")
    for step in range(start, c.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, c.steps, c.warmup, c.lr)
        scenes = batch_scenes(cfg.seed, step, c.batch, kind_weights=c.kind_weights, contrast=c.relation_contrast)
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        images = render(scenes, device=device)
        with _autocast(device):
            loss = transformer_loss(
                model, pair.text_encoder, vae, images, [s.caption for s in scenes], c, weights, rope, generator, loss_fn
            )
        _optimizer_step(opt, loss, pair.parameters())
        ema.update(pair, step)
        _log_loss(log, bar, step, loss)
        ckpt.after_step("transformer", step, c.steps, pair, opt, log, ema=ema.shadow)
    bar.close()
    (out / "transformer_loss.json").write_text(json.dumps(log))
    ema.copy_to(pair)
    return pair.eval()


# -- evaluation ------------------------------------------------------------------------------------


def evaluate_generation(weights_dir: Path, cfg: EvalConfig, device: torch.device, out: Path) -> dict[str, Any]:
    """geneval-lite of unpruned generations on held-out prompts, for each guidance scale."""
    from toprovar.models.registry import build_backbone
    from toprovar.pipeline import generate
    from toprovar.tiny.evaluate import geneval_report
    from toprovar.tiny.scenes import sample_scenes

    backbone = build_backbone(
        "tiny",
        {
            "transformer": str(weights_dir / "transformer.safetensors"),
            "vae": str(weights_dir / "vae.safetensors"),
            "text_encoder": str(weights_dir / "text_encoder.safetensors"),
        },
        device=device,
    )
    results: dict[str, Any] = {}
    for split, seed in (("heldout", 4242), ("all", 4343)):
        scenes = sample_scenes(cfg.prompts, seed=seed, split=split)
        captions = [s.caption for s in scenes]
        for guidance in cfg.guidance_scales:
            images = torch.cat(
                [
                    generate(
                        backbone,
                        captions[i : i + cfg.batch],
                        list(range(i, min(i + cfg.batch, len(captions)))),
                        guidance_scale=guidance,
                    ).images
                    for i in range(0, len(captions), cfg.batch)
                ]
            )
            report = geneval_report(images, captions)
            results[f"{split}/guidance_scale{guidance:g}"] = {
                row["category"]: float(row["score"]) for _, row in report.iterrows()
            }
            if split == "heldout" and guidance == cfg.guidance_scales[len(cfg.guidance_scales) // 2]:
                save_grid(images[:32], captions[:32], out / "samples_heldout.png")
    return results


def save_grid(images: Tensor, captions: list[str], path: Path, columns: int = 8) -> None:
    """uint8 `(N, H, W, 3)` images with wrapped captions under each, as one PNG."""
    import textwrap

    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    label = 40
    rows = math.ceil(n / columns)
    sheet = Image.new("RGB", (columns * w, rows * (h + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % columns) * w, (i // columns) * (h + label)
        sheet.paste(Image.fromarray(images[i].numpy()), (x, y))
        draw.multiline_text((x + 2, y + h + 1), "\n".join(textwrap.wrap(captions[i], 26)[:3]), fill="black")
    sheet.save(path)


# -- the command -------------------------------------------------------------------------------------


def check_config(cfg: TrainConfig) -> None:
    """One-line UserErrors for values that have no meaning: an unknown stage, a count below 1, a
    negative warm-up, a checkpoint interval that is not positive."""
    if cfg.stage not in STAGES:
        raise UserError(f"stage={cfg.stage!r}; choose one of {', '.join(STAGES)}")
    counts = {
        "vae.steps": cfg.vae.steps,
        "vae.batch": cfg.vae.batch,
        "transformer.steps": cfg.transformer.steps,
        "transformer.batch": cfg.transformer.batch,
        "eval.prompts": cfg.eval.prompts,
        "eval.psnr_images": cfg.eval.psnr_images,
        "eval.batch": cfg.eval.batch,
    }
    for key, value in counts.items():
        if value < 1:
            raise UserError(f"{key}={value}; give at least 1")
    for key, value in {"vae.warmup": cfg.vae.warmup, "transformer.warmup": cfg.transformer.warmup}.items():
        if value < 0:
            raise UserError(f"{key}={value}; give 0 or more")
    if not cfg.checkpoint_every_s > 0:
        raise UserError(f"checkpoint_every_s={cfg.checkpoint_every_s}; give a positive number of seconds")


def run(cfg: TrainConfig) -> dict[str, Any]:
    check_config(cfg)
    from toprovar.tiny.scenes import sample_scenes

    try:  # the sampler is the one place that knows valid weights; check them before any training
        sample_scenes(0, 0, "train", kind_weights=cfg.transformer.kind_weights)
    except ValueError as err:
        raise UserError(f"transformer.kind_weights: {err}") from None
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir or "outputs/train_tiny")
    weights_dir = out / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics["config"] = asdict(cfg)
    metrics["versions"] = {
        "torch": torch.__version__,
        "device": str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu",
    }
    t0 = time.time()
    if cfg.stage in ("vae", "all"):
        vae = train_vae(cfg, out, device)
        save_half(vae, weights_dir / "vae.safetensors")
        metrics["vae_minutes"] = (time.time() - t0) / 60
    vae_file = Path(cfg.vae_weights) if cfg.vae_weights else weights_dir / "vae.safetensors"
    if not vae_file.is_file():
        raise UserError(f"no VAE weights at {vae_file}; run stage=vae first or set vae_weights=/path")
    if cfg.vae_weights:
        shutil.copyfile(vae_file, weights_dir / "vae.safetensors")
    from toprovar.models.vae import load_vae

    vae = load_vae(weights_dir / "vae.safetensors", TINY_VAE, device=device)  # the shipped float16 weights
    metrics["vae_psnr_heldout_db"] = vae_psnr(vae, cfg.eval.psnr_images, device)
    print(f"VAE PSNR on held-out renders: {metrics['vae_psnr_heldout_db']:.2f} dB", flush=True)
    if cfg.stage in ("transformer", "all"):
        t1 = time.time()
        pair = train_transformer(cfg, out, device, vae)
        save_half(pair.model, weights_dir / "transformer.safetensors")
        save_text_encoder(pair.text_encoder, weights_dir / "text_encoder.safetensors")
        metrics["transformer_minutes"] = (time.time() - t1) / 60
        metrics["geneval_lite"] = evaluate_generation(weights_dir, cfg.eval, device, out)
        print(json.dumps(metrics["geneval_lite"], indent=1), flush=True)
    metrics_path.write_text(json.dumps(metrics, indent=1))
    if cfg.export_to:
        dest = Path(cfg.export_to)
        dest.mkdir(parents=True, exist_ok=True)
        for file in weights_dir.glob("*.safetensors"):
            shutil.copyfile(file, dest / file.name)
    return metrics


# -- Hydra entry point ---------------------------------------------------------------------------------


def parse_config(cfg: Any) -> TrainConfig:
    """A composed Hydra config (or a dict of every key) -> TrainConfig; unknown keys, missing keys and
    wrong types are one-line errors. The schema has no defaults: toprovar/conf/train_tiny.yaml does."""
    return typed_config(cfg, TrainConfig)


def train(cfg: Any) -> None:
    """The Hydra app: type the composed config, train in the run folder (or `out_dir`), print the metrics."""
    from hydra.core.hydra_config import HydraConfig

    config = parse_config({k: v for k, v in cfg.items() if k != "hydra"})
    if config.out_dir is None:
        config.out_dir = HydraConfig.get().runtime.output_dir
    metrics = run(config)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=1))


def main() -> None:
    from toprovar.cli import run_hydra_app

    run_hydra_app("toprovar.tiny.train", "train_tiny", train, renames={"eval.cfgs": "eval.guidance_scales"})


if __name__ == "__main__":
    main()
