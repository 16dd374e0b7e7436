"""Run by tests/test_kernels_fae.py in a subprocess with TRITON_INTERPRET=1 (set before triton
is imported): the Triton kernels on CPU against the float64 reference (FAE: out and entropy; the
entropy-only kernel beside an attention's log-sum-exp). Exits non-zero on failure."""

import math
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"
import torch  # noqa: E402

from toprovar.kernels.reference import attention_entropy_reference  # noqa: E402
from toprovar.kernels.triton_fae import entropy_forward, fae_forward  # noqa: E402

torch.manual_seed(int(sys.argv[1]))
CONFIG = (16, 16, 4, 1)  # small blocks so every shape below is ragged against them


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


failures = []
SHAPES = [(1, 2, 19, 45, 16), (2, 1, 16, 16, 32), (1, 1, 7, 33, 64), (1, 1, 20, 37, 128), (1, 1, 5, 9, 32)]
# Both load paths (pointers, TMA descriptors) and both placements of the entropy row sum; the last
# shape has no full key block.
for use_tma, after_pv in [(False, False), (True, False), (False, True), (True, True)]:
    kw = dict(config=CONFIG + (after_pv,), use_tma=use_tma)
    tag = f"tma={use_tma} entropy_after_pv={after_pv}"
    for B, H, Lq, Lk, D in SHAPES:
        q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
        scale = float(torch.rand(()) * 0.5 + 0.05) * (-1 if Lk == 9 else 1)  # one negative scale
        out, ent = fae_forward(q, k, v, scale, True, **kw)
        ref_out, ref_ent = attention_entropy_reference(q.double(), k.double(), v.double(), scale)
        plain, none = fae_forward(q, k, v, scale, False, **kw)
        if not (rel(out, ref_out) <= 1e-5 and rel(ent, ref_ent) <= 1e-5):
            failures.append(f"{tag} {(B, H, Lq, Lk, D)}: out {rel(out, ref_out):.2e} entropy {rel(ent, ref_ent):.2e}")
        if none is not None or not torch.equal(plain, out):
            failures.append(f"{tag} {(B, H, Lq, Lk, D)}: no-entropy variant differs")
        # Flat rows (q = 0): uniform attention, entropy log Lk. Sharp rows: q aligned with one key.
        flat, flat_ent = fae_forward(torch.zeros_like(q), k, v, scale, True, **kw)
        if (flat_ent - math.log(Lk)).abs().max() > 1e-5 or rel(flat, v.mean(2, keepdim=True).expand_as(flat)) > 1e-5:
            failures.append(f"{tag} {(Lq, Lk)}: flat rows entropy {flat_ent.mean():.6f} vs log Lk {math.log(Lk):.6f}")
        kn = torch.nn.functional.normalize(k, dim=-1)
        target = torch.randint(0, Lk, (Lq,))
        sharp_q = kn[:, :, target] * 200.0
        _, sharp_ent = fae_forward(sharp_q, kn, v, 1.0, True, **kw)
        _, sharp_ref = attention_entropy_reference(sharp_q.double(), kn.double(), v.double(), 1.0)
        if sharp_ent.max() > 1e-3 or (sharp_ent.double() - sharp_ref.double()).abs().max() > 1e-5:
            failures.append(f"{tag} {(Lq, Lk)}: sharp rows entropy max {sharp_ent.max():.2e}")
# The entropy-only kernel, given the log-sum-exp of the rows (exact, or off by a rounding-sized
# amount, which its summed normalizer cancels); strided (view) queries as the model's blocks give.
for B, H, Lq, Lk, D in SHAPES:
    q = torch.randn(B, Lq, H, D).transpose(1, 2)
    k = torch.randn(B, H, Lk, D)
    scale = float(torch.rand(()) * 0.5 + 0.05) * (-1 if Lk == 9 else 1)
    s = scale * q.double() @ k.double().transpose(-1, -2)
    lse = torch.logsumexp(s, -1)
    _, ref_ent = attention_entropy_reference(q.double(), k.double(), k.double(), scale)
    for shift in (0.0, 1e-5):
        ent = entropy_forward(q, k, (lse + shift).float(), scale, config=CONFIG)
        if rel(ent, ref_ent) > 1e-5:
            failures.append(f"entropy_forward {(B, H, Lq, Lk, D)} shift {shift}: {rel(ent, ref_ent):.2e}")
    kn = torch.nn.functional.normalize(k, dim=-1)
    sharp_q = kn[:, :, torch.randint(0, Lk, (Lq,))] * 200.0
    sharp_lse = torch.logsumexp(sharp_q.double() @ kn.double().transpose(-1, -2), -1).float()
    sharp = entropy_forward(sharp_q, kn, sharp_lse, 1.0, config=CONFIG)
    flat = entropy_forward(torch.zeros_like(q), k, torch.full(q.shape[:3], math.log(Lk)), scale, config=CONFIG)
    if sharp.max() > 1e-3 or (flat - math.log(Lk)).abs().max() > 1e-5:
        failures.append(f"entropy_forward {(Lq, Lk)}: sharp max {sharp.max():.2e}, flat {flat.mean():.6f}")
print("\n".join(failures) or "ok")
sys.exit(1 if failures else 0)
