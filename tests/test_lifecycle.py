"""What clusters do to a run (issue 13): a second launch on a live out_dir, SIGTERM (preemption), SIGKILL of the
launcher alone, and stages that inherit weights, on CPU with gloo. Ranks are frozen with SIGSTOP where a test needs
a run to stay at one step while something else happens, so nothing depends on how fast the machine is."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import run_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


TRACKED = set()  # every pid a test of this file started or found: killed at its end, pass or fail


@pytest.fixture
def start():
    """torchrun train.py in the background, output to files (a pipe nobody reads could fill and block it). At the
    end of the test, pass or fail, every process it started or looked at is killed (stopped ones too: SIGKILL works
    on them): launchers, ranks, DataLoader workers, also those whose launcher is gone."""
    def launch(args, log_dir, nproc=2):
        os.makedirs(log_dir, exist_ok=True)
        out, err = open(os.path.join(log_dir, "stdout"), "w"), open(os.path.join(log_dir, "stderr"), "w")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "train.py"), *args]
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=ENV, start_new_session=True)
        TRACKED.add(proc.pid)
        return proc

    yield launch
    pids = set(TRACKED)
    for pid in list(pids):
        pids.update(children(pid))
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                if "train.py" in f.read():  # not a pid the system has since given to something else
                    os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
    TRACKED.clear()


def text(log_dir, name):
    with open(os.path.join(log_dir, name)) as f:
        return f.read()


def logged(out_dir):
    """{step: loss} of log.jsonl so far, in order of appearance (a step logged twice keeps both: a list)."""
    steps = []
    try:
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            for line in f:
                if line.endswith("\n") and '"loss"' in line:
                    m = json.loads(line)
                    steps.append((m["step"], m["loss"]))
    except FileNotFoundError:
        pass
    return steps


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def children(pid):
    """Every descendant of pid (ranks, their DataLoader workers), from /proc."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
                TRACKED.update(kids)
        except FileNotFoundError:
            pass
    return found


def ranks(launcher):
    """The rank processes: the launcher's own children running train.py."""
    pids = []
    for task in os.listdir(f"/proc/{launcher}/task"):
        with open(f"/proc/{launcher}/task/{task}/children") as f:
            pids += [int(k) for k in f.read().split()]
    pids = [p for p in pids if "train.py" in open(f"/proc/{p}/cmdline").read()]
    TRACKED.update(pids)
    return pids


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False


def test_lock_preemption_and_a_killed_launcher(synthetic, tmp_path, start):
    args = lambda out, **kw: run_args(synthetic, out, max_steps=12, **{"ckpt_interval": 100, **kw})  # noqa: E731
    reference = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                os.path.join(ROOT, "train.py"), *args(tmp_path / "ref")], capture_output=True,
                               text=True, env=ENV, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = dict(logged(tmp_path / "ref"))
    assert sorted(expected) == list(range(1, 13))

    # a live run holds its out_dir: a second launch fails at once naming the holder
    out = tmp_path / "out"
    first = start(args(out), tmp_path / "first")
    wait_for(lambda: len(logged(out)) >= 3, 120, "the first run's step 3")
    rank_pids = ranks(first.pid)
    assert len(rank_pids) == 2
    for pid in rank_pids:
        os.kill(pid, signal.SIGSTOP)  # the run stays live, at this step, for as long as the test needs
    started = time.time()
    second = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *args(out)], capture_output=True, text=True, env=ENV,
                            timeout=60)
    assert second.returncode != 0 and time.time() - started < 30
    assert f"out_dir='{out}' is in use by another run (host " in second.stderr, second.stderr[-3000:]
    assert "pid " in second.stderr and "started 20" in second.stderr

    # preemption: SIGTERM to every rank; they stop after the same step, checkpoint it and exit 0
    stopped_at = len(logged(out))
    for pid in rank_pids:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGCONT)
    assert first.wait(timeout=120) == 0, text(tmp_path / "first", "stderr")[-3000:]
    stdout = text(tmp_path / "first", "stdout")
    step = next(int(line.split("stopped after step ")[1].split(",")[0]) for line in stdout.splitlines()
                if "SIGTERM: stopped after step" in line)
    assert stopped_at <= step <= stopped_at + 1 and "--resume=True" in stdout
    assert sorted(os.listdir(out / "ckpt")) == [f"step_{step:06d}"]
    assert not (out / "final").exists()
    # ... and that checkpoint resumes bit for bit
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              os.path.join(ROOT, "train.py"), *args(out, resume=True)], capture_output=True, text=True,
                             env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = logged(out)[step:]
    assert [s for s, _ in after] == list(range(step + 1, 13))
    assert all(loss == expected[s] for s, loss in after), (after, expected)

    # SIGKILL of the launcher alone: every rank and worker exits within seconds, committing nothing
    out = tmp_path / "killed"
    run = start(args(out, ckpt_interval=4), tmp_path / "killed-logs")
    wait_for(lambda: len(logged(out)) >= 5, 120, "step 5, after the checkpoint of step 4")
    rank_pids = ranks(run.pid)
    for pid in rank_pids:
        os.kill(pid, signal.SIGSTOP)
    everything = children(run.pid)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    for pid in rank_pids:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: not any(alive(pid) for pid in everything), 30, "the ranks and their workers to exit")
    seen = len(logged(out))  # counted once all are gone: a line stopped half-written by SIGSTOP is finished after it
    complete = sorted(d for d in os.listdir(out / "ckpt") if d.startswith("step_"))
    assert complete == ["step_000004"] + (["step_000008"] if seen >= 9 else [])
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              os.path.join(ROOT, "train.py"), *args(out, ckpt_interval=4, resume=True)],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    replayed = logged(out)[seen:]
    last = int(complete[-1].removeprefix("step_"))
    assert [s for s, _ in replayed] == list(range(last + 1, 13))
    assert all(loss == expected[s] for s, loss in replayed)


