"""Federated worker groups: separately launched jobs meeting at syncs through torchft's lighthouse (CPU, gloo).

Every job is one process (``tests/workers/train_federated.py``) reading the data in its own order. The reference is
written out here: each group's inner SGD steps by hand, then at each sync the mean over the groups that took part
(from the jobs' own sync records: a group weighs 1 when it trained the interval) and the outer step (exact mean, or
Nesterov SGD lr 0.7 momentum 0.9 by hand).
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

pytest.importorskip("torchft")  # the [ft] extra; installed with [dev]
import _forkserver
from reference import initial_net
from torchft._torchft import LighthouseServer
from workers.tiny import make_dataset

WORKER = Path(__file__).parents[1] / "workers" / "train_federated.py"
H, STEPS = 4, 12
ATOL = 1e-5
HEARTBEAT_S = 1.0  # the test lighthouse's heartbeat timeout
SYNC_SLACK_S = 2.0  # one sync of the tiny model (~50 ms) plus quorum ticks, on 2 shared cores


@pytest.fixture
def lighthouse():
    """An in-process lighthouse with fast test settings; yields ``(address, min_replicas -> server)``."""
    servers = []

    def start(min_replicas: int) -> str:
        server = LighthouseServer(bind="127.0.0.1:0", min_replicas=min_replicas, join_timeout_ms=20000,
                                  quorum_tick_ms=50, heartbeat_timeout_ms=int(HEARTBEAT_S * 1000))
        servers.append(server)
        return "127.0.0.1:" + server.address().rsplit(":", 1)[-1]

    yield start
    for server in servers:
        server.shutdown()


def launch(out: Path, address: str, group: int, name: str | None = None, fork_ranks: bool = True,
           **options) -> _forkserver.Popen | Job:
    """Job ``g{group}`` (data order seed ``group``); ``name`` names its dump and log (default: the group id).

    ``fork_ranks`` (default; a job of ``devices`` > 1 ranks): start every rank from the fork server, together, as
    torchrun does (:class:`Job`), instead of Lightning's launcher starting ranks 1.. as fresh interpreters (~8 s
    each)."""
    name = name or f"g{group}"
    cmd = [sys.executable, str(WORKER), "--lighthouse", address, "--group-id", f"g{group}", "--seed", str(group),
           "--out", str(out), "--sync-every", str(H), "--max-steps", str(STEPS), "--dump-name", name]
    for key, value in options.items():  # True: a bare flag (e.g. --async-save), False: left out
        if value is not False:
            cmd += ["--" + key.replace("_", "-")] + ([] if value is True else [str(value)])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(var, None)
    log = open(out / f"{name}.log", "w")  # noqa: SIM115 (the job's log, open while it runs)
    ranks = int(options.get("devices", 1))
    if fork_ranks and ranks > 1 and _forkserver.enabled():
        port = str(_forkserver.free_port())
        return Job([_forkserver.Popen(cmd, env={**env, "LOCAL_RANK": str(r), "NODE_RANK": "0", "WORLD_SIZE": str(ranks),
                                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                                      stdout=log, stderr=subprocess.STDOUT) for r in range(ranks)])
    return _forkserver.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


class Job:
    """The ranks of one job started together (``launch(fork_ranks=True)``), as one process to the tests: its exit
    code is rank 0's once every rank ended; as Lightning's launcher does, a rank > 0 that fails while rank 0 runs
    has the whole job SIGKILLed (after 5 s); ``kill`` kills every rank."""

    GRACE_S = 5.0

    def __init__(self, ranks: list[_forkserver.Popen]) -> None:
        self.ranks = ranks
        self._failed_at: float | None = None

    def poll(self) -> int | None:
        codes = [p.poll() for p in self.ranks]
        if all(c is not None for c in codes):
            return codes[0]
        if codes[0] is None and any(c not in (None, 0) for c in codes[1:]):
            self._failed_at = self._failed_at or time.monotonic()
            if time.monotonic() - self._failed_at > self.GRACE_S:
                self.kill()
        return None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("job", timeout)
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        for p in self.ranks:
            p.kill()


@contextmanager
def killed_on_exit(procs: list[_forkserver.Popen]) -> Iterator[list[_forkserver.Popen]]:
    """The launched jobs, every one killed and reaped on leaving the block: a failing test leaves no job running."""
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


def wait_all(procs: list[_forkserver.Popen], out: Path, timeout: float = 150) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for i, p in enumerate(procs):
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"job g{i} did not finish within {timeout} s:\n" + (out / f"g{i}.log").read_text()[-4000:])
    return codes


def load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


def run_jobs(out: Path, address: str, jobs: int, ranks: int = 1, timeout: float = 150, **options) -> dict[str, dict]:
    """``jobs`` jobs of ``ranks`` ranks, started together (``barrier``) with ``options``, and the options under
    ``g0=``, ``g1=``, ... for that job only; every job must end with exit code 0. Returns every rank's dump (``g0``,
    ``g0_r1``, ..., ``g1``, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    per_job = {g: options.pop(f"g{g}", {}) for g in range(jobs)}
    if ranks > 1:
        options["devices"] = ranks
    procs = [launch(out, address, g, barrier=jobs, **{**options, **per_job[g]}) for g in range(jobs)]
    with killed_on_exit(procs):
        codes = wait_all(procs, out, timeout=timeout)
    assert codes == [0] * jobs, "\n".join((out / f"g{g}.log").read_text()[-3000:] for g in range(jobs))
    return {f"g{g}{suffix}": load(out, f"g{g}{suffix}") for g in range(jobs)
            for suffix in [""] + [f"_r{r}" for r in range(1, ranks)]}


