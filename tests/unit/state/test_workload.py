"""The workload spec: validation errors name the field, YAML and `cloudless run` flags parse
into the same spec, and nothing but InvalidWorkload escapes on bad input."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless.errors import InvalidInput
from cloudless.state.workload import (
    Affinity,
    Allocation,
    AntiAffinity,
    Constraint,
    HealthCheckSpec,
    InvalidWorkload,
    PortSpec,
    Resources,
    RestartPolicy,
    Spread,
    SpreadTarget,
    UpdateStrategy,
    WorkloadSpec,
    decode_allocation,
    decode_spec,
    default_name,
    duration_fields,
    encode_allocation,
    encode_spec,
    from_flags,
    parse_constraint_flag,
    parse_cpu,
    parse_env_flag,
    parse_memory,
    parse_port_flag,
    parse_restart_flag,
    parse_spread_flag,
    parse_yaml,
    to_yaml,
    validate,
)

BASE = WorkloadSpec(name="web", image="registry.local/web:1")


def field_error(spec: WorkloadSpec) -> str:
    with pytest.raises(InvalidWorkload) as info:
        validate(spec)
    return info.value.message


# ---------------------------------------------------------------- validate


def test_minimal_spec_gets_defaults():
    spec = validate(BASE)
    assert spec.replicas == 1
    assert spec.resources == Resources(cpu_millis=100, memory_bytes=128 << 20)
    assert spec.restart.mode == "always"
    assert InvalidWorkload.exit_code == 2 and issubclass(InvalidWorkload, InvalidInput)


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(replicas=-1), "replicas: must be ≥ 0"),
        (dict(name="Web_1"), "name: must be a DNS label"),
        (dict(name="-web"), "name: must be a DNS label"),
        (dict(image="UPPER CASE!"), "image:"),
        (dict(resources=Resources(cpu_millis=0)), "resources.cpu_millis: must be ≥ 1"),
        (dict(resources=Resources(memory_bytes=1000)), "resources.memory_bytes: must be ≥ 1048576"),
        (dict(env={"1BAD": "x"}), "env"),
        (dict(ports=(PortSpec(container_port=0),)), "ports[0].container_port: must be ≥ 1"),
        (dict(ports=(PortSpec(80), PortSpec(80))), "ports[1].container_port: 80/tcp is listed twice"),
        (
            dict(ports=(PortSpec(80, 8080), PortSpec(81, 8080))),
            "ports[1].host_port: 8080/tcp is published twice",
        ),
        (dict(restart=RestartPolicy(mode="always", max_retries=3)), "restart.max_retries: only applies"),
        (
            dict(constraints=(Constraint("node.zone", "=", "a"), Constraint("node.zone", "like", "a"))),  # type: ignore[arg-type]
            "constraints[1].operator: invalid enum value 'like'",
        ),
        (
            dict(constraints=(Constraint("node.colour", "=", "a"),)),
            "constraints[0].attribute: unknown attribute 'node.colour'",
        ),
        (dict(constraints=(Constraint("node.zone", "in", ()),)), "constraints[0].value: operator in needs"),
        (
            dict(constraints=(Constraint("node.zone", "=", ("a", "b")),)),
            "constraints[0].value: operator = needs a single value",
        ),
        (
            dict(constraints=(Constraint("label.gpu", "exists", "yes"),)),
            "constraints[0].value: operator exists takes no value",
        ),
        (
            dict(constraints=(Constraint("node.zone", "regex", "(unclosed"),)),
            "constraints[0].value: invalid regular expression",
        ),
        (dict(constraints=(Constraint("node.zone", "=", ""),)), "constraints[0].value: operator = needs a value"),
        (dict(affinities=(Affinity("node.class", "=", "server", 0),)), "affinities[0].weight: must not be 0"),
        (dict(affinities=(Affinity("node.class", "=", "server", 101),)), "affinities[0].weight: must be ≤ 100"),
        (
            dict(spreads=(Spread("node.zone"), Spread("node.zone"))),
            "spreads[1].attribute: node.zone is spread over twice",
        ),
        (dict(spreads=(Spread("rack"),)), "spreads[0].attribute: unknown attribute 'rack'"),
        (
            dict(spreads=(Spread("node.zone", targets=(SpreadTarget("a", 70), SpreadTarget("b", 40))),)),
            "spreads[0].targets: percentages add up to 110",
        ),
        (
            dict(spreads=(Spread("node.zone", targets=(SpreadTarget("a", 50), SpreadTarget("a", 10))),)),
            "spreads[0].targets[1].value: 'a' is listed twice",
        ),
        (
            dict(anti_affinities=(AntiAffinity("web"),)),
            "anti_affinities[0].workload: anti-affinity with the workload itself",
        ),
        (
            dict(update=UpdateStrategy(max_unavailable=1, min_available=1)),
            "update.min_available: give max_unavailable or min_available, not both",
        ),
        (dict(update=UpdateStrategy(max_surge=0, max_unavailable=0)), "update.max_surge: with no unavailability"),
        (dict(update=UpdateStrategy(min_available=5)), "update.min_available: must be ≤ replicas (1)"),
        (
            dict(update=UpdateStrategy(min_healthy_time_s=600)),
            "update.min_healthy_time_s: must be ≤ healthy_deadline_s",
        ),
        (dict(health_check=HealthCheckSpec(kind="exec")), "health_check.command: an exec health check needs a command"),
        (
            dict(health_check=HealthCheckSpec(kind="http")),
            "health_check.port: a http health check needs a container port",
        ),
        (
            dict(ports=(PortSpec(80),), health_check=HealthCheckSpec(kind="tcp", port=81)),
            "health_check.port: 81 is not one of the workload's tcp ports",
        ),
        (
            dict(health_check=HealthCheckSpec(kind="tcp", port=80, timeout_s=20)),
            "health_check.timeout_s: must be ≤ interval_s",
        ),
        (dict(format=2), "format: unsupported spec format 2"),
    ],
)
def test_validation_errors_name_the_field(changes, expected):
    message = field_error(msgspec.structs.replace(BASE, **changes))
    assert message.startswith(expected), message


def test_validation_error_carries_the_field_in_context():
    with pytest.raises(InvalidWorkload) as info:
        validate(msgspec.structs.replace(BASE, replicas=-3))
    assert info.value.context["field"] == "replicas"
    assert info.value.to_dict()["error"] == "invalid"


def test_in_operator_accepts_a_comma_string_and_normalises_to_a_list():
    spec = validate(msgspec.structs.replace(BASE, constraints=(Constraint("node.zone", "in", "a, b"),)))
    assert spec.constraints[0].value == ("a", "b")


def test_min_available_with_surge_zero_is_valid_when_unavailability_is_allowed():
    spec = msgspec.structs.replace(BASE, replicas=4, update=UpdateStrategy(max_surge=0, min_available=3))
    assert validate(spec).update.min_available == 3


# ---------------------------------------------------------------- YAML


FULL_YAML = """
name: api
image: 127.0.0.1:5000/team/api:2.1
command: [/bin/api, --port, "8080"]
env: {MODE: prod, WORKERS: 4, DEBUG: false}
replicas: 3
resources: {cpu: 500m, memory: 256Mi}
ports:
  - {container_port: 8080, host_port: 80}
  - {container_port: 53, protocol: udp}
