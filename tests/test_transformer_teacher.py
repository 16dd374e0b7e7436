"""Teacher forcing (training) pass == the generation loop's scale-by-scale pass with a KV cache."""

from __future__ import annotations

import torch

from tests.backbones import SMALL
from toprovar.models.transformer import InfinityTransformer, RopeSlice, random_state_dict
from toprovar.schedules import scale_schedule

CFG = SMALL


def test_teacher_forcing_matches_the_cached_loop() -> None:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    model = InfinityTransformer(CFG).eval()
    model.load_state_dict(random_state_dict(CFG, seed=int(torch.randint(0, 1000, ()).item())))
    schedule = scale_schedule(1.0, "0.06M")
    sizes = [h * w for _, h, w in schedule]
    rows = 4
    cond = model.encode_condition(torch.randn(rows // 2, 5, CFG.text_channels), [5, 3], with_uncond=True)
    rope = model.rope_table(schedule, "cpu")
    inputs = torch.randn(rows, sum(sizes) - 1, CFG.codebook_dim)

    teacher = model.forward_teacher(cond, inputs, schedule, rope)
    assert teacher.shape == (rows, sum(sizes), 2 * CFG.codebook_dim)

    cache = model.new_cache(rows, sum(sizes), torch.float32, "cpu")
    x, offset, per_scale = model.first_tokens(cond), 0, []
    for si, n in enumerate(sizes):
        if si:
            x = model.embed_codes(inputs[:, offset - 1 : offset - 1 + n])
        x = model.add_level(x.clone(), si)
        rope_si = RopeSlice(rope[0, offset : offset + n], rope[1, offset : offset + n])
        for li, block in enumerate(model.blocks):
            x, _ = block(x, cond.gss, cond.text[li], rope_si, cache[li])
        per_scale.append(model.logits(x, cond.cond_BD))
        offset += n
    looped = torch.cat(per_scale, dim=1)
    rel = (teacher - looped).norm() / looped.norm()
    assert rel < 1e-5, rel


def test_teacher_forcing_trains() -> None:
    """Gradients reach every parameter the loss depends on (the inference-only in-place ops are safe)."""
    torch.manual_seed(0)
    model = InfinityTransformer(CFG).train()
    model.load_state_dict(random_state_dict(CFG, seed=1))
    schedule = scale_schedule(1.0, "0.06M")[:4]
    total = sum(h * w for _, h, w in schedule)
    cond = model.encode_condition(torch.randn(2, 4, CFG.text_channels), [4, 2], with_uncond=False)
    logits = model.forward_teacher(
        cond, torch.randn(2, total - 1, CFG.codebook_dim), schedule, model.rope_table(schedule, "cpu")
    )
    logits.logsumexp(-1).mean().backward()
    unused = {"cfg_uncond"}
    for name, p in model.named_parameters():
        if name not in unused:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
