import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # train.py, prepare.py


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; CI leaves it out (`pytest -m slow` runs it by hand)")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic SSv2 set with its towers (the tower barely pretrained: these tests train, not learn)."""
    import prepare

    out = tmp_path_factory.mktemp("synthetic")
    prepare.make_synthetic(str(out), num_train=48, num_val=8, seed=0, pretrain_steps=2)
    return out


def run_args(synthetic, out_dir, **overrides):
    """train.py arguments for a tiny run on the `synthetic` set."""
    settings = dict(out_dir=str(out_dir), vision_path=f"{synthetic}/vision", lm_path=f"{synthetic}/lm",
                    train_data=f"{synthetic}/something-something-v2_train.json",
                    val_data=f"{synthetic}/something-something-v2_val.json",
                    media_root=f"{synthetic}/20bn-something-something-v2", num_frames=2, max_tokens=256,
                    max_steps=6, batch_size=2, global_batch_size=4, log_interval=1, eval_interval=1000,
                    eval_samples=4, max_new_tokens=4, ckpt_interval=1000, num_workers=1, train_lm=True,
                    train_vision=True, warmup_ratio=0.2, compile=False)
    settings.update(overrides)
    return [f"--{k}={v}" for k, v in settings.items()]
