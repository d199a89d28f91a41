"""The CLIs' process-wide performance defaults: which XLA flags and malloc settings apply when."""
from __future__ import annotations

import os

import pytest

from ditjax import runtime


def test_xla_defaults_never_override_a_flag_the_user_set():
    flags = runtime.with_xla_defaults("--xla_cpu_experimental_onednn_custom_call=false --xla_dump_to=/d")
    assert "--xla_cpu_experimental_onednn_custom_call=false" in flags.split()
    assert "--xla_cpu_experimental_onednn_custom_call=true" not in flags
    assert "--xla_dump_to=/d" in flags.split() and "--xla_cpu_experimental_ynn_fusion_type=" in flags.split()
    assert runtime.with_xla_defaults(flags) == flags  # idempotent: a child process re-configuring adds nothing


def test_configure_sets_xla_flags_unless_opted_out(monkeypatch):
    monkeypatch.setenv("DITJAX_MALLOC_TUNING", "0")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    runtime.configure()
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=2" in flags
    assert all(f"--{k}={v}" in flags for k, v in runtime.XLA_CPU_DEFAULTS.items())
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("DITJAX_NO_XLA_DEFAULTS", "1")
    runtime.configure()
    assert os.environ["XLA_FLAGS"] == ""


@pytest.mark.parametrize("setting, platforms, want", [
    ("1", "cuda", True), ("0", "cpu", False),  # an explicit setting wins
    ("", "cpu", True), ("", "cuda", False), ("", "tpu,cpu", False),  # auto: on only where JAX runs on the CPU
])
def test_malloc_reuse_setting(monkeypatch, setting, platforms, want):
    monkeypatch.setenv("DITJAX_MALLOC_TUNING", setting)
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert runtime.malloc_tuning_wanted() is want


def test_malloc_reuse_auto_follows_installed_accelerator_plugins(monkeypatch):
    monkeypatch.delenv("DITJAX_MALLOC_TUNING", raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(runtime.importlib.metadata, "entry_points", lambda group: ["xla_cuda12"])
    assert not runtime.malloc_tuning_wanted()
    monkeypatch.setattr(runtime.importlib.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
    assert runtime.malloc_tuning_wanted()


def test_malloc_reuse_rejects_an_unknown_setting(monkeypatch):
    monkeypatch.setenv("DITJAX_MALLOC_TUNING", "yes")
    with pytest.raises(ValueError, match="DITJAX_MALLOC_TUNING='yes'"):
        runtime.malloc_tuning_wanted()
