"""Reliability (issue 7): checkpoints that survive SIGKILL, hostile configs, non-finite steps.

- Kills: a child process saves two checkpoints, then is SIGKILLed before the k-th file-system call (mkdir, fsync,
  rename, unlink, ...) of a third save, for every k; the calls are counted in a first, unkilled run. After each
  kill, checkpoint.latest() must find the newest complete checkpoint, log and remove whatever is partial, and
  load() must give exactly the weights that were saved. keep_last=1, so the deletion of the old checkpoint is
  the window where a wrong order would leave none. (Slow, by hand: a real training run killed just before it
  commits a checkpoint resumes from the previous one and replays the same losses.)
- Hostile configs run train.settings() (what train.main() does before the process group exists) in this process:
  each must exit with code 2 and one line naming the key, with nothing written to out_dir.
- Non-finite: 2 torchrun ranks train with the loss (or its gradient) made non-finite on rank 1 only, at chosen
  steps; both ranks must skip those optimizer steps, and 3 in a row stop the run with the last checkpoint intact.

This file is also the child processes' script: `python tests/test_reliability.py kill-saves ROOT`,
`... kill-train CALL <train.py args>` and `torchrun ... tests/test_reliability.py nan-train ROOT <train.py args>`.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import train
from conftest import run_args
from nanovlm import checkpoint
from nanovlm.model import VLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


# -----------------------------------------------------------------------------------------------------------------
# SIGKILL during a checkpoint save

FS_CALLS = ("mkdir", "rename", "replace", "remove", "unlink", "rmdir", "fsync")  # every durable step of a save
KILLED_STEP = {"new_step": 3, "same_step": 2}  # the step of the third save: a new one, or step 2 again


def tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def full_weights(model):
    return {name: p.full_tensor().clone() for name, p in model.named_parameters()}


def describe(name, args):
    """'rename(.tmp-step_000003, step_000003)': the call and the base names of the paths it touches."""
    paths = [os.readlink(f"/proc/self/fd/{args[0]}")] if name == "fsync" else \
        [a for a in args if isinstance(a, (str, os.PathLike))]
    return f"{name}({', '.join(os.path.basename(os.fspath(p)) for p in paths)})"


@contextmanager
def kill_before_call(kill_at, calls):
    """Record every FS_CALLS call in `calls`; SIGKILL this process just before call number kill_at (0-based), or
    before the first call described as kill_at if it is a string."""
    originals = {name: getattr(os, name) for name in FS_CALLS}

    def wrap(name, function):
        def call(*args, **kwargs):
            calls.append(describe(name, args))
            if kill_at in (len(calls) - 1, calls[-1]):
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return call

    for name, function in originals.items():
        setattr(os, name, wrap(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(os, name, function)


def save_three(root, scenario, kill_at):
    """Train a step and save, three times (versions 0, 1, 2); the third save is watched and maybe killed."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model, optimizer = tiny_model()
    calls = []
    for version, step in enumerate((1, 2, KILLED_STEP[scenario])):
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.save(full_weights(model), os.path.join(root, f"weights-v{version}.pt"))
        with kill_before_call(kill_at, calls) if version == 2 else nullcontext():
            checkpoint.save(os.path.join(root, "ckpt"), step, model, optimizer, {"step": step, "version": version},
                            keep_last=1)
    with open(os.path.join(root, "calls.json"), "w") as f:
        json.dump(calls, f)


