"""Writes deploy/k8s/configmap-policies.yaml from the shipped policies/*.yaml.

    python deploy/k8s/policies_configmap.py > deploy/k8s/configmap-policies.yaml

tests/unit/test_deploy_manifests.py fails when the two drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
HEADER = """\
# The policy files the gateway enforces, mounted as a directory at /etc/gateway/policies.
# Generated from policies/*.yaml by deploy/k8s/policies_configmap.py: edit those, regenerate.
# `kubectl apply` of a changed ConfigMap reaches running pods within the kubelet sync period
# (about a minute) by an atomic `..data` symlink swap; the gateway validates and hot-reloads it.
"""


class _Literal(str):
    """A string written as a YAML block literal (`|`), so the policy files stay readable."""


def _literal(dumper: yaml.SafeDumper, value: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


def policies_configmap(directory: Path = ROOT / "policies") -> dict[str, Any]:
    files = sorted(p for p in directory.glob("*.yaml") if p.is_file())
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "gateway-policies", "labels": {"app.kubernetes.io/name": "gateway"}},
        "data": {p.name: _Literal(p.read_text(encoding="utf-8")) for p in files},
    }


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal)


def render(directory: Path = ROOT / "policies") -> str:
    body = yaml.dump(policies_configmap(directory), Dumper=_Dumper, sort_keys=False, width=100)
    return HEADER + body


if __name__ == "__main__":
    sys.stdout.write(render())