def group_batches(seed: int, ranks: int = 1) -> list:
    """Per step, the batch of every rank of the job: one shuffled loader, or (``ranks > 1``) a DistributedSampler of
    seed ``seed`` split over the ranks (permutation of seed + epoch 0, rank r takes every ``ranks``-th index)."""
    data = make_dataset()
    if ranks == 1:
        return [[b] for b in DataLoader(data, batch_size=2, shuffle=True,
                                        generator=torch.Generator().manual_seed(seed))]
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    per_rank = [perm[r::ranks] for r in range(ranks)]
    return [[data[per_rank[r][i:i + 2]] for r in range(ranks)] for i in range(0, len(per_rank[0]), 2)]


def committed(dump: dict, step: int) -> dict | None:
    return next((a for a in dump["attempts"] if a["committed"] and a["step"] == step), None)


def reference(dumps: dict[str, dict], outer: str, momenta: dict[int, dict[str, torch.Tensor]] | None = None,
              ranks: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    """θ_g after each sync step, by hand, over the groups each sync's records say trained the interval (and DiLoCo's
    momentum after each sync step in ``momenta``). With ``ranks > 1`` a job's inner step is DDP's: the gradient of
    the mean of its ranks' losses."""
    base = initial_net()
    theta_g = {k: v.detach().clone() for k, v in base.named_parameters()}
    nets = {g: copy.deepcopy(base) for g, d in dumps.items() if d["start_step"] == 0}
    cursor = {g: 0 for g in dumps}
    batches = {g: group_batches(d["seed"], ranks) for g, d in dumps.items()}
    momentum: dict[str, torch.Tensor] = {}
    after: dict[int, dict[str, torch.Tensor]] = {}
    for s in range(H, STEPS + 1, H):
        for g, net in nets.items():  # the inner steps of the interval (up to a group's death)
            last = dumps[g]["global_step"] if dumps[g]["killed"] else s
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            for _ in range(s - H, min(s, last)):
                per_rank = batches[g][cursor[g]]
                cursor[g] += 1
                opt.zero_grad()
                losses = [F.mse_loss(net(x), y) for x, y in per_rank]
                (losses[0] if len(losses) == 1 else torch.stack(losses).mean()).backward()
                opt.step()
        weighed = [g for g, d in dumps.items() if (a := committed(d, s)) is not None and a["weight"] == 1.0]
        for k, old in list(theta_g.items()):
            mean = torch.stack([dict(nets[g].named_parameters())[k].detach() for g in weighed]).mean(0)
            if outer == "average":
                theta_g[k] = mean
            else:  # DiLoCo by hand: Nesterov SGD, lr 0.7, momentum 0.9
                delta = old - mean
                momentum[k] = delta.clone() if k not in momentum else 0.9 * momentum[k] + delta
                theta_g[k] = old - 0.7 * (delta + 0.9 * momentum[k])
        after[s] = {k: v.clone() for k, v in theta_g.items()}
        if momenta is not None:
            momenta[s] = {k: v.clone() for k, v in momentum.items()}
        for g, d in dumps.items():  # every group in the sync continues from θ_g (a joiner starts there)
            if committed(d, s) is not None:
                nets.setdefault(g, copy.deepcopy(base))
                with torch.no_grad():
                    for k, p in nets[g].named_parameters():
                        p.copy_(theta_g[k])
    return after


def params_at(dump: dict, step: int) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in next(p for s, p in dump["steps"] if s == step).items()}