def fork_save(out, scenario, kill_at):
    """save_three in a forked child; its wait status. Forked, not spawned, so torch is imported only once."""
    os.makedirs(out)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            save_three(out, scenario, kill_at)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def kill_saves(root):
    """Per scenario: an unkilled run counts the file-system calls of the third save, then one run per call is
    killed just before it."""
    torch.set_num_threads(1)  # no thread pool may be running when we fork
    for scenario in KILLED_STEP:
        status = fork_save(os.path.join(root, scenario, "complete"), scenario, -1)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"{scenario}: the unkilled save failed"
        with open(os.path.join(root, scenario, "complete", "calls.json")) as f:
            num_calls = len(json.load(f))
        for kill_at in range(num_calls):
            status = fork_save(os.path.join(root, scenario, str(kill_at)), scenario, kill_at)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (scenario, kill_at, status)


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    result = subprocess.run([sys.executable, __file__, "kill-saves", str(root)], capture_output=True, text=True,
                            env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("scenario", KILLED_STEP)
def test_save_killed_before_any_file_system_call(killed_saves, scenario, process_group, capsys):
    step = KILLED_STEP[scenario]
    with open(killed_saves / scenario / "complete" / "calls.json") as f:
        calls = json.load(f)
    commit = calls.index(f"rename(.tmp-step_{step:06d}, step_{step:06d})")
    assert commit > 5 and any(c.startswith("fsync(__0_0.distcp") for c in calls[:commit])  # the shards came first
    assert any(c.startswith("unlink(") for c in calls[commit:])  # and the old checkpoint's deletion after
    for kill_at in [*range(len(calls)), None]:  # None: the save was not killed
        run = killed_saves / scenario / ("complete" if kill_at is None else str(kill_at))
        where = f"killed before call {kill_at}: {calls[kill_at] if kill_at is not None else '-'}"
        ckpt = run / "ckpt"
        before = set(os.listdir(ckpt))
        path = checkpoint.latest(str(ckpt))
        log = capsys.readouterr().out
        version = 2 if kill_at is None or kill_at > commit else 1  # the commit is the rename into place
        expected_step = step if version == 2 else 2
        assert path == str(ckpt / f"step_{expected_step:06d}"), (where, sorted(before))
        after = set(os.listdir(ckpt))
        assert all(os.path.exists(ckpt / name / checkpoint.MARKER) for name in after), (where, sorted(after))
        for name in before - after:  # each partial directory was removed (or put back) with a log line
            assert name in log, (where, name, log)
        for name in sorted(after):  # every checkpoint left loads whole, not only the newest
            model, optimizer = tiny_model()
            extra, _ = checkpoint.load(str(ckpt / name), model, optimizer)
            assert extra["step"] == int(name.removeprefix("step_")), (where, name)
            assert str(ckpt / name) != path or extra["version"] == version, where
            saved = torch.load(run / f"weights-v{extra['version']}.pt")
            for key, tensor in full_weights(model).items():
                assert torch.equal(tensor, saved[key]), (where, name, key)
        if kill_at is None:
            assert after == {f"step_{step:06d}"}  # keep_last=1


def kill_train(kill_at, *argv):
    """train.main() SIGKILLed just before the file-system call described as kill_at."""
    sys.argv = ["train.py", *argv]
    with kill_before_call(kill_at, []):
        train.main()


@pytest.mark.slow  # 20 s; test_save_killed_before_any_file_system_call covers the checkpoint module in CI
def test_training_killed_while_saving_resumes_from_the_last_complete_checkpoint(synthetic, tmp_path):
    out = tmp_path / "out"
    args = run_args(synthetic, out, max_steps=4, ckpt_interval=2, keep_last=1)
    killed = subprocess.run([sys.executable, __file__, "kill-train", "rename(.tmp-step_000004, step_000004)", *args],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(os.listdir(out / "ckpt")) == [".tmp-step_000004", "step_000002"]  # step 4 written, not committed
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, "--resume=True"],
                             capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"removing incomplete checkpoint {out}/ckpt/.tmp-step_000004" in resumed.stdout
    assert f"resumed from {out}/ckpt/step_000002 at step 2" in resumed.stdout
    with open(out / "log.jsonl") as f:
        logged = [(m["step"], m["loss"]) for m in map(json.loads, f) if "loss" in m]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 3, 4]
    assert logged[2:4] == logged[4:6]  # steps 3 and 4 again, bit for bit
    assert sorted(os.listdir(out / "ckpt")) == ["step_000004"]


