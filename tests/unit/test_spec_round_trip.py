"""`cloudless inspect NAME -o yaml|json` prints a document that `cloudless apply -f`
reads back as the very same spec (so applying it changes nothing)."""

from __future__ import annotations

import contextlib
import io

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.api.workloads import AllocationInfo, InspectReply
from cloudless.cli.output import OutputFormat
from cloudless.cli.workloads import inspect_document
from cloudless.state.workload import (
    Constraint,
    HealthCheckSpec,
    InvalidWorkload,
    PortSpec,
    RestartPolicy,
    UpdateStrategy,
    WorkloadSpec,
    parse_yaml,
    validate,
)
from tests.unit.state.test_workload import FULL_YAML


def render(spec: WorkloadSpec, fmt: str) -> str:
    """What `cloudless inspect NAME -o fmt` prints for a workload with this spec."""
    reply = InspectReply(
        name=spec.name,
        spec=spec,
        state="running",
        stopped=False,
        stable_version=spec.version,
        failed_versions=[],
        allocations=[
            AllocationInfo(f"{spec.name}-0-1a2b3c4d", "node1", 0, spec.version, "running", "run", None, 0, "", "")
        ],
        explanations=["replica 0 → node1 (score +0.500)"],
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        OutputFormat(fmt).emit(inspect_document(reply))
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_the_full_example_round_trips_with_its_version(fmt):
    spec = msgspec.structs.replace(parse_yaml(FULL_YAML), version=7)
    text = render(spec, fmt)
    assert parse_yaml(text) == spec


def test_the_spec_in_the_document_omits_defaults():
    spec = validate(WorkloadSpec(name="web", image="nginx:1.25", replicas=2, version=3))
    doc = yaml.safe_load(render(spec, "yaml"))
    assert doc["spec"] == {"name": "web", "image": "nginx:1.25", "replicas": 2, "version": 3}
    assert doc["allocations"][0]["node"] == "node1"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("spec: {name: web, image: nginx}\nowner: me\n", "owner: unknown field beside spec"),
        ("name: api\nspec: {name: web, image: nginx}\n", "name: 'api' is not spec.name 'web'"),
        ("spec: [web]\n", "spec: expected a mapping"),
        ('{"name": "web", "image": "nginx", "env": {"A": "\\ud83d"}}', "spec: a string holds an unpaired"),
    ],
)
def test_a_document_with_spec_is_read_strictly(text, expected):
    with pytest.raises(InvalidWorkload) as info:
        parse_yaml(text)
    assert info.value.message.startswith(expected), info.value.message


def test_json_surrogate_pairs_are_one_character():
    spec = parse_yaml('{"name": "web", "image": "nginx", "env": {"SMILE": "\\ud83d\\ude00"}}')
    assert spec.env == {"SMILE": "\U0001f600"}


scalar_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=100, deadline=None)
@given(
    env=st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), scalar_text, max_size=5),
    command=st.lists(scalar_text, max_size=5),
    label=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20),
    interval=st.floats(min_value=0.001, max_value=3600, allow_nan=False),
    backoff=st.floats(min_value=1e-3, max_value=3600, allow_nan=False),
    fmt=st.sampled_from(["yaml", "json"]),
)
def test_any_spec_round_trips(env, command, label, interval, backoff, fmt):
    spec = validate(
        WorkloadSpec(
            name="web",
            image="registry.local:5000/team/web:1",
            command=tuple(command),
            env=env,
            ports=(PortSpec(8080, 80),),
            restart=RestartPolicy(backoff_initial_s=backoff, backoff_max_s=3600.0),
            constraints=(Constraint("label.tier", "=", label),),
            update=UpdateStrategy(min_healthy_time_s=0.0),
            health_check=HealthCheckSpec(kind="tcp", port=8080, interval_s=interval, timeout_s=interval),
            version=4,
        )
    )
    assert parse_yaml(render(spec, fmt)) == spec


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@pytest.mark.parametrize(
    "text", ["x\x85y", "\u2028", "\ufeff", "\x7f", "\U0001f600", "'\"\\", "a: b", "- x", "~", "0x1F"]
)
def test_awkward_strings_round_trip(fmt, text):
    spec = validate(WorkloadSpec(name="web", image="nginx", env={"V": text}, command=(text,)))
    assert parse_yaml(render(spec, fmt)) == spec