def assert_matches(dump: dict, ref: dict[int, dict[str, torch.Tensor]], steps: range) -> None:
    for s in steps:
        got = params_at(dump, s)
        diff = max(float((got[k] - ref[s][k]).abs().max()) for k in ref[s])
        assert diff < ATOL, f"{dump['group_id']}: after the sync of step {s} off the reference by {diff:.3g}"


@pytest.mark.slow
def test_three_jobs_one_killed_mid_interval_then_restarted_heals(tmp_path, lighthouse):
    """g0, g1, g2 start together (the first interval: no failure, mean over all three); g2 is SIGKILLed mid-interval
    at step 6; g0 and g1 sync at step 8 over themselves; g2 restarted with the same group_id heals from a live peer
    at that sync (weight 0) and the three jobs sync at step 12 and end identical."""
    address = lighthouse(2)
    die_at = H + 2
    procs = [launch(tmp_path, address, g, outer="diloco", barrier=3, wait_for="g2r", wait_at_step=2 * H - 1,
                    die_at_step=die_at if g == 2 else -1) for g in range(3)]
    assert procs[2].wait(timeout=150) == -signal.SIGKILL, (tmp_path / "g2.log").read_text()[-3000:]
    killed_at = time.monotonic()
    procs.append(launch(tmp_path, address, 2, name="g2r", outer="diloco"))  # the same group_id, a fresh process
    codes = wait_all([procs[0], procs[1], procs[3]], tmp_path)
    assert codes == [0, 0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in ("g0", "g1", "g2r"))
    print(f"restarted job ran {time.monotonic() - killed_at:.1f} s")
    dumps = {name: load(tmp_path, name) for name in ("g0", "g1", "g2", "g2r")}
    survivors, killed, restarted = [dumps["g0"], dumps["g1"]], dumps["g2"], dumps["g2r"]

    # who weighed in at each sync (the jobs' own records)
    assert killed["killed"] and killed["global_step"] == die_at
    for d in (*survivors, killed):  # the first interval: all three trained and weighed in
        assert d["start_step"] == 0 and committed(d, H)["participants"] == 3 and committed(d, H)["weight"] == 1.0
    for d in survivors:
        assert d["global_step"] == STEPS and d["healed"] == 0
        first_after = committed(d, 2 * H)  # the restarted job takes part with weight 0: survivors only are averaged
        assert first_after["participants"] == 3 and first_after["weight"] == 1.0, d["attempts"]
        assert committed(d, 3 * H)["participants"] == 3
        print(f"{d['group_id']} sync attempts:", [(a["step"], round(a["seconds"], 3), a["committed"])
                                                 for a in d["attempts"]])
    heal = committed(restarted, 2 * H)
    assert heal is not None and heal["healed"] and heal["weight"] == 0.0, restarted["attempts"]
    assert restarted["healed"] == 1 and restarted["start_step"] == 2 * H and restarted["global_step"] == STEPS

    # values: every sync equals the hand reference over the groups that weighed in
    ref = reference(dumps, "diloco")
    for d in (*survivors, restarted):
        assert_matches(d, ref, range(restarted["start_step"] + H if d is restarted else H, STEPS + 1, H))
    # healed before its first inner step: the survivors' parameters after the sync of step 8
    start = {k.removeprefix("model."): v for k, v in restarted["start_params"].items()}
    assert all(torch.equal(start[k], params_at(dumps["g0"], 2 * H)[k]) for k in start)
    # all end identical: parameters, θ_g and the outer optimizer's momentum (healed from a peer)
    for d in (dumps["g1"], restarted):
        assert all(torch.equal(d["final"][k], dumps["g0"]["final"][k]) for k in d["final"])
        assert all(torch.equal(x, y) for x, y in zip(d["snapshot"], dumps["g0"]["snapshot"]))
        for key, state in d["outer_state"]["state"].items():
            assert torch.equal(state["momentum_buffer"], dumps["g0"]["outer_state"]["state"][key]["momentum_buffer"])
    # the groups really drift apart between syncs (so a wrong mean would show)
    assert max(float((params_at(dumps["g0"], 2)[k] - params_at(dumps["g1"], 2)[k]).abs().max()) for k in start) > 1e-4