def test_latest_puts_back_a_checkpoint_renamed_aside(tmp_path, capsys):
    """The window between the two renames of a same-step save, made by hand: the old copy must come back."""
    aside = tmp_path / ".tmp-step_000002-replaced"
    os.makedirs(aside)
    (aside / checkpoint.MARKER).write_text("{}")
    os.makedirs(tmp_path / ".tmp-step_000002")  # the new copy, not yet renamed into place
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "step_000002")
    assert os.listdir(tmp_path) == ["step_000002"]
    assert "restoring" in capsys.readouterr().out


# -----------------------------------------------------------------------------------------------------------------
# Hostile configs

@pytest.fixture(scope="module")
def bad_towers(synthetic, tmp_path_factory):
    """Tower directories whose config.json alone is wrong (check_config reads nothing else)."""
    root = tmp_path_factory.mktemp("towers")
    for name, tower, change in (("gpt2", "lm", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}),
                                ("vit", "vision", {"architectures": ["ViTModel"], "model_type": "vit"}),
                                ("no_vocab", "lm", {"vocab_size": None})):
        with open(synthetic / tower / "config.json") as f:
            config = {**json.load(f), **change}
        os.makedirs(root / name)
        with open(root / name / "config.json", "w") as f:
            json.dump({k: v for k, v in config.items() if v is not None}, f)
    os.makedirs(root / "empty")
    (root / "a_file").write_text("not a directory")
    return root


# (case, extra arguments ({t}: the bad towers' directory, {f}: a config file with the given text), words of the error)
HOSTILE_CONFIGS = [
    ("unknown key", ["--learing_rate=1e-3"], "unknown config key 'learing_rate' (on the command line); did you mean "
                                              "'learning_rate'?"),
    ("unknown key in a file", ["{f}bach_size = 4"], "line 1); did you mean 'batch_size'?"),
    ("no '=' on the command line", ["--train_lm"], "expected --key=value"),
    ("wrong type", ["--max_steps=1.5"], "'max_steps' (on the command line) is 1.5 of type float; expected int"),
    ("wrong type in a file", ["{f}train_lm = 'yes'"], "'train_lm' (in "),
    ("unparsable value", ["--batch_size=two"], "cannot parse 'two' for config key 'batch_size'"),
    ("config file missing", ["{t}/missing.py"], "cannot read config file"),
    ("config file syntax error", ["{f}batch_size = = 2"], "line 1: syntax error"),
    ("config file raises", ["{f}_x = 1 / 0"], "line 1: ZeroDivisionError"),
    ("train data missing", ["--train_data={t}/missing.json"], "train_data="),
    ("media root missing", ["--media_root={t}/missing"], "media_root="),
    ("lm path missing", ["--lm_path={t}/missing"], "lm_path="),
    ("vision path missing", ["--vision_path={t}/missing"], "vision_path="),
    ("lm dir without config.json", ["--lm_path={t}/empty"], "no config.json in"),
    ("lm config.json lacking a key", ["--lm_path={t}/no_vocab"], "lacks the key 'vocab_size'"),
    ("unsupported LM architecture", ["--lm_path={t}/gpt2"], "architecture GPT2LMHeadModel is not supported"),
    ("unsupported vision tower", ["--vision_path={t}/vit"], "vision model_type 'vit' is not supported"),
    ("vision layer out of range", ["--vision_select_layer=9"], "vision_select_layer=9 is outside"),
    ("out_dir below a file", ["--out_dir={t}/a_file/out"], "is not writable"),
    ("out_dir is a file", ["--out_dir={t}/a_file"], "is not writable"),
    ("out_dir read-only", ["--out_dir={t}/read_only/out"], "is not writable"),
    ("global batch not divisible", ["--global_batch_size=5"], "global_batch_size=5 is not divisible by "
                                                               "batch_size x ranks = 2 x 1"),
    ("global batch not divisible by the ranks", ["WORLD_SIZE=3"], "batch_size x ranks = 2 x 3"),
    ("frames over the token budget", ["--num_frames=16", "--max_frames_per_row=16"],
     "num_frames=16 x 16 tokens per frame = 256 visual tokens leave 0 of max_tokens=256"),
    ("frames over a row", ["--max_frames_per_row=1"], "max_frames_per_row=1 cannot hold one video of num_frames=2"),
    ("nothing to train", ["--train_vision=False", "--train_lm=False", "--train_projector=False"], "nothing to train"),
    ("zero interval", ["--ckpt_interval=0"], "ckpt_interval=0 must be at least 1"),
    ("keep no checkpoint", ["--keep_last=0"], "keep_last=0 must be at least 1"),
    ("unknown template", ["--template=llama"], "template='llama' is not one of plain, chat, vicuna_v1"),
    ("unknown projector", ["--projector=mlp3x"], "projector='mlp3x' is not one of"),
    ("init_from not a run", ["--init_from={t}/empty"], "init_from="),
    ("compile without a C++ compiler", ["--compile=True", "CXX={t}/no-such-g++"],
     "compile=True needs a C++ compiler on the CPU and "),
]


