import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # train.py, prepare.py


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; CI leaves it out (`pytest -m slow` runs it by hand)")
