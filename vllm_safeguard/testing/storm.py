"""The load-storm harness shared by ``benchmarks/bench_load.py`` and the e2e tests that load hostile
adapters into a live server (``tests/e2e/test_hostile_server.py``, ``test_evasion_server.py``).

:func:`prepare` builds a tiny workspace, the hostile corpus (:mod:`.attacks`) shaped for its model and a
root for good adapters; :func:`launch` starts the server with both as ``adapter_roots``, runtime LoRA
updating, a static adapter and method ``nlsr_datafree`` at ``risk_threshold`` 0 (every acceptable adapter must be
repaired); :func:`hostile_requests` lists every hostile load to send.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..apps.serve import ServerProcess
from .attacks import PATH_ATTACKS, write_corpus
from .server import launch_test_server, server_env, vllm_server_argv
from .workspace import Workspace, prepare_tiny_workspace

MODEL = "tiny"
METHOD = "nlsr_datafree"
# Half of each module's neurons transplanted: repairs the tiny workspace's unsafe adapter below
# max_served_risk (NLSR's default 10% leaves risk 0.68, which admission refuses as unrepairable).
METHOD_OPTIONS = '{"neuron_fraction": 0.5}'


@dataclass
class Setup:
    root: Path
    ws: Workspace
    attacks_root: Path  # corpus attacks (one adapter root)
    good_root: Path  # good adapters (the other adapter root)
    manifest: dict[str, Any]


def prepare(root: Path) -> Setup:
    """Workspace (model, reference, adapters), the hostile corpus shaped for the model, a good root."""
    ws = prepare_tiny_workspace(root / "ws", n_benign=1)
    manifest = write_corpus(root / "corpus", ws.base)
    good_root = root / "good"
    good_root.mkdir(exist_ok=True)
    if not (good_root / "unsafe").exists():
        shutil.copytree(ws.adapters["unsafe"], good_root / "unsafe")
    return Setup(root, ws, Path(manifest["adapter_root"]), good_root, manifest)


def launch(
    setup: Setup,
    port: int,
    *,
    log_path: Path,
    max_cpu_loras: int = 16,
    max_loras: int = 2,
    safeguard: Mapping[str, str] | None = None,
) -> ServerProcess:
    """The storm server (static adapter ``static``); ``safeguard`` (config field -> value, e.g.
    ``{"risk_threshold": "0.1"}``) overrides the plugin settings above."""
    static = setup.good_root / "static"
    if not static.exists():
        shutil.copytree(setup.ws.adapters["unsafe"], static)
    plugin = {
        "method": METHOD,
        "method_options": METHOD_OPTIONS,
        "risk_threshold": "0",
        "cache_dir": str(setup.root / "cache"),
        "adapter_roots": os.pathsep.join([str(setup.attacks_root), str(setup.good_root)]),
    }
    argv = vllm_server_argv(
        setup.ws.base,
        port=port,
        served_model_name=MODEL,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        lora_modules={"static": static},
    )
    env = server_env(safeguard={**plugin, **(safeguard or {})}, runtime_lora_updating=True)
    return launch_test_server(argv, env=env, log_path=log_path)


def hostile_requests(setup: Setup) -> list[tuple[str, str, str]]:
    """(name, lora_path, expected substring) for every corpus attack and every hostile request path."""
    out = [(f"atk-{a['name']}", a["path"], a["expected"]) for a in setup.manifest["attacks"]]
    out += [(f"path-{p.name}", p.resolve(setup.attacks_root), p.expected) for p in PATH_ATTACKS]
    return out
