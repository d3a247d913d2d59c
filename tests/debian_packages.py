"""Installing the Debian packages some tests need (chromium, prometheus) when they are missing, and the
rule for when they cannot be had: fail in CI (CI=true), skip elsewhere, with a one-line reason."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_tried: set[tuple[str, ...]] = set()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def try_install(*packages: str) -> str:
    """apt-get install ``packages``, once per process; returns what happened, in a few words."""
    if packages in _tried:
        return "install already tried"
    _tried.add(packages)
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root, so no apt-get install"
    if shutil.which("apt-get") is None:
        return "no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300, check=False)
        done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages], env=env,
                              capture_output=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"apt-get failed ({err})"
    return "apt-get install ran" if done.returncode == 0 else f"apt-get install exited {done.returncode}"


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
