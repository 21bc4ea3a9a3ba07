"""docs/workloads.md stays true to the spec: every field of `WorkloadSpec`
(nested ones too) has a row, every row names a real field or YAML alias with
the default the code has, every YAML example is a valid spec and every `run`
flag in the doc exists."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from cloudless.cli.workloads import run
from cloudless.state.workload import SpecLoader, WorkloadSpec, duration_fields, parse_yaml

DOC = Path(__file__).resolve().parents[2] / "docs" / "workloads.md"
ROW = re.compile(r"^\| `(?P<path>[a-z_\[\].]+)` \| (?P<type>[^|]*(?:\\\|[^|]*)*) \| (?P<default>[^|]*) \|", re.M)


def spec_fields() -> dict[str, Any]:
    """Every field path (`ports[].host_port`, `health_check.interval_s`) → its default (msgspec.NODEFAULT if required)."""
    out: dict[str, Any] = {}

    def walk(struct_type: msgspec.inspect.StructType, prefix: str) -> None:
        for f in struct_type.fields:
            path = prefix + f.name
            out[path] = f.default if f.default is not msgspec.NODEFAULT else f.default_factory
            if f.default_factory is not msgspec.NODEFAULT:
                out[path] = f.default_factory()
            if f.required:
                out[path] = msgspec.NODEFAULT
            t = f.type
            if isinstance(t, msgspec.inspect.UnionType):
                t = next((u for u in t.types if isinstance(u, msgspec.inspect.StructType)), t)
            if isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.VarTupleType)):
                if isinstance(t.item_type, msgspec.inspect.StructType):
                    walk(t.item_type, path + "[].")
            elif isinstance(t, msgspec.inspect.StructType):
                walk(t, path + ".")

    walk(msgspec.inspect.type_info(WorkloadSpec), "")
    return out


def yaml_aliases() -> set[str]:
    aliases = {"resources.cpu", "resources.memory"}
    for section, names in duration_fields().items():
        aliases |= {f"{section}.{name[:-2]}" for name in names}
    return aliases


def rows() -> dict[str, str]:
    found = {m.group("path"): m.group("default").strip() for m in ROW.finditer(DOC.read_text())}
    assert len(found) > 40, "the field tables were not recognised"
    return found


def test_every_spec_field_is_documented():
    missing = sorted(set(spec_fields()) - set(rows()))
    assert not missing, f"docs/workloads.md lacks rows for {missing}"


def test_every_documented_field_exists():
    stale = sorted(set(rows()) - set(spec_fields()) - yaml_aliases())
    assert not stale, f"docs/workloads.md documents fields the spec does not have: {stale}"


def test_documented_defaults_are_the_codes():
    fields = spec_fields()
    for path, cell in rows().items():
        if path not in fields:
            continue
        default = fields[path]
        if default is msgspec.NODEFAULT:
            assert cell == "required", (path, cell)
            continue
        literal = re.match(r"^`([^`]*)`", cell)
        if isinstance(default, msgspec.Struct):
            assert cell.startswith("see below"), (path, cell)
        elif default is None:
            assert cell.startswith("absent"), (path, cell)
        else:
            assert literal, f"{path}: default cell {cell!r} gives no value"
            assert yaml.load(literal.group(1), Loader=SpecLoader) == msgspec.json.decode(
                msgspec.json.encode(default)
            ), (path, cell)


def examples() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)


def test_there_are_several_examples():
    assert len(examples()) >= 3


@pytest.mark.parametrize("index", range(4))
def test_every_yaml_example_is_a_valid_spec(index):
    blocks = examples()
    if index < len(blocks):
        spec = parse_yaml(blocks[index])
        assert spec.name


def test_documented_run_flags_exist():
    text = DOC.read_text()
    section = text.split("## `cloudless run` flags", 1)[1].split("\n## ", 1)[0]
    flags = set(re.findall(r"^\| `(--[a-z-]+)", section, re.M))
    options = {opt for p in run.params for opt in p.opts}
    assert flags and flags <= options, flags - options