def test_job_killed_inside_a_sync_survivors_redo_it_over_the_groups_left(tmp_path, lighthouse):
    """g0, g1, g2 sync at step 4; at the sync of step 8, g2 SIGKILLs itself inside the cross-group all-reduce (the
    quorum of that attempt holds all three). g0 and g1: their attempt fails before anything is written (θ_g, the
    outer momentum and θ_i as they were), they redo it over the two of them, reach max_steps, and every sync equals
    the hand reference (step 8 and 12: the mean over g0 and g1); the redo costs them about the heartbeat timeout."""
    address = lighthouse(2)
    procs = [launch(tmp_path, address, g, outer="diloco", barrier=3, die_in_sync_at_step=2 * H if g == 2 else -1)
             for g in range(3)]
    with killed_on_exit(procs):
        assert procs[2].wait(timeout=150) == -signal.SIGKILL, (tmp_path / "g2.log").read_text()[-3000:]
        codes = wait_all(procs[:2], tmp_path)
    assert codes == [0, 0], "\n".join((tmp_path / f"g{g}.log").read_text()[-2000:] for g in range(2))
    dumps = {f"g{g}": load(tmp_path, f"g{g}") for g in range(3)}
    survivors, killed = [dumps["g0"], dumps["g1"]], dumps["g2"]

    # g2 died inside the all-reduce of the sync of step 8, in a quorum of all three
    assert killed["killed"] and killed["global_step"] == 2 * H
    assert killed["reduces"][-1]["step"] == 2 * H and killed["reduces"][-1]["participants"] == 3
    assert committed(killed, 2 * H) is None
    momenta: dict[int, dict[str, torch.Tensor]] = {}
    ref = reference(dumps, "diloco", momenta)
    for d in survivors:
        assert d["global_step"] == STEPS and d["healed"] == 0
        tries = [a for a in d["attempts"] if a["step"] == 2 * H]
        print(f"{d['group_id']} attempts at step {2 * H}:",
              [(a["participants"], a["committed"], round(a["seconds"], 3), a.get("error", "")[:60]) for a in tries])
        assert tries[0]["participants"] == 3 and not tries[0]["committed"], tries  # the attempt g2 died in
        assert "by peer" in tries[0]["error"], tries  # its collective failed ("Connection closed/reset by peer")
        assert tries[-1]["participants"] == 2 and tries[-1]["committed"] and tries[-1]["weight"] == 1.0, tries
        assert not any(a["committed"] for a in tries[:-1])
        assert committed(d, 3 * H)["participants"] == 2
        # θ_g, the outer momentum and θ_i untouched by the failed attempt: the redo starts from the same values,
        # which are θ_g and the momentum after the sync of step 4 (by hand)
        reduces = [r for r in d["reduces"] if r["step"] == 2 * H]
        failed, redo = reduces[0], reduces[-1]
        assert failed["participants"] == 3 and redo["participants"] == 2 and redo["attempt"] > failed["attempt"]
        names = list(ref[H])
        for name, got_failed, got_redo in zip(names, failed["snapshot"], redo["snapshot"]):
            assert torch.equal(got_failed, got_redo), name
            assert float((got_redo - ref[H][name].view(-1)).abs().max()) < ATOL, name  # θ_g is kept flat
        assert all(torch.equal(failed["params"][k], redo["params"][k]) for k in failed["params"])
        assert len(redo["momentum"]) == len(names)
        for key, buf in redo["momentum"].items():
            assert torch.equal(buf, failed["momentum"][key])
            assert float((buf - momenta[H][names[key]].view(-1)).abs().max()) < ATOL
        # the synced values: the hand reference, over all three at step 4, over the survivors at steps 8 and 12
        assert_matches(d, ref, range(H, STEPS + 1, H))
        stall = sum(a["seconds"] for a in tries)
        print(f"{d['group_id']}: sync of step {2 * H} with the failed attempt took {stall:.2f} s")
        assert stall < HEARTBEAT_S + SYNC_SLACK_S, tries
    assert all(torch.equal(dumps["g1"]["final"][k], dumps["g0"]["final"][k]) for k in dumps["g0"]["final"])
    # θ_i really differ between groups at a sync (so a mean over the wrong groups would show)
    assert max(float((killed["reduces"][-1]["params"][k] - survivors[0]["reduces"][-1]["params"][k]).abs().max())
               for k in survivors[0]["final"]) > 1e-4


