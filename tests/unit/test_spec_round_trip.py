"""`cloudless inspect NAME -o yaml|json` prints a spec that `cloudless apply -f`
reads back as the very same spec (so applying it changes nothing)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.cli.workloads import render_spec
from cloudless.state.workload import (
    Constraint,
    HealthCheckSpec,
    PortSpec,
    RestartPolicy,
    UpdateStrategy,
    WorkloadSpec,
    parse_yaml,
    validate,
)
from tests.unit.state.test_workload import FULL_YAML


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_the_full_example_round_trips_with_its_version(fmt):
    spec = msgspec.structs.replace(parse_yaml(FULL_YAML), version=7)
    text = render_spec(spec, fmt)
    assert parse_yaml(text) == spec


def test_yaml_output_is_the_spec_fields_and_omits_defaults():
    spec = validate(WorkloadSpec(name="web", image="nginx:1.25", replicas=2, version=3))
    assert render_spec(spec, "yaml") == "name: web\nimage: nginx:1.25\nreplicas: 2\nversion: 3\n"


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
    assert parse_yaml(render_spec(spec, fmt)) == spec
