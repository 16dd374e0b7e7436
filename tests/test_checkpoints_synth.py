"""`python -m toprovar.checkpoints synth`: random-weight files in the official layouts, read by the real
loaders, reproducible from a seed. Full-size layouts are checked as tables (nothing allocated); the files
themselves are written at the small preset."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.commands import run_module
from toprovar.checkpoints import tensors as tensors_lib
from toprovar.checkpoints.__main__ import main
from toprovar.checkpoints.flan_t5 import EXTRA_IDS, FLAN_T5_XL
from toprovar.checkpoints.synth import STAGING, release_plan, synthesize
from toprovar.checkpoints.tensors import TensorSpec, draw, draw_all, split_evenly
from toprovar.models.registry import build_backbone, get_backbone
from toprovar.models.text_encoder import T5TextEncoder
from toprovar.pipeline import generate

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent.parent / "shared" / "reference"
MANIFESTS = {
    "infinity-2b": ("infinity_2b.keys.json", "vae_d32.keys.json"),
    "infinity-8b": ("infinity_8b.keys.json", "vae_d14_patchify.keys.json"),
}
SHARD_LIMIT = 5 * 10**9  # huggingface_hub's default max_shard_size, which the official 8B shards keep


def _manifest(name: str) -> dict[str, list[int]]:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"reference manifest {path} not present")
    return json.loads(path.read_text())


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("backbone", sorted(MANIFESTS))
def test_full_size_layout_matches_the_official_manifests(backbone: str) -> None:
    plan = release_plan(backbone)
    parts = {p.role: p for p in plan.parts}
    for role, manifest in zip(("transformer", "vae"), MANIFESTS[backbone]):
        assert [(t.name, list(t.shape)) for t in parts[role].tensors] == list(_manifest(manifest).items())
    # File and folder names are the registry's defaults; nothing in them marks the files as synthetic.
    defaults = get_backbone(backbone).weights
    assert {role: p.name for role, p in parts.items()} == {r: Path(getattr(defaults, r)).name for r in parts}
    assert plan.backbone == backbone and parts["vae"].format == "torch" and parts["vae"].wrapper == "vae"
    masks = [t for t in parts["vae"].tensors if t.name.endswith("lfq.mask")]
    assert len(masks) == 2 and all(t.dtype == torch.int64 and t.values[-1] == 1 for t in masks)
    transformer = parts["transformer"]
    if backbone == "infinity-2b":
        assert (transformer.format, transformer.shards, transformer.wrapper) == ("torch", 1, None)
        assert {t.dtype for t in transformer.tensors} == {torch.float32}
    else:
        assert (transformer.format, transformer.shards) == ("safetensors", 4)
        assert {t.dtype for t in transformer.tensors} == {torch.bfloat16}
        shard_bytes = [sum(t.nbytes for t in run) for run in split_evenly(transformer.tensors, 4)]
        assert len(shard_bytes) == 4 and max(shard_bytes) <= SHARD_LIMIT
    t5 = {t.name: t.shape for t in parts["text_encoder"].tensors}
    d, ff, layers = FLAN_T5_XL["d_model"], FLAN_T5_XL["d_ff"], FLAN_T5_XL["num_layers"]
    assert t5["shared.weight"] == (FLAN_T5_XL["vocab_size"], d) and "encoder.embed_tokens.weight" not in t5
    assert t5[f"encoder.block.{layers - 1}.layer.1.DenseReluDense.wo.weight"] == (d, ff)
    assert f"encoder.block.{layers}.layer.0.SelfAttention.q.weight" not in t5


def test_every_tensor_depends_only_on_seed_and_name() -> None:
    seed = random.randrange(2**31)
    specs = list(release_plan("infinity-8b", "small").parts[0].tensors)
    forward = draw_all(specs, seed, "transformer")
    backward = draw_all(specs[::-1], seed, "transformer")
    alone = {s.name: draw(s, seed, "transformer") for s in random.sample(specs, 5)}
    assert all(torch.equal(forward[k], backward[k]) for k in forward)
    assert all(torch.equal(forward[k], v) for k, v in alone.items())
    other = draw_all(specs, seed + 1, "transformer")
    random_specs = [s for s in specs if s.std > 0]
    assert random_specs and not any(torch.equal(forward[s.name], other[s.name]) for s in random_specs)


def test_drawn_values_follow_the_spec() -> None:
    spec = TensorSpec("w", (512, 512), torch.float32, std=random.uniform(0.01, 2.0), mean=random.uniform(-1, 1))
    x = draw(spec, random.randrange(2**31), "part")
    n = x.numel()
    assert abs(x.mean().item() - spec.mean) < 6 * spec.std / n**0.5
    assert abs(x.std().item() / spec.std - 1) < 6 / (2 * n) ** 0.5
    assert torch.equal(
        draw(TensorSpec("m", (4,), torch.int64, values=(8, 4, 2, 1)), 0, "p"), torch.tensor([8, 4, 2, 1])
    )
    assert draw(TensorSpec("b", (3,), torch.bfloat16), 0, "p").eq(0).all()


def test_small_2b_layout_loads_through_the_registry_and_generates(tmp_path: Path) -> None:
    seed = random.randrange(2**31)
    plan = release_plan("infinity-2b", "small")
    weights = synthesize(plan, tmp_path, seed=seed, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["flan-t5-xl", "infinity_2b_reg.pth", "infinity_vae_d32_reg.pth"]
    # What the official loaders see: a flat state dict under official names, and the VAE under "vae".
    state = torch.load(weights.transformer, weights_only=True)
    assert list(state) == [t.name for t in plan.parts[0].tensors]
    assert state["block_chunks.0.module.0.sa.zero_k_bias"].eq(0).all()
    vae_state = torch.load(weights.vae, weights_only=True)
    assert list(vae_state) == ["vae"] and vae_state["vae"]["quantizer.lfq.mask"].tolist() == [32, 16, 8, 4, 2, 1]
    backbone = build_backbone(plan.backbone, weights, device="cpu")
    assert isinstance(backbone.text_encoder, T5TextEncoder)
    result = generate(backbone, ["a corgi on a beach", "three red stars"], [seed % 1000, seed % 1000 + 1])
    assert result.images.shape[0] == 2 and result.images.shape[-1] == 3
    assert all(image.float().std() > 0 for image in result.images)  # not a blank image
    assert not torch.equal(result.images[0], result.images[1])


def test_t5_folder_has_t5s_tokenizer_and_encoder(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    plan = release_plan("infinity-8b", "small")
    folder = synthesize(plan, tmp_path, seed=random.randrange(2**31), progress=False).text_encoder
    assert sorted(os.listdir(folder)) == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, legacy=True)
    assert len(tok) == 32000 + EXTRA_IDS
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<extra_id_0>", f"<extra_id_{EXTRA_IDS - 1}>"]) == [32099, 32000]
    prompts = ["A photo of a corgi, on a beach at 5 pm!", "three red stars", "x"]
    batch = tok(prompts, padding="longest")
    raw = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    for ids, mask, prompt in zip(batch["input_ids"], batch["attention_mask"], prompts):
        n = sum(mask)
        assert ids[n - 1] == 1 and all(i == 0 for i in ids[n:]) and 2 not in ids  # </s>, then <pad>; no <unk>
        assert raw.encode(prompt).ids[:n] == ids[:n]  # the file read as-is agrees with transformers' reading
        assert n - 1 <= 3 * len(prompt.split())  # about as many tokens as real T5 (not one per character)
    encoder = T5TextEncoder.from_folder(folder, max_length=32)
    features = encoder.encode(prompts)
    assert features.features.shape[-1] == get_backbone(plan.backbone).transformer.text_channels
    assert torch.isfinite(features.features).all() and features.features[0, 0].abs().sum() > 0


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    seed = random.randrange(2**31)
    for backbone in MANIFESTS:
        plan = release_plan(backbone, "small")
        a, b, c = (tmp_path / backbone / name for name in "abc")
        synthesize(plan, a, seed=seed, progress=False)
        synthesize(plan, b, seed=seed, progress=False)
        synthesize(plan, c, seed=seed + 1, progress=False)
        first, second, other = _digests(a), _digests(b), _digests(c)
        assert first == second
        changed = {name for name in first if first[name] != other[name]}
        weights = {name for name in first if name.endswith((".pth", ".safetensors"))}
        assert changed == weights  # every weight file depends on the seed; config and tokenizer do not


def test_cli_writes_the_8b_layout_and_generate_reads_it(tmp_path: Path) -> None:
    out = tmp_path / "weights"
    synth = run_module(
        "toprovar.checkpoints",
        "synth",
        "backbone=infinity-8b",
        f"out={out}",
        "preset=small",
        f"seed={random.randrange(2**31)}",
    )
    assert synth.returncode == 0, synth.stderr
    overrides = synth.stdout.strip().splitlines()[-1].split()
    assert overrides[0] == "backbone=test-small-patchify-t5"
    index = json.loads((out / "infinity_8b_weights" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    assert sorted(p.name for p in (out / "infinity_8b_weights").iterdir()) == [*shards, "model.safetensors.index.json"]
    assert index["metadata"]["total_size"] == release_plan("infinity-8b", "small").parts[0].nbytes
    pngs = tmp_path / "pngs"
    gen = run_module(
        "toprovar",
        "generate",
        *overrides,
        'prompts=["a red cube"]',
        "device=cpu",
        f"out_dir={pngs}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert gen.returncode == 0, gen.stderr
    assert Image.open(pngs / "000_seed0.png").mode == "RGB"


@pytest.fixture
def no_drawing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was drawn before the arguments were checked")

    monkeypatch.setattr(tensors_lib, "draw", refuse)


@pytest.mark.parametrize(
    "args, match",
    [
        (["synth", "backbone=infinity-20b", "out={tmp}"], "backbone='infinity-20b'"),
        (["synth", "backbone=test-small", "out={tmp}"], "no official release layout"),
        (["synth", "backbone=infinity-2b"], "out= is required"),
        (["synth", "backbone=infinity-2b", "out={tmp}", "size=big"], "unknown argument 'size=big'"),
        (["synth", "backbone=infinity-2b", "out={tmp}", "seed=-1"], "seed='-1'"),
        (["synth", "backbone=infinity-2b", "out={tmp}", "preset=tiny"], "preset='tiny'"),
        (["make", "backbone=infinity-2b"], "usage"),
        (["synth", "backbone=infinity-2b", "out={tmp}/file"], "not a folder"),
        (["synth", "backbone=infinity-2b", "out={tmp}/file/below"], "cannot write there"),
    ],
)
def test_mistakes_are_one_line_exit_2_before_any_tensor(
    args: list[str], match: str, tmp_path: Path, no_drawing, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as info:
        main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("toprovar.checkpoints: error:") and "\n" not in err and match in err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_too_little_disk_is_refused_before_any_tensor(
    tmp_path: Path, no_drawing, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from collections import namedtuple

    from toprovar.checkpoints import synth

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(SystemExit):
        main(["synth", "backbone=infinity-2b", "preset=small", f"out={tmp_path}"])
    need = synth.size_text(release_plan("infinity-2b", "small").nbytes)
    assert f"need {need}, only 1.0 MB free" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_interrupted_run_leaves_no_partial_file_and_the_next_run_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = release_plan("infinity-2b", "small")
    calls = {"n": 0}
    real_draw = tensors_lib.draw

    def interrupted(spec, seed, part):
        calls["n"] += 1
        if part == "vae" and calls["n"] > len(plan.parts[0].tensors) + 3:
            raise KeyboardInterrupt
        return real_draw(spec, seed, part)

    monkeypatch.setattr(tensors_lib, "draw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize(plan, tmp_path, seed=1, progress=False)
    # The finished transformer is in place; the VAE is only in the staging folder, never under its real name.
    assert sorted(p.name for p in tmp_path.iterdir()) == [STAGING, "infinity_2b_reg.pth"]
    monkeypatch.setattr(tensors_lib, "draw", real_draw)
    weights = synthesize(plan, tmp_path, seed=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "flan-t5-xl",
        "infinity_2b_reg.pth",
        "infinity_vae_d32_reg.pth",
    ]
    build_backbone(plan.backbone, weights, device="cpu")
