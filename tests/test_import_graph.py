"""The package's import graph: every module imports in a fresh interpreter, no two files import each other
(directly or around a loop), and imports point one way down the layers of docs/architecture.md:

    model  <-  checkpoints  <-  engine  <-  front-end  <-  apps (serving / web / cli / batch / eval / finetune)

The graph is read from the source by grimp (every import statement, those inside functions too: a lazy import
is still a dependency), plus the edge Python adds itself: importing `a.b.c` from outside `a.b` first runs
`a/b/__init__.py`, so the importer depends on that file as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

grimp = pytest.importorskip("grimp")
nx = pytest.importorskip("networkx")  # a torch dependency

# Bottom to top. A module belongs to the layer of its longest matching entry (the module itself or a package
# it is in); an import may point down or sideways, never up. Keep in step with docs/architecture.md.
LAYERS = {
    "model": ("cogvlm2.config", "cogvlm2.checkpoint", "cogvlm2.devices", "cogvlm2.pdl", "cogvlm2.counters",
              "cogvlm2.quant", "cogvlm2.model"),
    "checkpoints": ("cogvlm2.tiny",),  # the embedded tiny checkpoints, built on first use (not their recipe)
    "engine": ("cogvlm2.engine", "cogvlm2.sampling_params"),
    "front-end": ("cogvlm2.processing", "cogvlm2.generation", "cogvlm2.llm", "cogvlm2.async_llm"),
    "apps": ("cogvlm2", "cogvlm2.arguments", "cogvlm2.launch", "cogvlm2.serving", "cogvlm2.web", "cogvlm2.cli",
             "cogvlm2.batch", "cogvlm2.eval", "cogvlm2.finetune", "cogvlm2.tiny.recipe", "cogvlm2.tiny.shapes",
             "cogvlm2.tiny.__main__"),
}
# The apps are independent of each other: they share only these modules (flags, loading from the flags) ...
SHARED_BY_APPS = ("cogvlm2.arguments", "cogvlm2.launch")
# ... and these edges, each for a reason.
APP_EDGES = {
    ("cogvlm2.tiny.recipe", "cogvlm2.finetune.train"): "the tiny models are trained by the package's own trainer",
    ("cogvlm2.launch", "cogvlm2.finetune.lora"): "--lora (chat, eval) applies a peft adapter in finetune's format",
    ("cogvlm2.eval.loglikelihood", "cogvlm2.finetune.packing"): "scoring packs prompts as training does",
}
# Modules a user or a launcher runs; nothing imports them but another of them (cogvlm2.cli finds its
# sub-commands by name: cogvlm2.serving.cli, cogvlm2.web.cli, ...).
CLI_MODULES = ("cogvlm2.cli", "cogvlm2.__main__")


def is_cli(module: str) -> bool:
    return module in CLI_MODULES or module.endswith((".cli", ".__main__"))


def layer_of(module: str) -> str:
    best, name = "", None
    for layer, entries in LAYERS.items():
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > len(best):
                best, name = entry, layer
    return name


def app_of(module: str) -> str:
    """The app a top-layer module belongs to: its sub-package (cogvlm2.serving, ...) or itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


@pytest.fixture(scope="module")
def graph():
    """{importer: {imported: line}} over the package's files, with the package-__init__ edges added."""
    g = grimp.build_graph("cogvlm2", cache_dir=None)
    packages = {m for m in g.modules if g.find_children(m)} | {"cogvlm2"}
    edges: dict[str, dict[str, str]] = {m: {} for m in g.modules}
    for importer in g.modules:
        for imported in g.find_modules_directly_imported_by(importer):
            line = g.get_import_details(importer=importer, imported=imported)[0]
            where = f"{importer}:{line['line_number']} {line['line_contents']}"
            edges[importer][imported] = where
            parts = imported.split(".")
            for i in range(2, len(parts) + 1):  # the root package's __init__ is checked on its own below
                parent = ".".join(parts[:i])
                if parent != imported and parent in packages and not (importer + ".").startswith(parent + "."):
                    edges[importer].setdefault(parent, f"{where} (runs {parent}/__init__.py)")
    return edges


def test_every_module_imports_in_a_fresh_interpreter():
    """Importing each module on its own order (alphabetical, in one process) raises nothing: no import-time
    cycle, no missing dependency of an installed extra. Scripts (`__main__`) run when imported: not imported."""
    code = """
import importlib, json, pkgutil, sys, traceback
import cogvlm2
names = sorted(m.name for m in pkgutil.walk_packages(cogvlm2.__path__, "cogvlm2."))
failed = {}
for name in names:
    if name.endswith("__main__"):
        continue
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=3)
print(json.dumps({"names": names, "failed": failed}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["names"]) > 50, out["names"]
    assert not out["failed"], "\n".join(f"{k}:\n{v}" for k, v in out["failed"].items())


def test_importing_the_package_imports_nothing_else():
    """`import cogvlm2` runs before every submodule import, so its __init__ may only import lazily."""
    code = "import sys, cogvlm2; print(sorted(m for m in sys.modules if m.startswith('cogvlm2')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['cogvlm2']"


def test_every_module_has_a_layer(graph):
    assert not [m for m in graph if layer_of(m) is None], "put the new module in a layer of LAYERS"


def test_no_cycle_between_files(graph):
    g = nx.DiGraph([(a, b) for a, targets in graph.items() for b in targets])
    loops = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    detail = [" | ".join(graph[a][b] for a in loop for b in graph[a] if b in loop) for loop in loops]
    assert not loops, "import cycles:\n" + "\n".join(detail)


def test_imports_point_down_the_layers(graph):
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    up = [f"{layer_of(a)} -> {layer_of(b)}: {where}" for a, targets in graph.items() for b, where in targets.items()
          if a != "cogvlm2" and rank[layer_of(b)] > rank[layer_of(a)]]
    assert not up, "imports pointing up the layers:\n" + "\n".join(sorted(up))


def listed(a: str, b: str) -> bool:
    """a -> b is in APP_EDGES, or is the package-__init__ edge of one that is."""
    return any(a == x and (b == y or y.startswith(b + ".")) for x, y in APP_EDGES)


def test_apps_do_not_import_each_other(graph):
    """serving, web, cli, batch, eval, finetune and the tiny recipe meet only in the shared modules."""
    found = []
    for a, targets in graph.items():
        if layer_of(a) != "apps" or a == "cogvlm2":
            continue
        for b, where in targets.items():
            if layer_of(b) != "apps" or b in SHARED_BY_APPS or listed(a, b):
                continue
            if a in SHARED_BY_APPS or app_of(a) != app_of(b):
                found.append(where)
    assert not found, "imports between apps:\n" + "\n".join(sorted(found))
    stale = [edge for edge in APP_EDGES if edge[1] not in graph.get(edge[0], {})]
    assert not stale, f"APP_EDGES lists edges that no longer exist: drop {stale}"


def test_no_library_module_imports_a_cli_module(graph):
    bad = [where for a, targets in graph.items() if not is_cli(a) for b, where in targets.items() if is_cli(b)]
    assert not bad, "\n".join(sorted(bad))
