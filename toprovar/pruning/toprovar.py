"""ToProVAR pruner: scale-depth localization, Global/Detail layer scores and entropy token gating.

Where each decision's entropy comes from (causal, documented choice; toprovar-method.md gap 7):
  * The first `token.protect_layers` blocks of every scale always run on all tokens; from
    `scale.min_scale` on (the first scale that can prune or exit) they report their
    self-attention entropy (`toprovar.attention`, computed beside the unchanged attention output).
    Their head-mean entropy of the conditional rows, averaged over those probe layers, is H_i^s.
    Before min_scale no decision reads it, so it is not computed there (`acts_at` False), except
    at the representative scale of online layer scores.
  * ρ_s and the crossing test use H_i^s of the current scale, so D is known after the probe
    layers of scale D; the remaining blocks of that scale already prune (action start_pruning).
    With action `exit`, generation stops refining after scale D (Table 10 "Scale Depth Loc.").
  * Token priorities at every later block of the scale use the same H_i^s; q_i = φ(s)·R_l·Ĥ_i
    orders tokens identically in every layer, so one sort per scale serves all layers.
    `token.order: frequency` keeps Eq. 6's count per layer but ranks tokens by FastVAR's
    high-pass score ||x_i − mean(x)||² of the scale's input (read before block 0, conditional
    rows), i.e. object tokens before flat background; `token.order: edge` by a local one
    (distance to the 3×3 neighbourhood mean, spread over the neighbourhood: `stages.edge_scores`),
    i.e. object boundaries before smooth gradients. On `tiny` the entropy ranking follows token
    rows rather than content (docs/benchmarks.md).
  * R_l: `static` from the policy's σ1/σ2 ratios; `online` (or static without ratios) from the
    SVD of each layer's h×w entropy map at the representative scale; until it is measured every
    layer counts as Global (R = 0: only α_min of tokens is pruned).

What a pruned token gets (`token.restore`, toprovar-method.md gap 4): `none` — nothing, its hidden
state passes through the layer; `cached` — that layer's update (block output − block input) of
an earlier scale that ran every token, area-resized to the current grid, as FastVAR restores
pruned tokens. The cache scale is `token.cache_scale`, or by default the last scale before pruning
started (recorded from scale min_scale − 1 on, so it is the scale right before D). `cached` adds
the updates of every layer a token skipped once, after the scale's last block (`end_scale`), so
the plan stays static (`static_plan`); `cached_layer` adds each right after its block (FastVAR's
granularity), which reads the hidden states between blocks (no static plan). Both are causal
(earlier scales only) and deterministic.

Host synchronization: one per scale (ρ_s and all layers' keep counts are read together), none
per layer. With `PrunerContext.host_plan` (the loop's `FastOptions.host_plan`), a scale whose
keep counts the policy fixes whatever the entropy (no token gating, or α_min = α_max: P_keep is
1 − α for every token) takes them from the host (`fixed_keep_counts`, the same ops on the CPU),
and ρ_s is read only where a decision needs it (the crossing test, from min_scale until D is
found); the other scales' ρ_s are read together after the last scale's blocks (`end_scale`), so
after D a scale runs without a host sync. Equal counts share one row of the plan table (the
same tokens), which the fast path's block chain keeps gathered between blocks. Under CFG the
unconditional row of an image runs the same tokens as its conditional row (after a CFG skip
there is none: the plan has the conditional rows only). With several
images per call each layer keeps the same count K for every image (the largest of their
counts), each image its own lowest-entropy tokens.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from toprovar.policy import Policy
from toprovar.pruning import stages
from toprovar.pruning.fastvar import frequency_scores
from toprovar.pruning.hooks import Pruner, PrunerContext


class ToProVARPruner(Pruner):
    plans_statically = True

    def __init__(self, policy: Policy):
        super().__init__(policy.guidance.skip_uncond_from_scale)
        self.policy = policy
        p = policy
        self.scale_cfg, self.layer_cfg, self.token_cfg = p.scale, p.layer, p.token
        # Table 10 "Scale + Layer": layers identified as Detail are skipped outright.
        self.skip_above = p.layer.skip_above
        if p.variant == "scale_layer" and self.skip_above is None:
            self.skip_above = 0.5

    # -- hooks -------------------------------------------------------------------------------------
    def begin(self, ctx: PrunerContext) -> None:
        ctx.check_policy(self.policy)
        self.ctx = ctx
        self.host_plan = bool(getattr(ctx, "host_plan", False))
        self._rho_pending: list[tuple[int, Tensor]] = []  # (scale, ρ_s on the device) read at the end
        self._R_host: tuple[float, ...] | None = None  # R as recorded in the trace (float32 values)
        self.trace = ctx.trace
        self.n_scales = len(ctx.schedule)
        self.depth = ctx.depth
        self.batch = ctx.batch
        self.D: int | None = None
        self.exit_at: int | None = None
        self.plan: dict[int, Tensor] = {}
        self.plan_scale = -1
        self._probe_sum: Tensor | None = None
        self.R: Tensor | None = None
        self.ratios: Tensor | None = None
        need_online = self.policy.uses_layer or self.skip_above is not None
        if self.layer_cfg.mode == "static" and self.layer_cfg.ratios is not None:
            self.ratios = torch.tensor(self.layer_cfg.ratios, dtype=torch.float32).to(ctx.device)
            self.R = stages.layer_score(self.ratios, self.layer_cfg.beta)
            need_online = False
        rep = self.layer_cfg.representative_scale
        if rep is None:
            rep = max(self.scale_cfg.min_scale - 1, 0)
        self.representative = min(rep, self.n_scales - 1) if need_online else None
        self.trace.pruning = {
            "method": "toprovar",
            "variant": self.policy.variant,
            "D": None,
            "R": None,
            "ratios": None,
            "representative_scale": self.representative,
        }
        if self.ratios is not None:
            self._record_layer_scores()
        # Restoration state: committed updates of the cache scale, layer -> (rows, C, h, w), and
        # this scale's recording (previous block input, updates so far) while it runs unpruned.
        self.restore = self.token_cfg.restore if self.policy.uses_token or self.skip_above is not None else "none"
        self.deltas: dict[int, Tensor] = {}
        self.delta_scale: int | None = None
        self._rec_prev: Tensor | None = None
        self._rec: dict[int, Tensor] = {}
        self._pending: tuple[int, Tensor] | None = None  # cached_layer: (layer, kept idx) to restore
        self._fills: dict[int, Tensor] = {}  # this scale's resized updates, per layer
        self._content_score: Tensor | None = None  # order=frequency|edge: (B, N) score of this scale's input

    def exit_before_scale(self, si: int) -> bool:
        return self.exit_at is not None and si >= self.exit_at

    def acts_at(self, si: int) -> bool:
        """From min_scale on (the crossing test reads ρ_s, D ≥ min_scale, pruning and exit follow
        D); before it only at the representative scale of online layer scores (every layer's
        entropy) and where the cached updates are recorded (`_records`: the hidden states)."""
        return si >= self.scale_cfg.min_scale or si == self.representative or self._records(si)

    def wants_entropy(self, si: int, li: int) -> bool:
        """The probe layers' entropy where a decision reads it (from min_scale on: the crossing
        test, then the keep plans), every layer's at the representative scale. ρ_s of the scales
        before min_scale is not measured (its trace value stays None): no decision reads it, and
        the entropy made those scales 40–50 % slower on tiny (issue 25)."""
        if si == self.representative:
            return True
        return li < self.token_cfg.protect_layers and si >= self.scale_cfg.min_scale

    def static_plan(self, si: int) -> int | None:
        """Probe layers of scale si if the rest of the scale follows a plan fixed after them.

        After the first `protect_layers` blocks (all tokens, entropy observed) the keep indices
        of every later block of the scale are decided at once and no later hook reads the hidden
        states; the pipeline may then run those blocks as one captured unit (CUDA graph). At the
        representative scale of online layer scores every layer's entropy is observed and nothing
        is pruned before min_scale: all `depth` blocks are probe layers, one unit like a plan's
        (block by block it cost 28 ms of host launches at Infinity-2B's scale 5 on the H100, against
        4.6 ms as a graph: docs/benchmarks.md); at or after min_scale it stays None (block by block).
        """
        if self.restore == "cached_layer" or self._records(si):
            return None
        if si == self.representative:
            return self.depth if si < self.scale_cfg.min_scale else None
        return min(self.token_cfg.protect_layers, self.depth)

    def keep_tokens(self, si: int, li: int, x: Tensor) -> Tensor | None:
        if li == 0 and self.token_cfg.order != "entropy" and (self.D is not None or si >= self.scale_cfg.min_scale):
            self._content_score = self._content_scores(si, x[: self.batch])
        if si != self.plan_scale:
            if self._records(si):
                self._record(si, li, x)
            return None
        if self.restore == "cached_layer":
            self._restore_pending(si, x)
        keep = self.plan.get(li)
        if keep is not None and self.restore == "cached_layer":
            self._pending = (li, keep)
        return keep

    def _content_scores(self, si: int, x: Tensor) -> Tensor:
        """order=frequency|edge: (B, N) content score of scale si's input, highest kept first."""
        if self.token_cfg.order == "edge":
            _, h, w = self.ctx.schedule[si]
            return stages.edge_scores(x, h, w)
        return frequency_scores(x)

    def observe(self, si: int, li: int, entropy: Tensor) -> None:
        H = entropy[: self.batch].float().mean(dim=1)  # (B, N): head mean of conditional rows
        if si == self.representative and entropy.shape[-1] == self._tokens(si):
            self._observe_layer_map(si, li, H)
        if li >= self.token_cfg.protect_layers:
            return
        self._probe_sum = H if li == 0 else self._probe_sum + H
        if li == self.token_cfg.protect_layers - 1 or li == self.depth - 1:
            self._decide(si, self._probe_sum / (li + 1))

    def end_scale(self, si: int, x: Tensor) -> None:
        if si == self.plan_scale:
            if self.restore == "cached_layer":
                self._restore_pending(si, x)
            elif self.restore == "cached":
                self._restore_all(si, x)
        elif self._records(si):
            self._record(si, self.depth, x)
            self.deltas, self.delta_scale = self._rec, si
        self._rec, self._rec_prev, self._pending, self._fills, self._content_score = {}, None, None, {}, None
        self.plan = {}
        if self._rho_pending and (si + 1 >= self.n_scales or self.exit_before_scale(si + 1)):
            values = torch.stack([rho for _, rho in self._rho_pending]).tolist()  # after the last blocks
            for (s, _), value in zip(self._rho_pending, values):
                self.trace.scales[s].rho = value
            self._rho_pending = []

    # -- restoration of pruned tokens -------------------------------------------------------------
    def _records(self, si: int) -> bool:
        """Whether scale si records its layer updates (it may be the cache scale of a later one)."""
        if self.restore == "none":
            return False
        if self.token_cfg.cache_scale is not None:
            return si == self.token_cfg.cache_scale
        return self.D is None and si >= self.scale_cfg.min_scale - 1

    def _record(self, si: int, li: int, x: Tensor) -> None:
        """x is the input of block li (li = depth: the scale's output): keeps the update of block li - 1."""
        if self._rec_prev is not None and li > 0:
            _, h, w = self.ctx.schedule[si]
            self._rec[li - 1] = (x.float() - self._rec_prev).transpose(1, 2).reshape(x.shape[0], -1, h, w)
        self._rec_prev = x.float().clone() if li < self.depth else None

    def _fill(self, si: int, li: int) -> Tensor | None:
        """The cached update of layer li resized to scale si's grid: (rows of si, N, C) float32, or
        None. A cache scale before a CFG skip has the unconditional rows too: the first rows are kept."""
        if li not in self._fills:
            delta = self.deltas.get(li)
            if delta is None:
                return None
            _, h, w = self.ctx.schedule[si]
            delta = delta[: self.ctx.rows_at(si)]
            self._fills[li] = F.interpolate(delta, size=(h, w), mode="area").flatten(2).transpose(1, 2)
        return self._fills[li]

    def _pruned_mask(self, x: Tensor, keep: Tensor) -> Tensor:
        pruned = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return pruned.scatter_(1, keep, False)

    def _restore_pending(self, si: int, x: Tensor) -> None:
        """cached_layer: the previous planned block's pruned tokens take its cached update (in place)."""
        if self._pending is None:
            return
        li, keep = self._pending
        self._pending = None
        fill = self._fill(si, li)
        if fill is not None:
            x.add_((fill * self._pruned_mask(x, keep)[..., None]).to(x.dtype))

    def _restore_all(self, si: int, x: Tensor) -> None:
        """cached: every pruned token takes the cached updates of the layers it skipped (in place)."""
        total = None
        for li, keep in self.plan.items():
            fill = self._fill(si, li)
            if fill is None:
                continue
            part = fill * self._pruned_mask(x, keep)[..., None]
            total = part if total is None else total + part
        if total is not None:
            x.add_(total.to(x.dtype))

    # -- decisions ---------------------------------------------------------------------------------
    def _tokens(self, si: int) -> int:
        _, h, w = self.ctx.schedule[si]
        return h * w

    def _observe_layer_map(self, si: int, li: int, H: Tensor) -> None:
        _, h, w = self.ctx.schedule[si]
        ratio = stages.principal_ratio(H.view(-1, h, w)).mean()
        if self.ratios is None:
            self.ratios = torch.full((self.depth,), math.inf, device=H.device)
        self.ratios[li] = ratio
        if li == self.depth - 1:
            self.R = stages.layer_score(self.ratios, self.layer_cfg.beta)
            self._record_layer_scores()

    def _record_layer_scores(self) -> None:
        self.trace.pruning["ratios"] = [float(v) for v in self.ratios.tolist()]
        self.trace.pruning["R"] = [float(v) for v in self.R.tolist()]
        self._R_host = tuple(self.trace.pruning["R"])

    def _decide(self, si: int, H: Tensor) -> None:
        """After the probe layers of scale si: ρ_s, D, and the keep plan of the remaining layers."""
        rho = stages.low_entropy_ratio(H).mean()
        plan_counts = None
        n = H.shape[-1]
        after_d = self.D is not None or si >= self.scale_cfg.min_scale
        needs_rho = self.D is None and si >= self.scale_cfg.min_scale  # the crossing test reads ρ_s
        prune_here = self.scale_cfg.action == "start_pruning" and (
            self.policy.uses_token or self.skip_above is not None
        )
        rows = self.ctx.rows_at(si) // self.batch  # 1 after a CFG skip (conditional rows only)
        fixed = self._fixed_counts(si, n) if self.host_plan and after_d and prune_here else None
        if fixed is not None:  # counts known on the host: the plan is only device work, no sync
            plan_counts = fixed
            order = self._plan_order(H)
            distinct = sorted({c for c in fixed if c < n})
            table = stages.keep_index_table(order, _to_device(distinct, H.device), repeat=rows) if distinct else None
            row_of = {c: i for i, c in enumerate(distinct)}
            rho_value = float(rho) if needs_rho else None
        elif after_d and prune_here:
            counts, order = self._plan_counts(si, H)
            # Every layer's keep indices, computed on the device before the sync, so that after it
            # the plan is only views (the GPU idles from the sync until the planned blocks start).
            table = stages.keep_index_table(order, counts, repeat=rows)
            values = torch.cat([rho[None], counts.float()]).tolist()  # the one host sync of this scale
            rho_value, plan_counts = values[0], [int(v) for v in values[1:]]
            row_of = {}
            for li, c in enumerate(plan_counts):  # layers of equal counts share one row (the same tokens)
                row_of.setdefault(c, li)
        else:
            rho_value = float(rho) if needs_rho or not self.host_plan else None
        if rho_value is None:
            self._rho_pending.append((si, rho))
        else:
            self.trace.scales[si].rho = rho_value
        if needs_rho and stages.crosses(rho_value, self.scale_cfg.tau, self.scale_cfg.crossing):
            self.D = si
            self.trace.pruning["D"] = si
            if self.scale_cfg.action == "exit":
                self.exit_at = si + 1
        if self.D is None or plan_counts is None:
            return
        self.plan_scale = si
        self.plan = {
            li: table[row_of[plan_counts[li]], :, : plan_counts[li]]
            for li in range(self.token_cfg.protect_layers, self.depth)
            if plan_counts[li] < n
        }

    def _fixed_counts(self, si: int, n: int) -> list[int] | None:
        """Every layer's keep count of scale si when the policy fixes it whatever the entropy (no
        token gating, or α_min = α_max), else None: `_plan_counts`'s ops on the CPU."""
        tc = self.token_cfg
        if self.policy.uses_token and tc.alpha_min != tc.alpha_max:
            return None
        skip = self.skip_above is not None and self.R is not None
        if (skip or self.policy.uses_layer and self.R is not None) and self._R_host is None:
            return None  # R lives on the device only (not recorded yet)
        if not self.policy.uses_layer:
            R = (1.0,) * self.depth
        else:
            R = self._R_host if self.R is not None else (0.0,) * self.depth
        return list(
            fixed_keep_counts(
                n,
                self.batch,
                R,
                (si + 1) / self.n_scales,
                tc.alpha_min if self.policy.uses_token else None,
                math.ceil(tc.min_keep * n),
                self.skip_above if skip else None,
            )
        )

    def _plan_order(self, H: Tensor) -> Tensor:
        """Token indices by keep priority (content score, or lowest entropy), as `_plan_counts` orders them."""
        if self._content_score is not None:  # highest content score first, ties by index
            return torch.argsort(-self._content_score, dim=-1, stable=True)
        return stages.keep_order(H)

    def _plan_counts(self, si: int, H: Tensor) -> tuple[Tensor, Tensor]:
        n = H.shape[-1]
        device = H.device
        if self.policy.uses_layer:
            R = self.R if self.R is not None else torch.zeros(self.depth, device=device)
        else:  # scale+token: no layer identification, every layer is gated alike
            R = torch.ones(self.depth, device=device)
        order = self._plan_order(H)
        if self.policy.uses_token:
            phi = (si + 1) / self.n_scales
            p_keep = stages.keep_probability(
                stages.normalize_entropy(H, self.token_cfg.normalize),
                R,
                phi,
                self.token_cfg.alpha_min,
                self.token_cfg.alpha_max,
            )
            counts = stages.keep_counts(p_keep, math.ceil(self.token_cfg.min_keep * n))
        else:
            counts = torch.full((self.depth,), n, dtype=torch.long, device=device)
        if self.skip_above is not None and self.R is not None:
            counts = torch.where(self.R >= self.skip_above, torch.zeros_like(counts), counts)
        return counts, order


