"""What a resume checks and repairs: identity, integrity, locks, and kills at every write.

The reference is always an uninterrupted run of the same spec: after any fault and a resume,
every file of the run directory must equal that run's, with the wall-clock fields left out.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from secondorder.experiments import io, rundir
from secondorder.experiments.checkpoint import content_digest
from secondorder.experiments.runner import RunOptions, resume_run, start_run
from secondorder.experiments.spec import load_spec, spec_from_dict, to_toml

QUIET = RunOptions(progress=False, log=lambda msg: None)
# the digests cover the clocks, so they differ with them
CLOCKS = set(rundir.TIME_COLUMNS) | {"load_average", "digest", "rows_sha256"}


def _rosenbrock(max_iter: int = 12, every: int = 4) -> dict:
    return {
        "name": "ros",
        "max_iter": max_iter,
        "checkpoint_every": every,
        "data": {"kind": "rosenbrock", "a": 1.0, "b": 50.0},
        "solvers": [
            {"name": "GD", "method": "gd", "line_search": "armijo"},
            {"name": "Newton", "method": "newton"},
        ],
    }


def _logistic(max_iter: int = 10, every: int = 3) -> dict:
    return {
        "name": "logit",
        "max_iter": max_iter,
        "checkpoint_every": every,
        "data": {"kind": "two-class-2d", "n_train": 120, "n_test": 40},
        "model": {"kind": "logistic"},
        "sampler": {"kind": "reshuffled", "batch_size": 30, "n_batches": 2, "seed": 3},
        "solvers": [
            {"name": "L-BFGS", "method": "lbfgs"},
            {"name": "Adam", "method": "adam", "options": {"lr": 0.05}},
        ],
    }


def _strip(value):
    """A JSON-comparable copy without the clock fields (and the digest, which covers them)."""
    if isinstance(value, dict):
        return {str(k): _strip(v) for k, v in value.items() if k not in CLOCKS}
    if isinstance(value, (list, tuple)):
        return [_strip(v) for v in value]
    return io.to_jsonable(value)


def fingerprint(run: Path) -> dict[str, str]:
    """Every file of a run directory, as comparable text with the clocks left out."""
    out = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if not path.is_file() or rel in (".lock", "environment.json"):
            continue
        if path.suffix == ".json":
            content = _strip(io.read_json(path))
        elif path.suffix == ".jsonl":
            content = _strip(io.read_jsonl(path))
        elif path.suffix == ".csv":
            with open(path, newline="") as f:
                content = _strip(list(csv.DictReader(f)))
        elif path.suffix == ".pt":
            content = _strip(io.torch_load(path))
        else:
            content = path.read_text()
        out[rel] = json.dumps(content, sort_keys=True)
    return out


def _diff(got: dict[str, str], want: dict[str, str]) -> str:
    if set(got) != set(want):
        return f"files differ: extra {set(got) - set(want)}, missing {set(want) - set(got)}"
    bad = [k for k in want if got[k] != want[k]]
    return f"content differs in {bad}" if bad else ""


class _Kill(BaseException):
    """Stands for SIGKILL: nothing in the library catches it."""


def _kill_at_write(monkeypatch, n: int) -> list[int]:
    """Make the ``n``-th whole-file write of run files die before it happens (n = -1:
    count only); returns the running count."""
    real = io.atomic_write
    count = [0]

    def write(path, fn, binary=True):
        count[0] += 1
        if count[0] == n:
            raise _Kill(str(path))
        return real(path, fn, binary=binary)

    monkeypatch.setattr(io, "atomic_write", write)
    return count


@pytest.mark.parametrize("make", [_rosenbrock, _logistic], ids=["rosenbrock", "logistic"])
def test_a_kill_before_any_file_write_resumes_to_identical_files(tmp_path, monkeypatch, make):
    spec = spec_from_dict(make())
    with monkeypatch.context() as m:
        count = _kill_at_write(m, -1)
        ref = start_run(spec, tmp_path / "ref", QUIET)
        n_writes = count[0]
    want = fingerprint(ref)
    assert n_writes >= 10
    for n in range(1, n_writes + 1):
        run = tmp_path / f"run{n}"
        with monkeypatch.context() as m, pytest.raises(_Kill):
            _kill_at_write(m, n)
            start_run(spec, run, QUIET)
        if not (run / "run.json").is_file():  # never started: `run` starts over in it
            start_run(spec, run, QUIET)
        else:
            resume_run(run, QUIET)
        problem = _diff(fingerprint(run), want)
        assert not problem, f"killed before write {n}: {problem}"


def test_a_second_kill_during_the_resume_is_repaired_too(tmp_path, monkeypatch):
    spec = spec_from_dict(_logistic())
    want = fingerprint(start_run(spec, tmp_path / "ref", QUIET))
    rng = random.Random(0)
    for trial in range(6):
        run = tmp_path / f"run{trial}"
        with monkeypatch.context() as m, pytest.raises(_Kill):
            _kill_at_write(m, rng.randint(6, 20))
            start_run(spec, run, QUIET)
        with monkeypatch.context() as m:
            _kill_at_write(m, rng.randint(1, 6))
            with contextlib.suppress(_Kill):
                resume_run(run, QUIET)
        resume_run(run, QUIET)
        assert not _diff(fingerprint(run), want), f"trial {trial}"


def test_resume_rewrites_deleted_and_damaged_derived_files(tmp_path):
    run = start_run(spec_from_dict(_rosenbrock()), tmp_path / "run", QUIET)
    want = fingerprint(run)
    (run / "trace" / "gd.csv").unlink()
    summary = io.read_json(run / "summary.json")
    del summary["cells"]["main"]["solvers"]["Newton"]
    summary["cells"]["main"]["solvers"]["GD"] = {"status": "max_iter"}  # incomplete entry
    summary["status"] = "running"
    io.write_json(run / "summary.json", summary)
    resume_run(run, QUIET)
    assert not _diff(fingerprint(run), want)


def test_a_complete_run_has_its_derived_files_repaired_on_resume(tmp_path):
    run = start_run(spec_from_dict(_rosenbrock()), tmp_path / "run", QUIET)
    want = fingerprint(run)
    (run / "trace" / "newton.csv").unlink()
    resume_run(run, QUIET)
    assert not _diff(fingerprint(run), want)


def test_an_edited_spec_is_refused_with_the_difference(tmp_path):
    spec = spec_from_dict(_logistic(max_iter=6))
    run = tmp_path / "run"
    with pytest.raises(_Kill), pytest.MonkeyPatch.context() as m:
        _kill_at_write(m, 9)
        start_run(spec, run, QUIET)
    text = (run / "spec.toml").read_text()
    assert "seed = 3" in text
    (run / "spec.toml").write_text(text.replace("seed = 3", "seed = 4"))
    with pytest.raises(rundir.RunDirError) as err:
        resume_run(run, QUIET)
    message = str(err.value)
    assert "sampler.seed: 3 → 4" in message and "spec.toml was edited" in message
    assert "invalid spec" not in message
    (run / "spec.toml").write_text(text)  # undone: the resume goes on
    resume_run(run, QUIET)


def test_a_checkpoint_of_another_solver_is_refused(tmp_path):
    spec = spec_from_dict(_rosenbrock(max_iter=20, every=3))
    run = tmp_path / "run"
    with pytest.raises(_Kill), pytest.MonkeyPatch.context() as m:
        _kill_at_write(m, 8)  # GD has finished, Newton is under way
        start_run(spec, run, QUIET)
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "gd.pt", ckpts / "newton.pt")
    shutil.copy(run / "trace" / "gd.jsonl", run / "trace" / "newton.jsonl")
    with pytest.raises(io.CheckpointError) as err:
        resume_run(run, QUIET)
    assert "newton.pt belongs to another solver" in str(err.value)
    assert "solver 'GD' (expected 'Newton')" in str(err.value)


def test_a_checkpoint_from_another_run_is_refused(tmp_path):
    a = start_run(spec_from_dict(_rosenbrock()), tmp_path / "a", QUIET)
    other = _rosenbrock()
    other["data"]["b"] = 60.0
    run = tmp_path / "b"
    with pytest.raises(_Kill), pytest.MonkeyPatch.context() as m:
        _kill_at_write(m, 6)
        start_run(spec_from_dict(other), run, QUIET)
    shutil.copy(a / "checkpoints" / "gd.pt", run / "checkpoints" / "gd.pt")
    shutil.copy(a / "trace" / "gd.jsonl", run / "trace" / "gd.jsonl")
    with pytest.raises(io.CheckpointError, match="spec_sha256"):
        resume_run(run, QUIET)


def test_an_altered_checkpoint_is_refused_with_its_name(tmp_path):
    run = start_run(spec_from_dict(_rosenbrock()), tmp_path / "run", QUIET)
    path = run / "checkpoints" / "gd.pt"
    ckpt = io.torch_load(path)
    assert ckpt["digest"] == content_digest({k: v for k, v in ckpt.items() if k != "digest"})
    ckpt["theta"] = ckpt["theta"] + 1e-12  # loads fine, but is not what was saved
    torch.save(ckpt, path)
    with pytest.raises(io.CheckpointError, match="gd.pt: the content does not match its digest"):
        resume_run(run, QUIET)


def test_a_checkpoint_without_its_digest_is_refused_with_its_name(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(_Kill), pytest.MonkeyPatch.context() as m:
        _kill_at_write(m, 6)
        start_run(spec_from_dict(_rosenbrock(max_iter=20, every=3)), run, QUIET)
    path = run / "checkpoints" / "gd.pt"
    ckpt = io.torch_load(path)
    ckpt["theta"] = ckpt["theta"] + 1.0  # altered, and the digest that would show it removed
    del ckpt["digest"]
    torch.save(ckpt, path)
    before = path.read_bytes()
    with pytest.raises(io.CheckpointError, match="gd.pt has no digest"):
        resume_run(run, QUIET)
    assert path.read_bytes() == before  # nothing went on from the altered state
    # the same for the spec's digest in run.json
    meta = io.read_json(run / "run.json")
    del meta["spec_sha256"]
    io.write_json(run / "run.json", meta)
    with pytest.raises(rundir.RunDirError, match="run.json records no spec_sha256"):
        resume_run(run, QUIET)


def test_a_trace_edited_under_its_checkpoint_is_refused(tmp_path):
    spec = spec_from_dict(_rosenbrock(max_iter=20, every=3))
    run = tmp_path / "run"
    with pytest.raises(_Kill), pytest.MonkeyPatch.context() as m:
        _kill_at_write(m, 6)
        start_run(spec, run, QUIET)
    trace = run / "trace" / "gd.jsonl"
    rows = io.read_jsonl(trace)
    rows[1]["f"] = 0.0
    io.write_jsonl(trace, rows)
    with pytest.raises(io.CheckpointError, match="gd.pt: the trace file holds"):
        resume_run(run, QUIET)


def test_a_second_resume_of_a_directory_in_use_is_refused(tmp_path):
    spec = spec_from_dict(_rosenbrock())
    run = tmp_path / "run"
    with pytest.raises(_Kill), pytest.MonkeyPatch.context() as m:
        _kill_at_write(m, 6)
        start_run(spec, run, QUIET)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from secondorder.experiments import rundir\n"
            "with rundir.lock(Path(sys.argv[1])):\n"
            "    print('locked', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirError, match="in use by another secondorder process"):
            resume_run(run, QUIET)
    finally:
        holder.kill()
        holder.wait()
    resume_run(run, QUIET)  # the lock died with its holder
    assert io.read_json(run / "summary.json")["status"] == "complete"


def test_orphaned_temporary_files_are_removed_on_resume(tmp_path):
    spec = spec_from_dict(_rosenbrock())
    run = tmp_path / "run"
    with pytest.raises(_Kill), pytest.MonkeyPatch.context() as m:
        _kill_at_write(m, 7)
        start_run(spec, run, QUIET)
    orphans = [run / ".summary.json.abc123.part", run / "checkpoints" / ".gd.pt.x1y2.part"]
    for path in orphans:
        path.write_bytes(b"half a file")
    resume_run(run, QUIET)
    assert not any(p.exists() for p in orphans)
    assert not list(run.rglob("*.part"))


def test_a_directory_killed_before_run_json_is_accepted_by_run_and_resume(tmp_path):
    spec = spec_from_dict(_rosenbrock())
    want = fingerprint(start_run(spec, tmp_path / "ref", QUIET))
    for i, finish in enumerate((start_run, None)):
        run = tmp_path / f"run{i}"
        with pytest.raises(_Kill), pytest.MonkeyPatch.context() as m:
            _kill_at_write(m, 3)  # environment.json and spec.toml written, run.json not
            start_run(spec, run, QUIET)
        assert (run / "spec.toml").is_file() and not (run / "run.json").is_file()
        if finish is None:
            resume_run(run, QUIET)
        else:
            finish(spec, run, QUIET)
        assert not _diff(fingerprint(run), want)


def test_checkpoint_size_does_not_grow_with_the_trace(tmp_path):
    sizes = []
    for n in (10, 200):
        run = start_run(spec_from_dict(_rosenbrock(max_iter=n, every=1)), tmp_path / f"r{n}", QUIET)
        assert len(io.read_jsonl(run / "trace" / "gd.jsonl")) == n + 1
        sizes.append((run / "checkpoints" / "gd.pt").stat().st_size)
    # embedding the rows made every checkpoint O(k), and checkpoint_every = 1 quadratic
    assert sizes[1] < 1.2 * sizes[0], sizes


# ----------------------------------------------------------------------------------------------
# Real SIGKILLs: a run killed again and again, resumed each time
# ----------------------------------------------------------------------------------------------
def _kill_loop_spec(path: Path) -> Path:
    spec = {
        "name": "kill-loop",
        "max_iter": 400,
        "checkpoint_every": 25,
        "dtype": "float64",
        "data": {"kind": "two-class-2d", "n_train": 400, "n_test": 100},
        "model": {"kind": "mlp", "hidden": [16], "activation": "tanh", "seed": 2},
        "sampler": {"kind": "reshuffled", "batch_size": 100, "n_batches": 2, "seed": 5},
        "solvers": [
            {"name": "L-BFGS", "method": "lbfgs", "max_iter": 150},
            {"name": "GD", "method": "gd", "line_search": "armijo"},
        ],
    }
    path.write_text(to_toml(spec))
    return path


def _sigkill_loop(tmp_path: Path, kills: int) -> None:
    spec_path = _kill_loop_spec(tmp_path / "loop.toml")
    want = fingerprint(start_run(load_spec(str(spec_path)), tmp_path / "ref", QUIET))
    run = tmp_path / "run"
    command = ["run", str(spec_path), "--run-dir", str(run)]
    rng = random.Random(11)
    killed = 0
    while True:
        args = [sys.executable, "-m", "secondorder.cli", *command, "--no-progress", "--no-report"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if killed < kills:
            time.sleep(rng.uniform(1.5, 4.0))  # python and torch start in about 1.5 s
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            if killed >= kills:
                break
            shutil.rmtree(run)  # finished before the kills were spent: start again
            command = ["run", str(spec_path), "--run-dir", str(run)]
            continue
        assert proc.returncode == -signal.SIGKILL, err.decode()
        started = (run / "run.json").is_file() or (run / "spec.toml").is_file()
        command = ["resume", str(run)] if started else command  # else nothing ran: run again
    final = io.torch_load(run / "checkpoints" / "gd.pt")["theta"]
    assert torch.equal(final, io.torch_load(tmp_path / "ref" / "checkpoints" / "gd.pt")["theta"])
    assert not _diff(fingerprint(run), want)


def test_a_few_sigkills_each_followed_by_resume_give_the_uninterrupted_files(tmp_path):
    _sigkill_loop(tmp_path, kills=3)


@pytest.mark.slow
def test_twenty_sigkills_each_followed_by_resume_give_the_uninterrupted_files(tmp_path):
    _sigkill_loop(tmp_path, kills=20)
