"""Plugin registration, the patch ledger and the pure/vLLM module boundary."""

from __future__ import annotations

import pickle
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

import vllm_duo


def test_entry_point_is_declared():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("duo") == "vllm_duo:register"


def test_register_is_idempotent_and_duo_survives_pickling():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm_duo.register()
    first = CpuPlatform.get_attn_backend_cls
    vllm_duo.register()
    assert CpuPlatform.get_attn_backend_cls == first
    member = AttentionBackendEnum["DUO"]
    # Spawned engine processes unpickle the config before plugins load there.
    restored = pickle.loads(pickle.dumps(member))
    assert restored is member
    assert restored.get_class().get_name() == "DUO"


def test_env_vars_are_declared_to_vllm():
    from vllm import envs

    from vllm_duo.settings import ENV_VARS

    vllm_duo.register()
    assert set(ENV_VARS) <= set(envs.environment_variables)


@pytest.mark.parametrize("name", [p.name for p in __import__("vllm_duo.patches").patches.LEDGER])
def test_every_patch_is_still_needed(name):
    """Fails when a vLLM upgrade makes a patch removable: delete it from the ledger then."""
    from vllm_duo.patches import LEDGER

    patch = next(p for p in LEDGER if p.name == name)
    assert patch.target and patch.why and patch.how and patch.remove_when
    assert patch.still_needed(), f"{name} is no longer needed: {patch.remove_when}"


PURE_MODULES = [
    "vllm_duo.patterns",
    "vllm_duo.settings",
    "vllm_duo.errors",
    "vllm_duo.reference",
    "vllm_duo.kernels.slots",
    "vllm_duo.kernels.sink_window_torch",
    "vllm_duo.default_model",
    "vllm_duo.testing.tiny_llama",
]


def test_algorithm_modules_never_import_vllm():
    code = (
        "import sys\n"
        f"for m in {PURE_MODULES!r}: __import__(m)\n"
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