@lru_cache(maxsize=256)
def fixed_keep_counts(
    n: int, batch: int, R: tuple[float, ...], phi: float, alpha: float | None, min_keep: int, skip_above: float | None
) -> tuple[int, ...]:
    """Keep counts of every layer for n tokens when they do not depend on the entropy: the ops of
    `ToProVARPruner._plan_counts` on float32 CPU tensors (alpha: α_min = α_max, or None without
    token gating; R: the layer scores as float32 values). With α_min = α_max, P_keep = 1 − α for
    every token whatever Ĥ (its factor α_max − α_min is 0), so a placeholder Ĥ gives the counts;
    on CPU they are the device path's bit for bit, on a GPU they can differ only where the sum of
    N equal values rounds across .5 in another order."""
    R_t = torch.tensor(R, dtype=torch.float32)
    if alpha is None:
        counts = torch.full((len(R),), n, dtype=torch.long)
    else:
        p_keep = stages.keep_probability(torch.ones(batch, n), R_t, phi, alpha, alpha)
        counts = stages.keep_counts(p_keep, min_keep)
    if skip_above is not None:
        counts = torch.where(R_t >= skip_above, torch.zeros_like(counts), counts)
    return tuple(int(c) for c in counts.numpy())  # a host tensor: numpy() would refuse a device one


def _to_device(values: list[int], device: torch.device) -> Tensor:
    """Small host ints as an int64 tensor on `device` without a host sync: a copy from pageable
    host memory to a GPU waits for the stream, a fill takes its value as a kernel argument."""
    return torch.stack([torch.full((), v, dtype=torch.long, device=device) for v in values])