@pytest.fixture
def run_main(capsys):
    """train.settings(): everything train.main() does before the process group exists, in this process."""
    def run(argv):
        with pytest.raises(SystemExit) as exit:
            train.settings(argv)
        return exit.value.code, capsys.readouterr().err

    return run


def test_valid_config_passes_the_checks_in_well_under_a_second(synthetic, tmp_path):
    start = time.perf_counter()
    c = train.settings(run_args(synthetic, tmp_path / "out"))  # the control: the hostile cases differ only in one
    assert time.perf_counter() - start < 1.0
    assert c.out_dir == str(tmp_path / "out") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,extra,message", HOSTILE_CONFIGS, ids=[c[0] for c in HOSTILE_CONFIGS])
def test_hostile_config_fails_before_any_work(case, extra, message, synthetic, bad_towers, tmp_path, run_main,
                                              monkeypatch):
    if case == "out_dir read-only":
        if os.geteuid() == 0:
            pytest.skip("root may write into a read-only directory")
        os.makedirs(bad_towers / "read_only", exist_ok=True)
        os.chmod(bad_towers / "read_only", 0o500)
    argv = run_args(synthetic, tmp_path / "out")
    for arg in extra:
        if arg.partition("=")[0].isupper():  # an environment variable
            name, _, value = arg.partition("=")
            monkeypatch.setenv(name, value.format(t=bad_towers))
        elif arg.startswith("{f}"):
            (tmp_path / "config.py").write_text(arg[3:] + "\n")
            argv.append(str(tmp_path / "config.py"))
        else:
            argv.append(arg.format(t=bad_towers))
    code, stderr = run_main(argv)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("config error: "), stderr
    assert message in stderr, stderr
    assert not (tmp_path / "out").exists() and not dist.is_initialized()