def test_a_stage_keeps_what_it_inherits_across_resumes(synthetic, tmp_path):
    """Stage 1 trains the projector; stage 2 starts from its final/, projector frozen, LM trained. Resumed before
    its first checkpoint and after it, stage 2 holds stage 1's projector, and its final/ holds it too (with what it
    trained), so final/ alone gives the model at the end of training."""
    train = [sys.executable, os.path.join(ROOT, "train.py")]
    stage1 = run_args(synthetic, tmp_path / "stage1", max_steps=3, train_vision=False, train_lm=False)
    result = subprocess.run(train + stage1, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    projector = {k: v for k, v in load_file(tmp_path / "stage1" / "final" / "trained.safetensors").items()}
    assert sorted(projector) == ["projector.0.bias", "projector.0.weight", "projector.2.bias", "projector.2.weight"]

    stage2 = run_args(synthetic, tmp_path / "stage2", max_steps=4, ckpt_interval=2, eval_interval=4,
                      init_from=tmp_path / "stage1" / "final", train_vision=False, train_projector=False,
                      train_lm=True, resume=True)
    result = subprocess.run(train + stage2, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume=True but no complete checkpoint" in result.stdout  # resumed before its first checkpoint

    def final(out):
        tensors = load_file(out / "final" / "trained.safetensors")
        assert all(k in tensors and tensors[k].equal(v) for k, v in projector.items())  # stage 1's, exactly
        assert any(k.startswith("lm.") for k in tensors) and not any(k.startswith("vision.") for k in tensors)
        info = json.loads((out / "final" / "nanovlm.json").read_text())
        assert (info["trained_here"], info["inherited"]) == (["lm"], ["projector"])
        return tensors

    first = final(tmp_path / "stage2")
    losses = logged(tmp_path / "stage2")
    # resumed after its first checkpoint (step 2): the same losses, the same final weights
    subprocess.run(["rm", "-rf", str(tmp_path / "stage2" / "ckpt" / "step_000004"), str(tmp_path / "stage2" / "final")],
                   check=True)
    result = subprocess.run(train + stage2, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and logged(tmp_path / "stage2")[4:] == losses[2:]
    again = final(tmp_path / "stage2")
    assert all(again[k].equal(v) for k, v in first.items())

    # final/ alone (init_from it, nothing trained) evaluates as the model did at the end of training
    with open(tmp_path / "stage2" / "log.jsonl") as f:
        at_end = [m for m in map(json.loads, f) if "val_loss" in m][-1]
    result = subprocess.run(train + run_args(synthetic, tmp_path / "eval", init_from=tmp_path / "stage2" / "final",
                                             eval_only=True, train_vision=False), capture_output=True, text=True,
                            env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert abs(evaluated["val_loss"] - at_end["val_loss"]) <= 1e-6
    assert evaluated["val_accuracy"] == at_end["val_accuracy"]
