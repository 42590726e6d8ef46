"""OuterSync's allocation-free sync: the persistent reduce workspace, the flat snapshot, the chunked norm."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from test_outer import initial, local_tensors, spawn

from lightning_localsgd.engine import OuterSync, resolve_outer_optimizer
from lightning_localsgd.engine.outer import squared_norm


# ---------------------------------------------------------------- the norm
def test_squared_norm_is_float64_close_and_finite_exactly_when_delta_is():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1_000_003, generator=g)
    b = a + 1e-3 * torch.randn(1_000_003, generator=g)
    want = float((a - b).double().pow(2).sum())
    assert abs(squared_norm(a, b) / want - 1) < 1e-6
    assert squared_norm(a - b) == squared_norm(a, b)  # the same fp32 differences, the same chunks
    assert squared_norm(torch.zeros(0), torch.zeros(0)) == 0.0
    # finite values whose squares overflow fp32: redone in float64, still finite (as the float64 sum was)
    big = torch.full((70_000,), 1e20)
    assert math.isclose(squared_norm(big, torch.zeros_like(big)), 70_000 * 1e40, rel_tol=1e-6)
    # a non-finite element, or an fp32 difference that overflows: not finite
    bad = a.clone()
    bad[123_456] = float("nan")
    assert math.isnan(squared_norm(bad, b))
    bad[123_456] = float("inf")
    assert squared_norm(bad, b) == float("inf")
    assert squared_norm(torch.tensor([3e38]), torch.tensor([-3e38])) == float("inf")


# ---------------------------------------------------------------- the workspace
class KeepingSGD(torch.optim.Optimizer):
    """Plain SGD that keeps a reference to each gradient it saw (not a torch.optim class: gets copies)."""

    def __init__(self, params, lr=0.5):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p].setdefault("grads", []).append(p.grad)
                    p.add_(p.grad, alpha=-group["lr"])


def scenario_workspace(rank, world):
    out = {}
    # streaming, weighted + stop flag: fragment 0's weight sits where fragment 1's values start, so with fragment 1
    # in flight fragment 0 needs a buffer of its own; the results must equal a whole-model sync's
    params = [t.clone() for t in initial()]
    frag = OuterSync(params, outer_optimizer=resolve_outer_optimizer("diloco"), fragments=2)
    whole_params = [t.clone() for t in initial()]
    whole = OuterSync(whole_params, outer_optimizer=resolve_outer_optimizer("diloco"))
    weights = [1.0, 3.0]
    rounds = []
    for sync in range(2):
        for p, q, t in zip(params, whole_params, local_tensors(rank, sync)):
            p.copy_(t)
            q.copy_(t)
        order = [1, 0] if sync == 0 else [0, 1]
        for f in order:
            frag.start_sync(f, weight=weights[rank], stop=False)
        regions = {f: frag.pending[f].region for f in order}
        stops = [frag.finish_sync(f).stop_requested for f in order]
        res = whole.sync(weight=weights[rank], stop=rank == 1)
        rounds.append({"regions": regions, "stops": stops, "whole_stop": res.stop_requested,
                           "frag": [p.clone() for p in params], "whole": [p.clone() for p in whole_params],
                           "snap": [s.detach().clone() for s in frag.snapshot],
                           "snap_whole": [s.detach().clone() for s in whole.snapshot]})
    out["rounds"] = rounds
    out["workspace_bytes"] = (frag.workspace_bytes, whole.workspace_bytes, frag.owned_numel)
    out["views"] = [s.untyped_storage().data_ptr() == frag._flat.untyped_storage().data_ptr() for s in frag.snapshot]
    # no group weighed in: no outer step, θ_g kept (the mean is θ_g itself, copied into the buffer), and the
    # parameters are not replaced by θ_g (there is no mean to adopt: a job resuming mid-interval keeps its progress)
    before = [s.detach().clone() for s in whole.snapshot]
    momentum = [whole.outer_optimizer.state[s]["momentum_buffer"].clone() for s in whole.snapshot]
    for p in whole_params:
        p.add_(1.0)
    live = [p.clone() for p in whole_params]
    res = whole.sync(weight=0.0)
    out["zero_weight"] = {
        "kept": all(torch.equal(s.detach(), b) for s, b in zip(whole.snapshot, before)),
        "momentum": all(torch.equal(whole.outer_optimizer.state[s]["momentum_buffer"], m)
                     for s, m in zip(whole.snapshot, momentum)),
        "params": all(torch.equal(p, q) for p, q in zip(whole_params, live))
        and not any(torch.equal(p, b.view_as(p)) for p, b in zip(whole_params, before)), "norm": res.pseudo_grad_norm}
    # an optimizer that is not torch.optim's keeps copies of its gradients, which later syncs do not overwrite
    kp = [t.clone() for t in initial()]
    keeping = OuterSync(kp, outer_optimizer=KeepingSGD)
    deltas = []
    for sync in range(2):
        theta = [s.detach().clone() for s in keeping.snapshot]
        for p, t in zip(kp, local_tensors(rank, sync)):
            p.copy_(t)
        mean = [t.clone() for t in kp]
        for m in mean:
            dist.all_reduce(m)
            m.div_(world)
        deltas.append([(t - m.view(-1)) for t, m in zip(theta, mean)])
        keeping.sync()
    kept = [keeping.outer_optimizer.state[s]["grads"] for s in keeping.snapshot]
    out["kept"] = all(torch.allclose(kept[j][i], deltas[i][j], atol=1e-6, rtol=0)
                      for i in range(2) for j in range(len(kept)))
    return out


def test_workspace_fragments_weights_and_kept_gradients(tmp_path):
    got = spawn(scenario_workspace, 2, tmp_path)
    for rank in got:
        first, second = rank["rounds"]
        # round 1 started fragment 1 first: fragment 0's [values + weight + stop] overlaps it -> its own buffer
        assert first["regions"][1] == (15, 24) and first["regions"][0] is None
        # round 2 started fragment 0 first: it takes the workspace, fragment 1 the rest of it
        assert second["regions"][0] == (0, 17) and second["regions"][1] is None
        for r in rank["rounds"]:
            assert all(torch.equal(a, b) for a, b in zip(r["frag"], r["whole"]))
            assert all(torch.equal(a, b) for a, b in zip(r["snap"], r["snap_whole"]))
            assert r["stops"] == [False, False] and r["whole_stop"]
        owned = rank["workspace_bytes"][2]
        assert rank["workspace_bytes"][:2] == ((owned + 2) * 4, (owned + 2) * 4)
        assert all(rank["views"])
        assert rank["zero_weight"] == {"kept": True, "momentum": True, "params": True, "norm": 0.0}
        assert rank["kept"]