def test_a_missing_local_tower_is_not_looked_up_on_the_hub(synthetic, tmp_path, run_main, monkeypatch):
    """`data/smollm2` before `python prepare.py smollm2`: "data" exists here, so it is a local path that is
    missing, an error naming it and what to run, not a hub id whose download fails later."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code, stderr = run_main(run_args(synthetic, tmp_path / "out") + ["--lm_path=data/smollm2"])
    assert code == 2 and "lm_path='data/smollm2' is not a directory" in stderr and "prepare.py smollm2" in stderr


# -----------------------------------------------------------------------------------------------------------------
# Non-finite loss or gradient

NAN_LOSS_STEPS, INF_GRAD_STEPS = {3}, {5, 6, 7}  # on rank 1 only; 5-7 are max_bad_steps=3 in a row


def weights_digest(weights):
    digest = hashlib.sha1()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def nan_train(root, *argv):
    """torchrun entry: train.main() with rank 1's loss made NaN, or its gradient inf, at the chosen steps. Every
    rank writes, per step, whether its optimizer stepped and a digest of the full trainable weights after it."""
    rank, state = int(os.environ["RANK"]), {"model": None, "step": 0, "stepped": False}
    forward, optimizer_step, zero_grad = VLM.forward, torch.optim.AdamW.step, torch.optim.AdamW.zero_grad

    def poisoned_forward(self, *args, **kwargs):
        loss, count = forward(self, *args, **kwargs)
        if self.training and rank == 1:  # one micro-step per step: this is step state["step"] + 1
            if state["step"] + 1 in NAN_LOSS_STEPS:
                loss = loss * float("nan")
            if state["step"] + 1 in INF_GRAD_STEPS:  # the loss stays finite, its gradient does not
                loss.register_hook(lambda grad: grad * float("inf"))
        state["model"] = self
        return loss, count

    def counted_step(self, *args, **kwargs):
        state["stepped"] = True
        return optimizer_step(self, *args, **kwargs)

    def recorded_zero_grad(self, *args, **kwargs):  # once per step, after the step or the skip
        state["step"] += 1
        weights = get_model_state_dict(state["model"], options=StateDictOptions(full_state_dict=True,
                                                                                 ignore_frozen_params=True))
        with open(os.path.join(root, f"steps-rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": state["step"], "stepped": state["stepped"],
                                "weights": weights_digest(weights)}) + "\n")
        state["stepped"] = False
        return zero_grad(self, *args, **kwargs)

    VLM.forward, torch.optim.AdamW.step, torch.optim.AdamW.zero_grad = poisoned_forward, counted_step, \
        recorded_zero_grad
    sys.argv = ["train.py", *argv]
    train.main()


def test_non_finite_steps_are_skipped_on_every_rank_then_stop_the_run(synthetic, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "nan-train",
           str(tmp_path), *run_args(synthetic, out, max_steps=10, ckpt_interval=2, keep_last=2, max_bad_steps=3)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "stopping at step 7: 3 non-finite steps in a row; the last complete checkpoint is in" in result.stderr, \
        result.stderr[-3000:]
    warned = re.findall(r"^warning: step (\d+): .* optimizer step skipped", result.stderr, re.MULTILINE)
    assert warned == ["3", "5", "6", "7"], result.stderr[-3000:]  # on a line of its own, once: rank 0 logs for all
    ranks = []
    for rank in (0, 1):
        with open(tmp_path / f"steps-rank{rank}.jsonl") as f:
            ranks.append([json.loads(line) for line in f])
    for steps in ranks:  # step 7 is skipped, then stops the run
        assert [s["step"] for s in steps] == list(range(1, 8))
        skipped = {s["step"] for s in steps if not s["stepped"]}
        assert skipped == {3, 5, 6, 7}  # rank 0 skips too, though its own loss and gradients were finite
        digests = [s["weights"] for s in steps]
        for step in range(2, 8):  # the weights change exactly on the steps taken
            assert (digests[step - 1] == digests[step - 2]) == (step in skipped), step
    assert ranks[0] == ranks[1]  # the same decisions and the same weights on both ranks
    with open(out / "log.jsonl") as f:
        logged = {m["step"]: m for m in map(json.loads, f) if "loss" in m}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6] and logged[3]["loss"] != logged[3]["loss"]  # NaN
    assert all(logged[s]["loss"] == logged[s]["loss"] for s in (5, 6))  # a finite loss, a non-finite gradient
    # the last complete checkpoint, step 6 (after the skipped steps 5 and 6), holds the weights of step 4
    assert checkpoint.latest(str(out / "ckpt")) == str(out / "ckpt" / "step_000006")
    assert sorted(os.listdir(out / "ckpt")) == ["step_000004", "step_000006"]
    dcp_to_torch_save(str(out / "ckpt" / "step_000006"), str(tmp_path / "step6.pt"))
    saved = torch.load(tmp_path / "step6.pt")["model"]
    assert weights_digest(saved) == ranks[0][3]["weights"] == ranks[0][5]["weights"]


if __name__ == "__main__":
    {"kill-saves": kill_saves, "kill-train": kill_train, "nan-train": nan_train}[sys.argv[1]](*sys.argv[2:])
