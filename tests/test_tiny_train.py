"""Training of the tiny backbone on CPU: the losses learn, the text encoder file round-trips,
an interrupted stage resumes where it stopped."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from toprovar.errors import UserError
from toprovar.models.transformer import InfinityTransformer, random_state_dict
from toprovar.models.vae import BSQVAE
from toprovar.tiny import train as T
from toprovar.tiny.model import TINY_TRANSFORMER, TINY_VAE, load_text_encoder, save_text_encoder, text_encoder_config
from toprovar.tiny.scenes import render, sample_scenes
from toprovar.tiny.text import WordTextEncoder


def _config(tmp_path, *overrides: str) -> T.TrainConfig:
    """The TrainConfig `python -m toprovar.tiny.train *overrides` runs with (defaults: the YAML)."""
    from tests.conftest import compose

    return T.parse_config(compose("train_tiny", list(overrides), tmp_path))


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def test_text_encoder_file_round_trip_and_unknown_words(tmp_path) -> None:
    torch.manual_seed(_seed())
    encoder = WordTextEncoder(text_encoder_config(T.vocabulary())).eval()
    path = tmp_path / "text.safetensors"
    save_text_encoder(encoder, path)
    loaded = load_text_encoder(path)
    prompts = [s.caption for s in sample_scenes(3, seed=_seed())]
    a, b = encoder.encode(prompts), loaded.encode(prompts)
    assert torch.equal(a.lens, b.lens) and a.features.shape[-1] == 128
    assert torch.allclose(a.features, b.features, atol=2e-2)  # float16 storage
    assert bool((b.features[~b.mask] == 0).all())
    with pytest.warns(UserWarning, match="does not know"):
        out = loaded.encode(["a red zebra"])
    assert int(out.lens[0]) == 2  # "zebra" dropped
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="bad.safetensors"):
        load_text_encoder(tmp_path / "bad.safetensors")


def _fit(loss_fn, params, steps: int) -> list[float]:
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_vae_and_transformer_losses_learn_a_batch(tmp_path) -> None:
    seed = _seed()
    torch.manual_seed(seed)
    scenes = sample_scenes(2, seed=seed, split="train")
    images = render(scenes)
    vae = BSQVAE(TINY_VAE).train()
    vae_losses = _fit(lambda: T.vae_loss(vae, images, 0.5)[0], vae.parameters(), 6)
    assert vae_losses[-1] < vae_losses[0]

    vae.eval().requires_grad_(False)
    model = InfinityTransformer(TINY_TRANSFORMER)
    model.load_state_dict(random_state_dict(TINY_TRANSFORMER, seed=seed % 1000))
    pair = T._Pair(model, WordTextEncoder(text_encoder_config(T.vocabulary()))).train()
    c = dataclasses.replace(_config(tmp_path).transformer, cfg_drop=0.0, bitflip_strength=0.0)
    weights, rope = T.token_weights(c.scale_weight_power, torch.device("cpu")), model.rope_table(T.SCHEDULE, "cpu")
    captions = [s.caption for s in scenes]

    def loss():
        return T.transformer_loss(
            model, pair.text_encoder, vae, images, captions, c, weights, rope, torch.Generator().manual_seed(0)
        )

    losses = _fit(loss, pair.parameters(), 4)
    assert losses[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=0.1)  # chance at init
    assert losses[-1] < losses[0] - 0.01


def test_token_weights_favour_coarse_scales() -> None:
    w = T.token_weights(0.5, torch.device("cpu"))
    assert w.shape == (sum(T.TOKENS),) and w.mean().item() == pytest.approx(1.0)
    assert w[0] > w[-1]


def test_an_interrupted_stage_resumes(tmp_path) -> None:
    cfg = _config(tmp_path, "stage=vae", "device=cpu", f"out_dir={tmp_path}", "max_minutes=0.0")
    cfg.vae.steps, cfg.vae.batch, cfg.eval.psnr_images = 2, 2, 2
    with pytest.raises(SystemExit, match="resume"):
        T.run(cfg)
    assert torch.load(tmp_path / "vae.ckpt", weights_only=False)["step"] == 1
    cfg.max_minutes = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = T.run(cfg)
    assert torch.load(tmp_path / "vae.ckpt", weights_only=False)["step"] == 2
    assert (tmp_path / "weights" / "vae.safetensors").is_file() and metrics["vae_psnr_heldout_db"] > 0


def test_contrast_batches_pair_each_position_scene_with_its_mirror() -> None:
    from toprovar.tiny.train import batch_scenes

    seed = _seed()
    batch = batch_scenes(seed, 3, 64, kind_weights={"position": 3.0}, contrast=True)
    assert len(batch) == 64 and batch == batch_scenes(seed, 3, 64, kind_weights={"position": 3.0}, contrast=True)
    plain = batch_scenes(seed, 3, 64, kind_weights={"position": 3.0})
    assert batch[0] == plain[0]
    pairs = sum(
        1
        for a, b in zip(batch, batch[1:])
        if a.kind == b.kind == "position"
        and {o.shape for o in a.objects} == {o.shape for o in b.objects}
        and a.caption != b.caption
    )
    assert pairs >= 10, [s.caption for s in batch]


def test_unknown_kind_weight_is_a_user_error(tmp_path) -> None:
    from toprovar.errors import UserError
    from toprovar.tiny.train import run

    cfg = _config(tmp_path, "stage=transformer", f"out_dir={tmp_path}")
    cfg.transformer.kind_weights = {"colour": 2.0}
    with pytest.raises(UserError, match="unknown kinds"):
        run(cfg)


def test_all_zero_kind_weights_are_a_user_error(tmp_path) -> None:
    from toprovar.errors import UserError
    from toprovar.tiny.train import run

    cfg = _config(tmp_path, "stage=transformer", f"out_dir={tmp_path}")
    cfg.transformer.kind_weights = {
        "single_object": 0.0,
        "two_objects": 0.0,
        "counting": 0.0,
        "colors": 0.0,
        "position": 0.0,
        "attribute_binding": 0.0,
    }
    with pytest.raises(UserError, match="positive sum"):
        run(cfg)
