"""torch's model averagers: ``PostLocalSGDOptimizer(AdamW, PeriodicModelAverager(period=H, warmup_steps=H - 1))`` on a
plain loop (``torch.distributed.algorithms.model_averaging``).

The averager counts from 0 and averages when ``(step - warmup_steps) % period == 0``: with the default
``warmup_steps=0`` it averages after optimizer steps 1, H+1, 2H+1, …; ``warmup_steps = H - 1`` puts the averages after
steps H, 2H, … as everyone else does (no DDP inside the loop, so its "warm-up" steps are plain local steps)."""

from __future__ import annotations

from typing import Any

from .common import all_equal_across_ranks, init_default_group, make_model, optimizers
from .interface import AddTry, Loop, Peer, SyncImpl, signature, try_dead_peer, try_resume_plain


class TorchAverager(Peer):
    family, column = "torch_averager", "torch averager"
    labels = {"torch_averager": "torch PeriodicModelAverager"}
    sync_impls = {"average": ["torch_averager"]}
    train_runs = {"average": ["torch_averager"]}

    def sync_impl(self, name: str, model: Any, acc: Any, manager: Any) -> SyncImpl:
        import torch
        from torch.distributed.algorithms.model_averaging.averagers import (
            PeriodicModelAverager,
        )

        averager = PeriodicModelAverager(period=1, warmup_steps=0)
        for p in model.parameters():  # it averages only the parameters that have a .grad (as after a backward)
            p.grad = torch.zeros_like(p)
        return SyncImpl(name, model, lambda: averager.average_parameters(model.parameters()), lambda: 0, "none")

    def loop(self, name: str, job: dict, rank: int, model: Any, opt: Any) -> Loop:
        init_default_group()
        from torch.distributed.algorithms.model_averaging.averagers import (
            PeriodicModelAverager,
        )
        from torch.distributed.optim import PostLocalSGDOptimizer

        H = job["sync_every"]
        return Loop(model, PostLocalSGDOptimizer(opt, PeriodicModelAverager(period=H, warmup_steps=H - 1)))

    def features(self, job: dict, rank: int, batches: list, add: AddTry) -> None:
        import torch
        from torch.distributed.algorithms.model_averaging.averagers import (
            PeriodicModelAverager,
        )
        from torch.distributed.algorithms.model_averaging.utils import average_parameters

        init_default_group()
        H = job["sync_every"]
        name = "torch PeriodicModelAverager"
        init = signature(PeriodicModelAverager.__init__)
        add("DiLoCo outer step", name, lambda: ("no", f"no outer optimizer: {init} averages parameters"))
        add("exact resume mid-interval", name, lambda: try_resume_plain(self, "torch_averager", job, 0, batches))

        def warmup() -> tuple[str, str]:
            import torch.distributed as dist
            from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
                PostLocalSGDState,
                post_localSGD_hook,
            )
            from torch.distributed.optim import PostLocalSGDOptimizer

            def run(subgroup: Any) -> bool:
                model = make_model(job)
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                ddp.register_comm_hook(PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=H),
                                       post_localSGD_hook)
                opt, _ = optimizers(model)
                opt = PostLocalSGDOptimizer(opt, PeriodicModelAverager(period=H, warmup_steps=H))
                equal = False
                for i, (x, y) in enumerate(batches[:H + 2]):
                    opt.zero_grad()
                    ddp(x, y)[1].backward()
                    opt.step()
                    if i == H - 1:
                        equal = all_equal_across_ranks(model)
                return equal

            try:  # as its docs show it: subgroup=None (the intra-node subgroup)
                equal = run(None)
                how = "subgroup=None as in its docs"
            except ValueError as err:
                import torch.distributed as dist

                subgroup, _ = dist.new_subgroups(group_size=1)  # each rank alone after the warm-up: local SGD
                equal = run(subgroup)
                how = (f"its documented subgroup=None fails on CPU ({str(err).split('.')[0]}); with "
                       "subgroup=new_subgroups(group_size=1)")
            return ("yes" if equal else "no"), (f"DDP + PostLocalSGDState(start_localSGD_iter={H}) + "
                                                f"post_localSGD_hook on CPU/gloo, {how}; ranks equal after the "
                                                f"warm-up: {equal}")

        add("synchronous warm-up", name, warmup)
        add("compressed sync on CPU", name,
            lambda: ("no", f"no codec option: {signature(average_parameters)} all-reduces the flat parameters in "
                           "their dtype"))
        add("streaming (fragments)", name,
            lambda: ("partial", "average_parameters() takes any parameter subset; no schedule or overlap of fragments"))
        add("token-weighted mean (uneven workers)", name,
            lambda: ("no", f"no weight argument: {signature(PeriodicModelAverager.average_parameters)}"))
        add("FSDP groups", name, lambda: ("not tried", "too slow for the default here"))
        model = make_model(job)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        add("dead-peer handling", name,
            lambda: try_dead_peer(lambda: average_parameters(iter(model.parameters()), None), rank, job["dead_limit"]))