@pytest.mark.slow
def test_two_jobs_of_two_ranks_ddp_inside_each_match_the_hand_reference(tmp_path, lighthouse):
    """2 jobs × 2 ranks: DDP inside each job (its ranks read halves of the job's own order), rank k of each job syncs
    its slice with rank k of the other; every sync equals the hand reference (each job's inner step = the mean
    gradient of its two ranks' batches; DiLoCo over the two jobs), and all four ranks end identical."""
    address = lighthouse(2)
    procs = [launch(tmp_path, address, g, outer="diloco", barrier=2, devices=2) for g in range(2)]
    with killed_on_exit(procs):
        codes = wait_all(procs, tmp_path)
    assert codes == [0, 0], "\n".join((tmp_path / f"g{g}.log").read_text()[-3000:] for g in range(2))
    dumps = {f"g{g}": load(tmp_path, f"g{g}") for g in range(2)}
    ref = reference(dumps, "diloco", ranks=2)
    for name in ("g0", "g1"):
        rank1 = load(tmp_path, f"{name}_r1")
        for d in (dumps[name], rank1):
            assert d["global_step"] == STEPS
            assert all(committed(d, s)["participants"] == 2 and committed(d, s)["weight"] == 1.0
                       for s in range(H, STEPS + 1, H)), d["attempts"]
            assert_matches(d, ref, range(H, STEPS + 1, H))
            assert all(torch.equal(d["final"][k], dumps["g0"]["final"][k]) for k in d["final"])
        # each rank reduced only its own slice of the model: the two slices make one copy
        sizes = [sum(t.numel() for t in x["snapshot"]) for x in (dumps[name], rank1)]
        assert sum(sizes) == sum(v.numel() for v in dumps[name]["final"].values()) and min(sizes) > 0
    # the jobs' ranks really saw different data (so a job that ignored its second rank would show)
    g0 = dumps["g0"]
    assert max(float((params_at(g0, 1)[k] - reference_one_rank_step(k)).abs().max()) for k in params_at(g0, 1)) > 1e-4


def reference_one_rank_step(name: str) -> torch.Tensor:
    """Job g0's parameters after one inner step on its rank 0's batch alone (what a job ignoring rank 1 would do)."""
    net = initial_net()
    x, y = group_batches(0, ranks=2)[0][0]
    torch.optim.SGD(net.parameters(), lr=0.1).zero_grad()
    F.mse_loss(net(x), y).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
    return dict(net.named_parameters())[name].detach()


@pytest.mark.slow
def test_unreachable_lighthouse_fails_fast_naming_the_address(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    os.environ["TORCHFT_CONNECT_TIMEOUT_SEC"] = "2"
    try:
        start = time.monotonic()
        proc = launch(tmp_path, address, 0)
        code = wait_all([proc], tmp_path, timeout=90)[0]
        elapsed = time.monotonic() - start
    finally:
        os.environ.pop("TORCHFT_CONNECT_TIMEOUT_SEC")
    log = (tmp_path / "g0.log").read_text()
    assert code != 0
    assert f"the lighthouse at '{address}' is unreachable" in log, log[-3000:]
    assert "tried for 2 s" in log
    print(f"failed after {elapsed:.1f} s (process start included)")