restart: {mode: on-failure, max_retries: 5}
reschedule: {attempts: 3, interval_s: 600, delay_s: 5, max_delay_s: 60, unlimited: false}
constraints:
  - {attribute: node.arch, operator: in, value: [amd64, arm64]}
  - {attribute: node.class, operator: "!=", value: phone}
affinities:
  - {attribute: node.power, value: ac, weight: 40}
spreads:
  - {attribute: node.zone, targets: [{value: a, percent: 60}, {value: b, percent: 40}]}
  - {attribute: node, max_per: 1}
anti_affinities:
  - {workload: db, attribute: node, hard: true}
update: {max_surge: 1, max_unavailable: 0, healthy_deadline_s: 120, min_healthy_time_s: 5, auto_revert: true}
health_check: {kind: http, port: 8080, path: /healthz, interval_s: 5, timeout_s: 2}
"""


def test_full_yaml_document_parses_with_human_units():
    spec = parse_yaml(FULL_YAML)
    assert spec.resources == Resources(cpu_millis=500, memory_bytes=256 << 20)
    assert spec.env == {"MODE": "prod", "WORKERS": "4", "DEBUG": "false"}
    assert spec.ports[1] == PortSpec(container_port=53, protocol="udp")
    assert spec.constraints[0].value == ("amd64", "arm64")
    assert spec.spreads[0].targets[0] == SpreadTarget("a", 60)
    assert spec.spreads[1].max_per == 1
    assert spec.anti_affinities[0].hard is True
    assert spec.update.auto_revert is True
    assert spec.health_check is not None and spec.health_check.path == "/healthz"


def test_yaml_round_trips_through_to_yaml():
    spec = parse_yaml(FULL_YAML)
    assert parse_yaml(to_yaml(spec)) == spec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: web\nimage: nginx\nreplica: 3\n", "replica: unknown field"),
        ("name: web\nimage: nginx\nresources: {cpu: 1, disk: 3}\n", "resources.disk: unknown field"),
        (
            "name: web\nimage: nginx\nconstraints:\n  - {attribute: node.zone, value: a, weight: 3}\n",
            "constraints[0].weight: unknown field",
        ),
        ("name: web\nimage: nginx\nupdate: {max_surge: 1, canary: 2}\n", "update.canary: unknown field"),
        ("image: nginx\n", "name: required field is missing"),
        ("name: web\nimage: nginx\nreplicas: many\n", "replicas: expected `int`"),
        ("name: web\nimage: nginx\nresources: {memory: lots}\n", "resources.memory: 'lots' is not a memory size"),
        ("name: web\nimage: nginx\nresources: {cpu: 1, cpu_millis: 5}\n", "resources.cpu: give cpu or cpu_millis"),
        ("name: web\nimage: nginx\ncommand: echo hi\n", "command: must be a list"),
        ("name: web\nimage: [nginx\n", "spec: not valid YAML at line"),
        ("- name: web\n", "spec: expected a mapping"),
        ("name: a\nimage: b\n---\nname: c\nimage: d\n", "spec: expected one YAML document, found 2"),
        ("", "spec: expected one YAML document, found 0"),
    ],
)
def test_yaml_errors_name_the_field(text, expected):
    with pytest.raises(InvalidWorkload) as info:
        parse_yaml(text)
    assert info.value.message.startswith(expected), info.value.message


# ---------------------------------------------------------------- flags


def test_run_flags_build_the_same_spec_as_yaml():
    spec = from_flags(
        "127.0.0.1:5000/team/api:2.1",
        name="api",
        replicas=3,
        cpu="0.5",
        memory="256Mi",
        env=["MODE=prod", "EMPTY=", "EQ=a=b"],
        ports=["80:8080", "53/udp"],
        restart="on-failure:5",
        constraints=["arch in amd64,arm64", "node.class!=phone"],
        spreads=["zone", "node:1"],
        command=["/bin/api", "--port", "8080"],
    )
    assert spec.env == {"MODE": "prod", "EMPTY": "", "EQ": "a=b"}
    assert spec.resources == Resources(cpu_millis=500, memory_bytes=256 << 20)
    assert spec.ports == (PortSpec(8080, 80, "tcp"), PortSpec(53, None, "udp"))
    assert spec.restart == RestartPolicy(mode="on-failure", max_retries=5)
    yaml_spec = parse_yaml(FULL_YAML)
    assert spec.constraints == yaml_spec.constraints
    assert spec.spreads == (Spread("node.zone"), Spread("node", max_per=1))
    assert spec.command == yaml_spec.command


def test_run_without_name_uses_the_image_name():
    assert from_flags("docker.io/library/busybox:1.36").name == "busybox"
    assert default_name("127.0.0.1:5000/team/My_App@sha256:" + "a" * 64) == "my-app"


@pytest.mark.parametrize("text, millis", [("0.5", 500), ("2", 2000), ("250m", 250), ("1.25", 1250), ("0.001", 1)])
def test_cpu_flag(text, millis):
    assert parse_cpu(text) == millis


@pytest.mark.parametrize("text", ["", "-1", "0", "0m", "1.5m", "half", "1e3", "0.0001"])
def test_bad_cpu_flag(text):
    with pytest.raises(InvalidWorkload, match=r"^cpu: "):
        parse_cpu(text)


@pytest.mark.parametrize(
    "text, size",
    [
        ("256Mi", 256 << 20),
        ("1Gi", 1 << 30),
        ("512M", 512_000_000),
        ("1G", 10**9),
        ("1048576", 1 << 20),
        ("1.5Gi", 3 << 29),
    ],
)
def test_memory_flag(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-5Mi", "1.5", "12Xi", "Mi"])
def test_bad_memory_flag(text):
    with pytest.raises(InvalidWorkload, match=r"^memory: "):
        parse_memory(text)


@pytest.mark.parametrize(
    "text, port",
    [
        ("80", PortSpec(80)),
        ("8080:80", PortSpec(80, 8080)),
        ("53/udp", PortSpec(53, None, "udp")),
        ("5353:53/udp", PortSpec(53, 5353, "udp")),
    ],
)
def test_port_flag(text, port):
    assert parse_port_flag(text) == port


@pytest.mark.parametrize(
    "text, why",
    [
        ("80/sctp", "protocol must be tcp or udp"),
        ("70000", "ports are 1-65535"),
        ("0:80", "ports are 1-65535"),
        ("a:b", "expected [HOST:]CONTAINER"),
    ],
)
def test_bad_port_flag(text, why):
    with pytest.raises(InvalidWorkload, match=r"^port: ") as info:
        parse_port_flag(text)
    assert why in info.value.message


def test_env_flag():
    assert parse_env_flag("A_1=x=y") == ("A_1", "x=y")
    for bad in ("NOEQUALS", "1A=x", "=x", "A-B=x"):
        with pytest.raises(InvalidWorkload, match=r"^env: "):
            parse_env_flag(bad)


def test_restart_flag():
    assert parse_restart_flag("never") == RestartPolicy(mode="never")
    assert parse_restart_flag("on-failure") == RestartPolicy(mode="on-failure", max_retries=0)
    for bad in ("sometimes", "always:3", "on-failure:x"):
        with pytest.raises(InvalidWorkload, match=r"^restart: "):
            parse_restart_flag(bad)


@pytest.mark.parametrize(
    "text, constraint",
    [
        ("node.zone=a", Constraint("node.zone", "=", "a")),
        ("zone==a", Constraint("node.zone", "=", "a")),
        ("region!=us-east", Constraint("node.region", "!=", "us-east")),
        ("node.region=~^eu-", Constraint("node.region", "regex", "^eu-")),
        ("node.region regex ^eu-", Constraint("node.region", "regex", "^eu-")),
        ("arch in amd64, arm64", Constraint("node.arch", "in", ("amd64", "arm64"))),
        ("class not_in phone,gateway", Constraint("node.class", "not_in", ("phone", "gateway"))),
        ("label.gpu exists", Constraint("label.gpu", "exists", "")),
        ("label.gpu", Constraint("label.gpu", "exists", "")),
        ("label.tier=gold", Constraint("label.tier", "=", "gold")),
    ],
)
def test_constraint_flag(text, constraint):
    assert parse_constraint_flag(text) == constraint


@pytest.mark.parametrize(
    "text, why",
    [
        ("colour=red", "unknown attribute 'colour'"),
        ("node.zone=", "operator = needs a value"),
        ("node.zone=~(", "invalid regular expression"),
        ("node.zone in ", "expected ATTR=V"),
        ("node.zone like a", "expected ATTR=V"),
    ],
)
def test_bad_constraint_flag(text, why):
    with pytest.raises(InvalidWorkload, match=r"^constraint: ") as info:
        parse_constraint_flag(text)
    assert why in info.value.message


def test_spread_flag():
    assert parse_spread_flag("zone") == Spread("node.zone")
    assert parse_spread_flag("node:1") == Spread("node", max_per=1)
    assert parse_spread_flag("label.rack:2") == Spread("label.rack", max_per=2)
    for bad in ("rack", "zone:x"):
        with pytest.raises(InvalidWorkload, match=r"^spread: "):
            parse_spread_flag(bad)


def test_flags_are_validated_as_a_whole():
    with pytest.raises(InvalidWorkload, match=r"^ports\[1\].host_port: 80/tcp is published twice"):
        from_flags("nginx", ports=["80:80", "80:81"])
    with pytest.raises(InvalidWorkload, match=r"^replicas: must be ≥ 0"):
        from_flags("nginx", replicas=-1)


# ---------------------------------------------------------------- wire


def test_spec_and_allocation_round_trip_the_wire():
    spec = parse_yaml(FULL_YAML)
    assert decode_spec(encode_spec(spec)) == spec
    alloc = Allocation(
        id="api-0-1a2b", workload="api", version=3, node="node-1", replica=0, state="running", restarts=2
    )
    assert decode_allocation(encode_allocation(alloc)) == alloc
    assert alloc.live and not msgspec.structs.replace(alloc, state="lost").live


def test_decoding_a_spec_validates_it():
    bad = msgspec.msgpack.encode({"name": "web", "image": "nginx", "replicas": -1})
    with pytest.raises(InvalidWorkload, match=r"^replicas: must be ≥ 0"):
        decode_spec(bad)
    with pytest.raises(InvalidWorkload, match=r"^spec: undecodable"):
        decode_spec(b"\xc1garbage")
    with pytest.raises(InvalidWorkload, match=r"^allocation"):
        decode_allocation(
            msgspec.msgpack.encode(
                {"id": "x", "workload": "w", "version": 0, "node": "n", "replica": 0, "state": "zombie"}
            )
        )


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_flag_parsers_reject_garbage_with_invalid_workload_only(text):
    for parser in (
        parse_cpu,
        parse_memory,
        parse_port_flag,
        parse_restart_flag,
        parse_constraint_flag,
        parse_spread_flag,
        parse_env_flag,
    ):
        try:
            parser(text)
        except InvalidWorkload:
            pass


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_yaml_garbage_raises_invalid_workload_only(text):
    try:
        parse_yaml(text)
    except InvalidWorkload:
        pass


def test_yaml_scalars_in_rule_values_become_strings():
    spec = parse_yaml(
        "name: web\nimage: nginx\n"
        "constraints: [{attribute: node.metered, value: false}, {attribute: label.gen, operator: in, value: [3, 4]}]\n"
        "spreads: [{attribute: label.rack, targets: [{value: 7, percent: 50}]}]\n"
    )
    assert spec.constraints[0].value == "false"
    assert spec.constraints[1].value == ("3", "4")
    assert spec.spreads[0].targets[0].value == "7"


# ---------------------------------------------------------------- durations in YAML


def test_yaml_durations_accept_units_under_either_name():
    spec = parse_yaml(
        "name: web\nimage: nginx\nports: [{container_port: 80}]\n"
        "health_check: {kind: http, port: 80, interval: 30s, timeout_s: 500ms, start_period: 1m}\n"
        "restart: {backoff_initial: 250ms, backoff_max_s: 1h30m}\n"
        "reschedule: {attempts: 3, interval: 1h, delay: 5s, max_delay_s: 10m, unlimited: false}\n"
        "update: {min_healthy_time: 10s, healthy_deadline: 5m}\n"
    )
    hc = spec.health_check
    assert hc is not None and (hc.interval_s, hc.timeout_s, hc.start_period_s) == (30.0, 0.5, 60.0)
    assert (spec.restart.backoff_initial_s, spec.restart.backoff_max_s) == (0.25, 5400.0)
    assert (spec.reschedule.interval_s, spec.reschedule.delay_s, spec.reschedule.max_delay_s) == (3600.0, 5.0, 600.0)
    assert (spec.update.min_healthy_time_s, spec.update.healthy_deadline_s) == (10.0, 300.0)
    # Plain numbers stay seconds, as before.
    assert parse_yaml("name: web\nimage: nginx\nupdate: {healthy_deadline_s: 120}\n").update.healthy_deadline_s == 120


def test_every_float_seconds_field_is_a_duration():
    fields = {f"{section}.{name}" for section, names in duration_fields().items() for name in names}
    assert fields == {
        "restart.backoff_initial_s",
        "restart.backoff_max_s",
        "reschedule.interval_s",
        "reschedule.delay_s",
        "reschedule.max_delay_s",
        "update.min_healthy_time_s",
        "update.healthy_deadline_s",
        "health_check.interval_s",
        "health_check.timeout_s",
        "health_check.start_period_s",
    }


@pytest.mark.parametrize(
    "body, expected",
    [
        ("health_check: {kind: exec, command: [x], interval: 2h}", "health_check.interval: must be ≤ 1h"),
        (
            "health_check: {kind: exec, command: [x], interval_s: 10x}",
            "health_check.interval_s: '10x' is not a duration",
        ),
        ("update: {healthy_deadline: 1s, healthy_deadline_s: 3}", "update.healthy_deadline: give healthy_deadline or"),
        ("update: {healthy_deadline: 2d}", "update.healthy_deadline: must be ≤ 1d"),
        ("reschedule: {delay: -1s}", "reschedule.delay: '-1s' is not a duration"),
        ("restart: {backoff_max: 0s}", "restart.backoff_max_s: must be > 0"),
        ("restart: {backoff_max: [1]}", "restart.backoff_max_s: expected `float`"),
        (
            "update: {min_healthy_time: 1m, healthy_deadline: 30s}",
            "update.min_healthy_time_s: must be ≤ healthy_deadline_s",
        ),
    ],
)
def test_yaml_duration_errors_name_the_field(body, expected):
    with pytest.raises(InvalidWorkload) as info:
        parse_yaml(f"name: web\nimage: nginx\n{body}\n")
    assert info.value.message.startswith(expected), info.value.message


def test_a_bare_equals_operator_is_the_string():
    spec = parse_yaml("name: web\nimage: nginx\nconstraints: [{attribute: node.zone, operator: =, value: a}]\n")
    assert spec.constraints[0] == Constraint("node.zone", "=", "a")


@pytest.mark.parametrize("depth", [100, 5000])
def test_deeply_nested_yaml_is_a_clear_error(depth):
    with pytest.raises(InvalidWorkload):
        parse_yaml("name: web\nimage: nginx\nenv: {A: " + "[" * depth + "]" * depth + "}\n")
