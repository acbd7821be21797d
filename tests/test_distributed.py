"""Data parallelism with real processes (gloo on 127.0.0.1): traces, curvature and batches
equal to one process's, rank 0 the only writer, a dead or hung rank that stops the others
within the timeout, and a resume on another number of processes (torchrun)."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from secondorder import distributed
from secondorder.curvature import hessian_diagonal
from secondorder.experiments import io
from secondorder.experiments.rundir import TIME_COLUMNS
from secondorder.experiments.runner import RunOptions, start_run
from secondorder.experiments.spec import load_spec, to_toml
from secondorder.linalg import MemoryError_, check_dense_fits

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402

WORKER = str(Path(__file__).parent / "dist_worker.py")
SRC = str(Path(distributed.__file__).parents[1])
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
QUIET = RunOptions(progress=False, log=lambda msg: None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    env.update({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **extra})
    return env


def _launch(world: int, args: list[str], timeout_s: str = "30") -> list[subprocess.Popen]:
    """``world`` processes of the worker, ranks 0..world-1, on a fresh port."""
    return _launch_script(world, [sys.executable, WORKER, *args], timeout_s)


def _launch_script(world: int, command: list[str], timeout_s: str = "30") -> list[subprocess.Popen]:
    """``world`` processes of ``command``, ranks 0..world-1, on a fresh port."""
    port = str(_free_port())
    return [
        subprocess.Popen(
            command,
            env=_env(
                RANK=str(r),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                SECONDORDER_DIST_TIMEOUT=timeout_s,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        out.append((p.returncode, err))
    return out


def _scenario(tmp: Path, world: int, names: list[str]) -> list[dict]:
    results = _finish(_launch(world, ["scenario", str(tmp), *names]))
    for code, err in results:
        assert code == 0, err[-3000:]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def single():
    """The scenario in this one process (no process group)."""
    return dist_worker.scenario()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _scenario(tmp_path_factory.mktemp("two"), 2, [])


def _close(a, b, tol: float = 1e-10) -> bool:
    return bool(torch.allclose(a, b, rtol=tol, atol=tol))


# ----------------------------------------------------------------------------------------------
# Equal to one process
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(dist_worker.RUNS))
def test_two_processes_give_the_single_process_trace(single, two, method):
    want = single[method]
    assert want["nit"] == dist_worker.ITERS
    for rank in two:
        got = rank[method]
        assert got["nit"] == want["nit"]
        assert _close(got["f"], want["f"]), (got["f"] - want["f"]).abs().max()
        assert _close(got["theta"], want["theta"])
    # every process ends on the very same numbers: the all-reduce gives each the same sums
    assert torch.equal(two[0][method]["theta"], two[1][method]["theta"])


def test_distributed_hessian_diagonal_and_blocks_equal_the_engine(single, two):
    for rank in two:
        assert _close(rank["diag"], single["diag"], 1e-12)
        for got, want in zip(rank["layers"], single["layers"], strict=True):
            assert _close(got, want, 1e-12)
        assert set(rank["blocks"]) == set(single["blocks"])
        for key, want in single["blocks"].items():
            assert _close(rank["blocks"][key], want, 1e-12)  # the cross-layer block (0, 1)


def test_lanczos_on_the_all_reduced_hessian(single, two):
    for rank in two:
        assert _close(rank["lanczos"], single["lanczos"], 1e-9)


def test_the_shares_of_one_two_and_three_processes_make_the_same_batches(single, two):
    """Two real processes, and the shares of three (taking a share needs no collective)."""
    obj = dist_worker.objective(dist_worker.EpochBatches(dist_worker.N, 25, seed=7))
    for k, whole in enumerate(single["shares"]):
        obj.begin_iteration(k)
        parts = {2: [r["shares"][k] for r in two], 3: []}
        for r in range(3):
            obj.data_parallel = distributed.Shard(r, 3)
            parts[3].append(obj.samples("value")[0])
            assert obj.batch_size == len(whole)  # the whole batch's size, on every process
        obj.data_parallel = None
        assert torch.equal(obj.samples("value")[0], whole)
        for world, shares in parts.items():
            assert len(shares) == world
            assert torch.equal(torch.cat(shares), whole)  # contiguous, in rank order
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


# ----------------------------------------------------------------------------------------------
# Runs: rank 0 writes, failures stop the others, resume on another number of processes
# ----------------------------------------------------------------------------------------------
def _spec_file(path: Path) -> Path:
    spec = {
        "name": "dp",
        "max_iter": 12,
        "checkpoint_every": 3,
        "metrics": ["train_loss", "test_accuracy"],
        "data": {"kind": "random", "n_train": 61, "n_test": 20, "n_features": 10, "seed": 0},
        "model": {"kind": "mlp", "hidden": [6], "activation": "tanh", "seed": 1},
        "loss": "cross_entropy",
        "l2": 1e-3,
        "sampler": {"kind": "fixed", "batch_size": 16, "seed": 2},
        "solvers": [
            {"name": "L-BFGS", "method": "lbfgs"},
            {"name": "Newton-CG", "method": "newton-cg", "options": {"curvature": "ggn"}},
            {"name": "K-FAC", "method": "kfac", "line_search": "none"},
        ],
    }
    path.write_text(to_toml(spec))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    spec = _spec_file(base / "dp.toml")
    return spec, start_run(load_spec(str(spec)), base / "ref", QUIET)


def _assert_same_traces(run: Path, ref: Path) -> None:
    for slug in ("l-bfgs", "newton-cg", "k-fac"):
        got = io.read_jsonl(run / "trace" / f"{slug}.jsonl")
        want = io.read_jsonl(ref / "trace" / f"{slug}.jsonl")
        assert len(got) == len(want) == 13  # θ₀ and 12 iterations: one writer
        for a, b in zip(got, want):
            assert set(a) == set(b)
            for key in set(b) - set(TIME_COLUMNS):
                x, y = a[key], b[key]
                if isinstance(y, float):
                    assert math.isclose(x, y, rel_tol=1e-10, abs_tol=1e-10), (slug, key, x, y)
                else:
                    assert x == y, (slug, key)


def _torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    assert TORCHRUN, "torchrun is installed with torch"
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={n}", "-m", "secondorder", *args]
    return subprocess.run(
        cmd, env=_env(SECONDORDER_DIST_TIMEOUT="30"), capture_output=True, text=True, timeout=240
    )


def test_torchrun_run_equals_one_process_and_only_rank_0_writes(reference, tmp_path):
    spec, ref = reference
    run = tmp_path / "run"
    out = _torchrun(2, "run", str(spec), "--run-dir", str(run), "--no-progress", "--no-report")
    assert out.returncode == 0, out.stderr[-3000:]
    assert io.read_json(run / "summary.json")["status"] == "complete"
    _assert_same_traces(run, ref)
    leftovers = [p.name for p in run.rglob("*") if p.name.startswith(".write-test")]
    assert not leftovers


@pytest.mark.parametrize(("fault", "limit"), [("kill", 10.0), ("stop", 3.0)])
def test_a_dead_or_hung_rank_stops_the_others_then_resume_on_three(
    reference, tmp_path, fault, limit
):
    spec, ref = reference
    run = tmp_path / "run"
    args = ["cli", fault, "40", "run", str(spec), "--run-dir", str(run), "--no-progress"]
    procs = _launch(2, [*args, "--no-report"], timeout_s=str(limit))
    start = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        procs[1].kill()  # the stopped one is still there
        _finish(procs, timeout=30)
    assert procs[0].returncode == 3, err[-3000:]
    assert "data-parallel rank 0 of 2" in err and "another process died or stopped" in err
    assert elapsed < 60
    if fault == "stop":
        assert "timeout 3 s" in err
    summary = io.read_json(run / "summary.json") if (run / "summary.json").exists() else {}
    assert summary.get("status") != "complete"
    assert any((run / "checkpoints").glob("*.pt"))
    if fault == "stop":
        return  # resuming is the same as after a kill
    # the dead rank took Newton-CG down after its checkpoint at iteration 3: continue there
    assert io.torch_load(run / "checkpoints" / "newton-cg.pt")["iteration"] == 3
    out = _torchrun(3, "resume", str(run), "--no-progress", "--no-report")
    assert out.returncode == 0, out.stderr[-3000:]
    assert io.read_json(run / "summary.json")["status"] == "complete"
    _assert_same_traces(run, ref)


# ----------------------------------------------------------------------------------------------
# Without a process group
# ----------------------------------------------------------------------------------------------
def test_one_process_needs_no_group_and_writes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    obj = dist_worker.objective()
    assert distributed.from_environment(obj) is obj and obj.data_parallel is None
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_writer()
    monkeypatch.setenv("RANK", "2")
    assert not distributed.is_writer()


def test_bad_environment_and_timeout_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="lacks MASTER_ADDR.*torchrun"):
        distributed.init()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        distributed.world_size()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="SECONDORDER_DIST_TIMEOUT must be a number"):
        distributed.timeout_seconds()
    with pytest.raises(ValueError, match="timeout must be a positive"):
        distributed.timeout_seconds(-1.0)
    monkeypatch.delenv(distributed.TIMEOUT_ENV)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT == 60.0


def test_a_rendezvous_nobody_answers_fails_within_the_timeout(monkeypatch):
    port = _free_port()  # nothing listens there: rank 0 never comes
    for key, value in dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    start = time.monotonic()
    with pytest.raises(distributed.PeerLost, match=rf"rank 1 of 2 .*127.0.0.1:{port} within 2 s"):
        distributed.init(timeout=2)
    assert time.monotonic() - start < 30
    assert not torch.distributed.is_initialized()


def test_shares_that_cannot_be_summed_are_refused_before_any_collective():
    shard = distributed.Shard(0, 3)  # no group: a collective would fail differently
    with pytest.raises(ValueError, match="share a dtype and device"):
        shard.sum([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    X, y = dist_worker.data()
    model = dist_worker.mlp([dist_worker.D, 8, dist_worker.K], "tanh", seed=1)
    with pytest.raises(ValueError, match="X has 2 samples, fewer than the 3 processes"):
        shard.curvature(hessian_diagonal, model, X[:2], y[:2], "cross_entropy", 0.0)


def test_data_parallel_needs_a_model_objective_and_a_group():
    from secondorder.objective import FunctionObjective, rosenbrock

    with pytest.raises(TypeError, match="data_parallel needs a ModelObjective"):
        distributed.data_parallel(FunctionObjective(rosenbrock(), 2))
    with pytest.raises(RuntimeError, match="not initialised"):
        distributed.data_parallel(dist_worker.objective())


def test_shard_bounds_cover_every_sample_once():
    for n in (0, 1, 2, 5, 61):
        for world in (1, 2, 3, 4):
            cuts = [distributed.Shard(r, world).bounds(n) for r in range(world)]
            assert cuts[0][0] == 0 and cuts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))


def test_local_device_gives_each_process_its_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.local_device("cuda") == torch.device("cuda", 3)
    assert distributed.local_device("cuda:1") == torch.device("cuda", 1)
    assert distributed.local_device("cpu") == torch.device("cpu")


def test_dense_guard_reads_gpu_memory_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**6, 10**9))
    with pytest.raises(MemoryError_, match=r"on cuda:0 needs 8,000,000 bytes.*500,000"):
        check_dense_fits((1000, 1000), torch.float64, "the dense Hessian", device="cuda:0")
    check_dense_fits((1000, 1000), torch.float64, "the dense Hessian", device="cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_objective_matches_cpu():
    cpu = dist_worker.objective()
    model = dist_worker.mlp([dist_worker.D, 8, dist_worker.K], "tanh", seed=1, dtype=torch.float64)
    gpu = dist_worker.ModelObjective(
        model, "cross_entropy", dist_worker.data(), l2=1e-2, device="cuda"
    )
    theta = cpu.initial_theta()
    f, g = cpu.value_and_grad(theta)
    fg, gg = gpu.value_and_grad(theta.cuda())
    assert _close(fg.cpu(), f) and _close(gg.cpu(), g)
    v = torch.randn_like(theta)
    assert _close(gpu.ggnvp(theta.cuda(), v.cuda()).cpu(), cpu.ggnvp(theta, v))
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(MemoryError_):
        check_dense_fits((free // 4 + 1, 1), torch.float64, "x", device="cuda")


# ----------------------------------------------------------------------------------------------
# Ranks that disagree, and a bad environment
# ----------------------------------------------------------------------------------------------
def _refused_once_by_rank_0(procs: list[subprocess.Popen], run: Path, expected: list[str]):
    (code0, err0), (code1, err1) = _finish(procs, timeout=120)
    assert code0 == code1 == 2, (err0[-3000:], err1[-3000:])
    assert "Traceback" not in err0 + err1
    line = err0.strip()
    assert len(line.splitlines()) == 1 and line.startswith("secondorder: error: the 2 proc")
    assert all(e in line for e in expected), line
    assert err1.strip() == ""  # said once, by rank 0
    assert not run.exists()  # nothing was written, nothing trained


def test_ranks_that_disagree_are_stopped_before_the_first_step(reference, tmp_path):
    spec, _ = reference
    run = tmp_path / "run"
    # rank 1 with another --set and another code version; and another X through the API
    other_spec = _launch(2, ["cli", "spec", "0", "run", str(spec), "--run-dir", str(run)])
    other_x = _launch(2, ["other-x"])
    expected = ["resolved spec of rank 1 differs", "l2: 0.001 → 0.002", "code version of rank 1"]
    _refused_once_by_rank_0(other_spec, run, expected)
    for code, err in _finish(other_x, timeout=120):
        assert code == 4 and "data (a digest of X and y) of rank 1 differs" in err, err[-3000:]


@pytest.mark.slow
def test_ranks_reading_other_labels_are_stopped_before_the_first_step(reference, tmp_path):
    spec, _ = reference
    run = tmp_path / "run"
    procs = _launch(2, ["cli", "labels", "0", "run", str(spec), "--run-dir", str(run)])
    _refused_once_by_rank_0(procs, run, ["data (a digest of X and y) of rank 1 differs"])


BAD_ENVIRONMENTS = [
    *[
        ({distributed.TIMEOUT_ENV: v}, distributed.TIMEOUT_ENV)
        for v in ("abc", "0", "nan", "-5", "inf")
    ],
    ({"WORLD_SIZE": "2"}, "lacks RANK"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE must be an integer, got 'abc'"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1"),
    ({"RANK": "1"}, "RANK must lie in [0, WORLD_SIZE=1)"),
]


def test_a_bad_distributed_environment_is_refused_once_before_any_work(
    reference, tmp_path, monkeypatch, capsys
):
    from secondorder import cli

    spec, ref = reference
    run = tmp_path / "stopped"
    shutil.copytree(ref, run)
    (run / "checkpoints" / "k-fac.pt").unlink()  # K-FAC has work left to do
    summary = io.read_json(run / "summary.json")
    summary["status"] = "interrupted"
    io.write_json(run / "summary.json", summary)
    before = (run / "summary.json").read_bytes()
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", distributed.TIMEOUT_ENV):
        monkeypatch.delenv(key, raising=False)
    for env, expected in BAD_ENVIRONMENTS:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            fresh = tmp_path / "fresh"
            for argv in (["run", str(spec), "--run-dir", str(fresh)], ["resume", str(run)]):
                code = cli.main([*argv, "--no-progress", "--no-report"])
                err = capsys.readouterr().err
                assert code == 2, (env, argv, err)
                assert len(err.strip().splitlines()) == 1 and expected in err, (env, err)
                assert err.startswith("secondorder: error: ")
            assert not fresh.exists()
            assert (run / "summary.json").read_bytes() == before  # no solver recorded failed
            assert not (run / "checkpoints" / "k-fac.pt").exists()
