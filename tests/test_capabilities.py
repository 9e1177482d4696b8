"""Clusters are capabilities, not names (issue 29): the code asks a cluster's ClusterInfo (catalog.py)
what it can do and never compares its name; the names are listed in the catalog alone, and one
registry maps each to its backend, which names its ClusterInfo."""

from __future__ import annotations

import ast
import dataclasses

import pytest

from llamajobs import catalog, cluster, render, spec
from llamajobs.errors import SpecError
from llamajobs.site import Site
from tests.test_layout import graph, modules

NAMES = set(catalog.CLUSTER)


def _names_in(node: ast.AST) -> list[str]:
    """Cluster names written as literals in a node: a string, or the items of a tuple, list or set."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in NAMES]


def test_no_module_compares_a_cluster_name():
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(_names_in(n) for n in [node.left, *node.comparators]):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert found == [], "ask the cluster's ClusterInfo (spec.cluster_info) instead:\n" + "\n".join(found)


def test_cluster_names_are_listed_in_the_catalog_only():
    found = []
    for name, path in modules().items():
        if name == "llamajobs.catalog":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(_names_in(node)) > 1:
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_the_name_checks_find_one():
    tree = ast.parse('if spec.cluster == "slurm" or name in ("local", "debug"): pass')
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert [bool(_names_in(n.comparators[0])) for n in compares] == [True, True]


def test_one_backend_per_cluster_each_naming_its_info():
    assert set(cluster.BACKENDS) == NAMES
    for name, backend in cluster.BACKENDS.items():
        assert backend.info is catalog.CLUSTER[name] and cluster.backend(name).name == name


def test_the_spec_and_the_rules_do_not_import_the_cluster_layer():
    edges = graph()
    for start in ("llamajobs.spec", "llamajobs.rules", "llamajobs.catalog"):
        seen, todo = set(), [start]
        while todo:
            for target in edges.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        assert not {m for m in seen if m.startswith("llamajobs.cluster")}, start
    assert "llamajobs.spec" not in edges["llamajobs.cluster.slurm"]


def test_a_new_cluster_is_data_the_rules_ask(monkeypatch):
    """A batch system like SLURM (PBS, say) added as a ClusterInfo: the spec, the rules and the
    rendering follow its capabilities without a line of theirs changed."""
    monkeypatch.setitem(catalog.CLUSTER, "pbs", dataclasses.replace(catalog.CLUSTER["slurm"], name="pbs"))
    monkeypatch.setitem(catalog.CLUSTER, "box", dataclasses.replace(catalog.CLUSTER["local"], name="box"))
    pbs = spec.build({"cluster": "pbs", "nodes": 2, "hold": True})
    assert pbs.plans_gpus and pbs.planned_procs_per_node == 8 and render.gres(pbs, Site()) == "gpu:8"
    box = spec.build({"cluster": "box"})
    assert not box.plans_gpus and box.planned_procs_per_node == 2 and render.gres(box, Site()) is None
    with pytest.raises(SpecError, match="--nodes 2: the box cluster has one node; use --cluster slurm or pbs"):
        spec.build({"cluster": "box", "nodes": 2})
    with pytest.raises(SpecError, match=r"--hold needs --cluster slurm or pbs \(cluster is 'box'\)"):
        spec.build({"cluster": "box", "hold": True})
