"""What a user asks the fabric to run: the workload spec, and the allocations
the scheduler places for it.

`WorkloadSpec` is what `cloudless run` flags and `cloudless apply -f` YAML turn
into; `validate()` is the single gate every spec passes before it is proposed
(errors name the field: `replicas: must be ≥ 0`, `constraints[1].operator:
...`). `Allocation` is one replica bound to one node, as the replicated state
holds it.

Bounds live in `msgspec.Meta` so decoding a spec from the network validates it
too; `validate()` adds the checks that span fields (operator vs value, ports vs
health check, update strategy arithmetic).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal, get_args

import msgspec
import yaml

from cloudless.duration import InvalidDuration, parse_duration
from cloudless.errors import InvalidInput
from cloudless.sandbox.reference import InvalidReference, parse_reference

FORMAT_VERSION = 1


class InvalidWorkload(InvalidInput):
    """A workload spec (or one of its flags) failed validation; the message names the field."""


# ---------------------------------------------------------------- vocabulary

DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
WorkloadName = Annotated[str, msgspec.Meta(pattern=DNS_LABEL)]
NodeId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
AllocationId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Arg = Annotated[str, msgspec.Meta(max_length=4096)]
EnvKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")]
EnvValue = Annotated[str, msgspec.Meta(max_length=32 * 1024)]
Weight = Annotated[int, msgspec.Meta(ge=-100, le=100)]
PositiveWeight = Annotated[int, msgspec.Meta(ge=1, le=100)]
AttrValue = Annotated[str, msgspec.Meta(max_length=253)]

Protocol = Literal["tcp", "udp"]
RestartMode = Literal["always", "on-failure", "never"]
Operator = Literal["=", "!=", "in", "not_in", "regex", "exists"]
DeviceClass = Literal["server", "pc", "laptop", "phone", "gateway"]
AllocationState = Literal["pending", "starting", "running", "exited", "failed", "lost"]

# Node attributes a constraint, affinity or spread may name. `label.<key>`
# names a node label; `node` alone (spreads only) means the node itself.
NODE_ATTRIBUTES = (
    "node.id",
    "node.region",
    "node.zone",
    "node.arch",
    "node.class",
    "node.power",
    "node.network",
    "node.metered",
    "node.runtime",
)
_LABEL_ATTRIBUTE = re.compile(r"^label\.[A-Za-z0-9_.:/-]{1,63}$")
MAX_LIST = 64


class Resources(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What one replica reserves on its node."""

    cpu_millis: Annotated[int, msgspec.Meta(ge=1, le=1024 * 1000)] = 100
    memory_bytes: Annotated[int, msgspec.Meta(ge=1 << 20, le=1 << 44)] = 128 << 20


class PortSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A container port, optionally published on the node's `host_port`."""

    container_port: Port
    host_port: Port | None = None
    protocol: Protocol = "tcp"


class RestartPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What the node's supervisor does when the process exits (in place, same node)."""

    mode: RestartMode = "always"
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0  # on-failure; 0 is unlimited
    backoff_initial_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 0.5
    backoff_max_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 30.0


class ReschedulePolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """When a replica fails for good (or its node is lost), how it is placed again elsewhere.

    At most `attempts` reschedules within a sliding `interval_s`, unless
    `unlimited`; each waits `delay_s`, growing (exponential) up to `max_delay_s`.
    """

    attempts: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    interval_s: Seconds = 0.0
    delay_s: Seconds = 1.0
    delay_function: Literal["constant", "exponential"] = "exponential"
    max_delay_s: Seconds = 60.0
    unlimited: bool = True


class Constraint(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A hard rule: a node whose `attribute` fails it is not feasible.

    `value` is a string for =, != and regex, a list for in / not_in, and
    empty for exists.
    """

    attribute: Annotated[str, msgspec.Meta(max_length=80)]
    operator: Operator = "="
    value: AttrValue | Annotated[tuple[AttrValue, ...], msgspec.Meta(max_length=MAX_LIST)] = ""


class Affinity(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A soft rule: matching nodes score higher (negative weight: lower)."""

    attribute: Annotated[str, msgspec.Meta(max_length=80)]
    operator: Operator = "="
    value: AttrValue | Annotated[tuple[AttrValue, ...], msgspec.Meta(max_length=MAX_LIST)] = ""
    weight: Weight = 50


class SpreadTarget(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    value: AttrValue
    percent: Annotated[int, msgspec.Meta(ge=0, le=100)]


class Spread(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Spread replicas over the values of `attribute` ("node", "node.zone", ...).

    Soft: without `targets` the replicas spread evenly, with them each value
    aims at its percentage (unlisted values share what is left). `max_per`
    (0: none) is a hard limit of replicas per value — `node` with `max_per: 1`
    is distinct hosts.
    """

    attribute: Annotated[str, msgspec.Meta(max_length=80)] = "node"
    weight: PositiveWeight = 50
    targets: Annotated[tuple[SpreadTarget, ...], msgspec.Meta(max_length=MAX_LIST)] = ()
    max_per: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0


class AntiAffinity(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Keep away from another workload's replicas, per node or per zone (or any attribute).

    `hard`: a node sharing the scope with one of them is not feasible;
    otherwise such nodes score lower by `weight`. (Anti-affinity with the
    workload itself is a `Spread`.)
    """

    workload: WorkloadName
    attribute: Annotated[str, msgspec.Meta(max_length=80)] = "node"
    weight: PositiveWeight = 50
    hard: bool = False


class UpdateStrategy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Rolling update: how many extra / missing replicas are allowed at a time,
    and when a new replica counts as healthy.

    Give `max_unavailable` or `min_available`, not both. A new replica must
    stay healthy for `min_healthy_time_s` within `healthy_deadline_s` of its
    start; otherwise the update fails and, with `auto_revert`, rolls back to
    the last version that was healthy.
    """

    max_surge: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 1
    max_unavailable: Annotated[int, msgspec.Meta(ge=0, le=10_000)] | None = None
    min_available: Annotated[int, msgspec.Meta(ge=0, le=10_000)] | None = None
    min_healthy_time_s: Seconds = 10.0
    healthy_deadline_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0
    auto_revert: bool = False


class HealthCheckSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Docker HEALTHCHECK semantics (see cloudless/sandbox/health.py)."""

    kind: Literal["exec", "tcp", "http"]
    command: Annotated[tuple[Arg, ...], msgspec.Meta(max_length=256)] = ()
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # container port (tcp, http)
    path: Annotated[str, msgspec.Meta(pattern=r"^/[^\s]{0,1023}$")] = "/"
    interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    retries: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    start_period_s: Seconds = 0.0


class WorkloadSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: WorkloadName
    image: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    command: Annotated[tuple[Arg, ...], msgspec.Meta(max_length=256)] = ()
    env: Annotated[dict[EnvKey, EnvValue], msgspec.Meta(max_length=256)] = {}
    replicas: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 1
    resources: Resources = Resources()
    ports: Annotated[tuple[PortSpec, ...], msgspec.Meta(max_length=MAX_LIST)] = ()
    restart: RestartPolicy = RestartPolicy()
    reschedule: ReschedulePolicy = ReschedulePolicy()
    constraints: Annotated[tuple[Constraint, ...], msgspec.Meta(max_length=MAX_LIST)] = ()
    affinities: Annotated[tuple[Affinity, ...], msgspec.Meta(max_length=MAX_LIST)] = ()
    spreads: Annotated[tuple[Spread, ...], msgspec.Meta(max_length=8)] = ()
    anti_affinities: Annotated[tuple[AntiAffinity, ...], msgspec.Meta(max_length=MAX_LIST)] = ()
    update: UpdateStrategy = UpdateStrategy()
    health_check: HealthCheckSpec | None = None
    version: NonNegative = 0
    format: int = FORMAT_VERSION

    @property
    def host_ports(self) -> tuple[tuple[int, str], ...]:
        """(host port, protocol) pairs a node must have free to run one replica."""
        return tuple((p.host_port, p.protocol) for p in self.ports if p.host_port is not None)


class Allocation(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One replica of one workload version, bound to one node."""

    id: AllocationId
    workload: WorkloadName
    version: NonNegative
    node: NodeId
    replica: NonNegative
    state: AllocationState = "pending"
    exit_code: int | None = None
    restarts: NonNegative = 0
    resources: Resources = Resources()
    ports: Annotated[tuple[PortSpec, ...], msgspec.Meta(max_length=MAX_LIST)] = ()

    @property
    def live(self) -> bool:
        """Still holds (or is about to hold) resources on its node."""
        return self.state in LIVE_STATES


LIVE_STATES = frozenset({"pending", "starting", "running"})


# ---------------------------------------------------------------- validation

_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.S)
_BOUND = re.compile(r"^Expected `\w+` (?P<op>>=|<=|>|<) (?P<n>\S+)$")
_OP_WORDS = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}


_ENUMS = {
    "operator": get_args(Operator),
    "protocol": get_args(Protocol),
    "mode": get_args(RestartMode),
    "kind": ("exec", "tcp", "http"),
    "delay_function": ("constant", "exponential"),
    "state": get_args(AllocationState),
}


def _field_error(exc: msgspec.ValidationError | msgspec.DecodeError, root: str = "") -> InvalidWorkload:
    """Rewrite msgspec's "Expected `int` >= 0 - at `$.replicas`" as "replicas: must be ≥ 0"."""
    m = _MSGSPEC_PATH.match(str(exc))
    msg, path = (m.group("msg"), m.group("path") or "") if m else (str(exc), "")
    if m and m.group("key") and path.endswith(".env"):
        msg = "keys must be variable names: letters, digits and _, not starting with a digit"
    bound = _BOUND.match(msg)
    if bound:
        msg = f"must be {_OP_WORDS[bound.group('op')]} {bound.group('n')}"
    if msg.startswith("Expected `str` matching regex '" + DNS_LABEL):
        msg = "must be a DNS label: 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
    elif msg.startswith("Invalid enum value"):
        allowed = _ENUMS.get(path.rsplit(".", 1)[-1])
        if allowed:
            msg = f"{msg}; expected one of {', '.join(allowed)}"
    unknown = re.match(r"^Object contains unknown field `(?P<f>[^`]*)`$", msg)
    if unknown:
        path = f"{path}.{unknown.group('f')}"
        msg = "unknown field"
    missing = re.match(r"^Object missing required field `(?P<f>[^`]*)`$", msg)
    if missing:
        path = f"{path}.{missing.group('f')}"
        msg = "required field is missing"
    field = (root + path).lstrip(".") or "spec"
    return InvalidWorkload(f"{field}: {msg[:1].lower()}{msg[1:]}", field=field)


def _fail(field: str, message: str) -> InvalidWorkload:
    return InvalidWorkload(f"{field}: {message}", field=field)


def check_attribute(attribute: str, field: str, *, allow_node: bool = False) -> None:
    if attribute in NODE_ATTRIBUTES or _LABEL_ATTRIBUTE.match(attribute):
        return
    if allow_node and attribute == "node":
        return
    allowed = ", ".join(("node",) * allow_node + NODE_ATTRIBUTES + ("label.<key>",))
    raise _fail(field, f"unknown attribute {attribute!r}; expected one of {allowed}")


def _normalise_rule(rule: Constraint | Affinity, field: str) -> Constraint | Affinity:
    """Check the operator/value pairing; a comma string for in/not_in becomes a list."""
    check_attribute(rule.attribute, f"{field}.attribute")
    op, value = rule.operator, rule.value
    if op in ("in", "not_in"):
        values = tuple(v.strip() for v in value.split(",")) if isinstance(value, str) else value
        if not values or any(v == "" for v in values):
            raise _fail(f"{field}.value", f"operator {op} needs a non-empty list of values")
        return msgspec.structs.replace(rule, value=values)
    if op == "exists":
        if value not in ("", ()):
            raise _fail(f"{field}.value", "operator exists takes no value")
        return msgspec.structs.replace(rule, value="")
    if not isinstance(value, str):
        raise _fail(f"{field}.value", f"operator {op} needs a single value, not a list")
    if op == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise _fail(f"{field}.value", f"invalid regular expression: {exc}") from None
    elif value == "" and op == "=":
        raise _fail(f"{field}.value", "operator = needs a value (use exists to require the attribute)")
    return rule


# A spec travels in every allocation of it through Raft and down each agent's
# feed; field bounds alone admit ~9 MB (256 env values of 32 KiB), which
# wedged the feed at its 16 MiB frame limit. Kubernetes caps objects too.
MAX_SPEC_BYTES = 64 * 1024


def _check_size(spec: WorkloadSpec) -> None:
    size = len(msgspec.msgpack.encode(spec))
    if size <= MAX_SPEC_BYTES:
        return
    sizes = {f: len(msgspec.msgpack.encode(getattr(spec, f))) for f in spec.__struct_fields__}
    largest = max(sizes, key=lambda f: sizes[f])
    raise _fail(
        largest,
        f"the workload spec is {size:,} bytes encoded, over the {MAX_SPEC_BYTES:,}-byte limit "
        f"({largest} alone is {sizes[largest]:,} bytes); put large data in a blob or a volume",
    )


def validate(spec: WorkloadSpec) -> WorkloadSpec:
    """The spec, normalised, or InvalidWorkload naming the first bad field.

    Re-checks the msgspec bounds too, so a spec built in code (not decoded)
    gets the same errors as one read from YAML or the wire.
    """
    try:
        spec = msgspec.convert(msgspec.to_builtins(spec), WorkloadSpec)
    except msgspec.ValidationError as exc:
        raise _field_error(exc) from None
    if spec.format != FORMAT_VERSION:
        raise _fail("format", f"unsupported spec format {spec.format}; this node reads {FORMAT_VERSION}")
    _check_size(spec)
    try:
        parse_reference(spec.image)
    except InvalidReference as exc:
        raise _fail("image", exc.message) from None

    seen_container: set[tuple[int, str]] = set()
    seen_host: set[tuple[int, str]] = set()
    for i, port in enumerate(spec.ports):
        key = (port.container_port, port.protocol)
        if key in seen_container:
            raise _fail(f"ports[{i}].container_port", f"{port.container_port}/{port.protocol} is listed twice")
        seen_container.add(key)
        if port.host_port is not None:
            hkey = (port.host_port, port.protocol)
            if hkey in seen_host:
                raise _fail(f"ports[{i}].host_port", f"{port.host_port}/{port.protocol} is published twice")
            seen_host.add(hkey)

    if spec.restart.mode != "on-failure" and spec.restart.max_retries:
        raise _fail("restart.max_retries", "only applies to restart mode on-failure")
    if spec.restart.backoff_initial_s > spec.restart.backoff_max_s:
        raise _fail("restart.backoff_initial_s", "must be ≤ backoff_max_s")
    r = spec.reschedule
    if r.delay_s > r.max_delay_s:
        raise _fail("reschedule.delay_s", "must be ≤ max_delay_s")
    if not r.unlimited and r.attempts and r.interval_s <= 0:
        raise _fail("reschedule.interval_s", "must be > 0 when attempts are limited")

    constraints = tuple(_normalise_rule(c, f"constraints[{i}]") for i, c in enumerate(spec.constraints))
    affinities = tuple(_normalise_rule(a, f"affinities[{i}]") for i, a in enumerate(spec.affinities))
    for i, a in enumerate(affinities):
        if a.weight == 0:
            raise _fail(f"affinities[{i}].weight", "must not be 0")

    spread_attrs: set[str] = set()
    for i, s in enumerate(spec.spreads):
        check_attribute(s.attribute, f"spreads[{i}].attribute", allow_node=True)
        if s.attribute in spread_attrs:
            raise _fail(f"spreads[{i}].attribute", f"{s.attribute} is spread over twice")
        spread_attrs.add(s.attribute)
        total = 0
        values: set[str] = set()
        for j, t in enumerate(s.targets):
            if t.value in values:
                raise _fail(f"spreads[{i}].targets[{j}].value", f"{t.value!r} is listed twice")
            values.add(t.value)
            total += t.percent
        if total > 100:
            raise _fail(f"spreads[{i}].targets", f"percentages add up to {total}, more than 100")

    for i, aa in enumerate(spec.anti_affinities):
        check_attribute(aa.attribute, f"anti_affinities[{i}].attribute", allow_node=True)
        if aa.workload == spec.name:
            raise _fail(
                f"anti_affinities[{i}].workload",
                "anti-affinity with the workload itself is a spread (spreads: attribute, max_per)",
            )

    u = spec.update
    if u.max_unavailable is not None and u.min_available is not None:
        raise _fail("update.min_available", "give max_unavailable or min_available, not both")
    if u.min_available is not None and u.min_available > spec.replicas:
        raise _fail("update.min_available", f"must be ≤ replicas ({spec.replicas})")
    unavailable = (
        u.max_unavailable
        if u.max_unavailable is not None
        else (spec.replicas - u.min_available if u.min_available is not None else 0)
    )
    if u.max_surge == 0 and unavailable == 0 and spec.replicas > 0:
        raise _fail(
            "update.max_surge", "with no unavailability allowed, max_surge must be ≥ 1 or no update can progress"
        )
    if u.min_healthy_time_s > u.healthy_deadline_s:
        raise _fail("update.min_healthy_time_s", "must be ≤ healthy_deadline_s")

    hc = spec.health_check
    if hc is not None:
        if hc.kind == "exec" and not hc.command:
            raise _fail("health_check.command", "an exec health check needs a command")
        if hc.kind != "exec":
            if hc.port == 0:
                raise _fail("health_check.port", f"a {hc.kind} health check needs a container port")
            if spec.ports and hc.port not in {p.container_port for p in spec.ports if p.protocol == "tcp"}:
                raise _fail("health_check.port", f"{hc.port} is not one of the workload's tcp ports")
        if hc.timeout_s > hc.interval_s:
            raise _fail("health_check.timeout_s", "must be ≤ interval_s")

    return msgspec.structs.replace(spec, constraints=constraints, affinities=affinities)


# ---------------------------------------------------------------- YAML (`cloudless apply -f`)


def _yaml_resources(doc: dict[str, Any]) -> None:
    """Accept human units in YAML: resources.cpu ("500m", 0.5) and resources.memory ("256Mi")."""
    res = doc.get("resources")
    if not isinstance(res, dict):
        return
    if "cpu" in res:
        if "cpu_millis" in res:
            raise _fail("resources.cpu", "give cpu or cpu_millis, not both")
        res["cpu_millis"] = parse_cpu(str(res.pop("cpu")), field="resources.cpu")
    if "memory" in res:
        if "memory_bytes" in res:
            raise _fail("resources.memory", "give memory or memory_bytes, not both")
        res["memory_bytes"] = parse_memory(str(res.pop("memory")), field="resources.memory")


@functools.cache
def duration_fields() -> dict[str, dict[str, tuple[float | None, float | None]]]:
    """Section → its duration fields (the `*_s` floats) → (ge, le) bounds, from the structs themselves."""
    out: dict[str, dict[str, tuple[float | None, float | None]]] = {}
    info = msgspec.inspect.type_info(WorkloadSpec)
    assert isinstance(info, msgspec.inspect.StructType)
    for section in info.fields:
        t = section.type
        if isinstance(t, msgspec.inspect.UnionType):  # health_check: HealthCheckSpec | None
            t = next((u for u in t.types if isinstance(u, msgspec.inspect.StructType)), t)
        if not isinstance(t, msgspec.inspect.StructType):
            continue
        for f in t.fields:
            if f.name.endswith("_s") and isinstance(f.type, msgspec.inspect.FloatType):
                out.setdefault(section.name, {})[f.name] = (f.type.ge, f.type.le)
    return out


def _yaml_durations(doc: dict[str, Any]) -> None:
    """Accept durations in YAML (`10s`, `1h30m`, or seconds), under the field's
    name (`interval_s: 10s`) or without its `_s` (`interval: 10s`)."""
    for section, fields in duration_fields().items():
        body = doc.get(section)
        if not isinstance(body, dict):
            continue
        for name, (ge, le) in fields.items():
            given = name
            alias = name[:-2]
            if alias in body:
                if name in body:
                    raise _fail(f"{section}.{alias}", f"give {alias} or {name}, not both")
                body[name] = body.pop(alias)
                given = alias
            value = body.get(name)
            if isinstance(value, (str, int, float)):
                try:
                    body[name] = parse_duration(
                        value,
                        field=f"{section}.{given}",
                        minimum=ge if ge is not None else 0.0,
                        maximum=le if le is not None else 30 * 86400.0,
                    )
                except InvalidDuration as exc:
                    raise InvalidWorkload(exc.message, field=f"{section}.{given}") from None


class SpecLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, except that a bare `=` (operator: =) is the string
    "=" rather than the obscure `value` tag no safe loader can construct."""


SpecLoader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def parse_yaml(text: str | bytes) -> WorkloadSpec:
    """One YAML document → a validated spec. Unknown fields are errors that name them."""
    try:
        docs = [_join_surrogates(d) for d in yaml.load_all(text, Loader=SpecLoader) if d is not None]
    except RecursionError:  # PyYAML composes recursively: `[[[[...` thousands deep
        raise InvalidWorkload("spec: nested too deeply", field="spec") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidWorkload(f"spec: not valid YAML{where}: {problem}", field="spec") from None
    if len(docs) != 1:
        raise InvalidWorkload(f"spec: expected one YAML document, found {len(docs)}", field="spec")
    doc = docs[0]
    if not isinstance(doc, dict):
        raise InvalidWorkload("spec: expected a mapping of fields", field="spec")
    doc = _unwrap_inspect(doc)
    _yaml_resources(doc)
    _yaml_durations(doc)
    if isinstance(doc.get("command"), str):
        raise _fail("command", "must be a list of arguments, e.g. [sh, -c, 'echo hi']")
    _yaml_rule_values(doc)
    if isinstance(doc.get("env"), dict):
        # YAML turns `PORT: 80` into an int; env values are strings.
        doc["env"] = {k: v if isinstance(v, str) else _yaml_scalar(v) for k, v in doc["env"].items()}
    try:
        spec = msgspec.convert(doc, WorkloadSpec)
    except msgspec.ValidationError as exc:
        raise _field_error(exc) from None
    return validate(spec)


# The keys beside `spec` in `cloudless inspect -o yaml|json`: apply takes that
# document back as it is (kubectl's get -o yaml | apply), reading only `spec`.
INSPECT_KEYS = frozenset(
    {"name", "state", "stable_version", "failed_versions", "allocations", "explanations", "pending_reason"}
)


def _unwrap_inspect(doc: dict[Any, Any]) -> dict[Any, Any]:
    if "spec" not in doc:
        return doc
    spec = doc["spec"]
    if not isinstance(spec, dict):
        raise InvalidWorkload("spec: expected a mapping of the workload's fields", field="spec")
    extra = sorted(str(k) for k in set(doc) - INSPECT_KEYS - {"spec"})
    if extra:
        raise _fail(
            extra[0], "unknown field beside spec (a document with spec is read as `cloudless inspect` prints it)"
        )
    if "name" in doc and "name" in spec and doc["name"] != spec["name"]:
        raise _fail("name", f"{doc['name']!r} is not spec.name {spec['name']!r}")
    return spec


_SURROGATE = re.compile("[\ud800-\udfff]")


def _join_surrogates(value: Any) -> Any:
    """JSON escapes a character beyond the BMP as a surrogate pair (\\ud83d\\ude00), which
    PyYAML keeps as two code points: join them, as a JSON reader would."""
    if isinstance(value, str):
        if not _SURROGATE.search(value):
            return value
        try:
            return value.encode("utf-16", "surrogatepass").decode("utf-16")
        except UnicodeDecodeError:
            raise InvalidWorkload("spec: a string holds an unpaired UTF-16 surrogate", field="spec") from None
    if isinstance(value, list):
        return [_join_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_join_surrogates(k): _join_surrogates(v) for k, v in value.items()}
    return value


def _yaml_rule_values(doc: dict[str, Any]) -> None:
    """YAML reads `value: true` or `value: 5` as bool/int; attribute values are strings."""
    for section in ("constraints", "affinities"):
        rules = doc.get(section)
        if isinstance(rules, list):
            for rule in rules:
                if isinstance(rule, dict) and "value" in rule:
                    v = rule["value"]
                    rule["value"] = [_yaml_scalar(x) for x in v] if isinstance(v, list) else _yaml_scalar(v)
    spreads = doc.get("spreads")
    if isinstance(spreads, list):
        for spread in spreads:
            targets = spread.get("targets") if isinstance(spread, dict) else None
            if isinstance(targets, list):
                for t in targets:
                    if isinstance(t, dict) and "value" in t:
                        t["value"] = _yaml_scalar(t["value"])


def _yaml_scalar(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value  # lists/maps stay invalid and are reported by convert


def to_yaml(spec: WorkloadSpec) -> str:
    return yaml.safe_dump(msgspec.to_builtins(spec), sort_keys=False)


# ---------------------------------------------------------------- flags (`cloudless run`)

_CPU = re.compile(r"^(?:(?P<m>[0-9]+)m|(?P<c>[0-9]+(?:\.[0-9]{1,3})?))$")
_MEMORY = re.compile(r"^(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<u>[KMGT]i?|[kmgt]i?|B|b)?$")
_MEMORY_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "ti": 1 << 40,
}
_PORT = re.compile(r"^(?:(?P<h>[0-9]{1,5}):)?(?P<c>[0-9]{1,5})(?:/(?P<p>[a-z]+))?$")
_CONSTRAINT = re.compile(
    r"^\s*(?P<a>[A-Za-z0-9_.:/-]+)\s*(?:(?P<op>!=|=~|==|=)\s*(?P<v>.*?)"
    r"|\s+(?P<word>in|not_in|regex)\s+(?P<wv>.+?)|\s+(?P<ex>exists))?\s*$"
)
_SPREAD_SHORT = {"node": "node", "zone": "node.zone", "region": "node.region"}


def parse_cpu(text: str, *, field: str = "cpu") -> int:
    """ "0.5" / "2" cores or "500m" millicores → millicores."""
    m = _CPU.match(text.strip())
    if not m:
        raise _fail(field, f"{text!r} is not a CPU amount (cores like 0.5 or millicores like 500m)")
    millis = int(m.group("m")) if m.group("m") else round(float(m.group("c")) * 1000)
    if millis < 1:
        raise _fail(field, "must be at least 1m")
    return millis


def parse_memory(text: str, *, field: str = "memory") -> int:
    """ "256Mi", "1G", "512M", "1048576" → bytes (Ki/Mi/Gi binary, k/M/G decimal)."""
    m = _MEMORY.match(text.strip())
    if not m:
        raise _fail(field, f"{text!r} is not a memory size (e.g. 256Mi, 1Gi, 512M or bytes)")
    value = float(m.group("n")) * _MEMORY_UNITS[(m.group("u") or "").lower()]
    if value != int(value):
        raise _fail(field, f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_env_flag(text: str) -> tuple[str, str]:
    """ "KEY=VALUE" (the value may contain "=" and be empty)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise _fail("env", f"{text!r}: expected KEY=VALUE")
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$", key):
        raise _fail("env", f"{key!r} is not a valid variable name (letters, digits, _; not starting with a digit)")
    return key, value


def parse_port_flag(text: str) -> PortSpec:
    """ "[HOST:]CONTAINER[/PROTO]", e.g. 8080:80/tcp or 53/udp."""
    m = _PORT.match(text.strip())
    if not m:
        raise _fail("port", f"{text!r}: expected [HOST:]CONTAINER[/tcp|udp], e.g. 8080:80")
    proto = m.group("p") or "tcp"
    if proto not in ("tcp", "udp"):
        raise _fail("port", f"{text!r}: protocol must be tcp or udp, not {proto!r}")
    numbers = [int(m.group("c"))] + ([int(m.group("h"))] if m.group("h") else [])
    if any(not 1 <= n <= 65535 for n in numbers):
        raise _fail("port", f"{text!r}: ports are 1-65535")
    host = int(m.group("h")) if m.group("h") else None
    return PortSpec(container_port=int(m.group("c")), host_port=host, protocol=proto)


def parse_restart_flag(text: str) -> RestartPolicy:
    """ "always" | "never" | "on-failure[:MAX]"."""
    mode, _, max_text = text.strip().partition(":")
    if mode not in ("always", "on-failure", "never"):
        raise _fail("restart", f"{text!r}: expected always, never or on-failure[:MAX]")
    if max_text and mode != "on-failure":
        raise _fail("restart", f"{text!r}: only on-failure takes a maximum")
    if max_text and not max_text.isdigit():
        raise _fail("restart", f"{text!r}: the maximum must be a whole number")
    return RestartPolicy(mode=mode, max_retries=int(max_text or 0))  # type: ignore[arg-type]


def parse_constraint_flag(text: str) -> Constraint:
    """ "ATTR=V", "ATTR!=V", "ATTR=~REGEX", "ATTR in a,b", "ATTR not_in a,b", "ATTR exists".

    `zone`, `region`, `arch`, `class`, `power`, `network`, `runtime` are accepted for
    their `node.` attributes.
    """
    m = _CONSTRAINT.match(text)
    if not m:
        raise _fail(
            "constraint",
            f"{text!r}: expected ATTR=V, ATTR!=V, ATTR=~REGEX, 'ATTR in A,B', 'ATTR not_in A,B' or 'ATTR exists'",
        )
    attr = m.group("a")
    if "." not in attr and f"node.{attr}" in NODE_ATTRIBUTES:
        attr = f"node.{attr}"
    if m.group("op"):
        op = {"=": "=", "==": "=", "!=": "!=", "=~": "regex"}[m.group("op")]
        value: str | tuple[str, ...] = m.group("v")
    elif m.group("word"):
        op = m.group("word")
        value = m.group("wv")
        if op != "regex":
            value = tuple(v.strip() for v in value.split(","))
    else:
        op, value = "exists", ""
    constraint = Constraint(attribute=attr, operator=op, value=value)  # type: ignore[arg-type]
    try:
        return _normalise_rule(constraint, "constraint")  # type: ignore[return-value]
    except InvalidWorkload as exc:
        raise _fail("constraint", f"{text!r}: {exc.message.split(': ', 1)[1]}") from None


def parse_spread_flag(text: str) -> Spread:
    """ "node", "zone", "region" or an attribute, optionally ":MAX" (hard limit per value).

    e.g. `--spread zone`, `--spread node:1` (distinct hosts), `--spread label.rack`.
    """
    attr, _, max_text = text.strip().partition(":")
    attr = _SPREAD_SHORT.get(attr, attr)
    if max_text and not max_text.isdigit():
        raise _fail("spread", f"{text!r}: the limit after ':' must be a whole number")
    try:
        check_attribute(attr, "spread", allow_node=True)
    except InvalidWorkload as exc:
        raise _fail("spread", f"{text!r}: {exc.message.split(': ', 1)[1]}") from None
    return Spread(attribute=attr, max_per=int(max_text or 0))


def default_name(image: str) -> str:
    """The workload name `cloudless run IMAGE` uses without --name: the image's last path component."""
    base = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0].lower()
    name = re.sub(r"[^a-z0-9-]+", "-", base).strip("-")[:63].strip("-")
    return name or "workload"


def from_flags(
    image: str,
    *,
    name: str | None = None,
    replicas: int = 1,
    cpu: str | None = None,
    memory: str | None = None,
    env: Iterable[str] = (),
    ports: Iterable[str] = (),
    restart: str | None = None,
    constraints: Iterable[str] = (),
    spreads: Iterable[str] = (),
    command: Sequence[str] = (),
) -> WorkloadSpec:
    """`cloudless run IMAGE [--name] [--replicas] [--cpu] [--memory] [--env K=V]... [--port [H:]C[/P]]...
    [--restart] [--constraint EXPR]... [--spread ATTR[:MAX]]... -- CMD...` → a validated spec."""
    env_map: dict[str, str] = {}
    for item in env:
        key, value = parse_env_flag(item)
        env_map[key] = value
    resources = Resources(
        cpu_millis=parse_cpu(cpu) if cpu is not None else Resources().cpu_millis,
        memory_bytes=parse_memory(memory) if memory is not None else Resources().memory_bytes,
    )
    spec = WorkloadSpec(
        name=name if name is not None else default_name(image),
        image=image,
        command=tuple(command),
        env=env_map,
        replicas=replicas,
        resources=resources,
        ports=tuple(parse_port_flag(p) for p in ports),
        restart=parse_restart_flag(restart) if restart is not None else RestartPolicy(),
        constraints=tuple(parse_constraint_flag(c) for c in constraints),
        spreads=tuple(parse_spread_flag(s) for s in spreads),
    )
    return validate(spec)


_spec_encoder = msgspec.msgpack.Encoder()
_spec_decoder = msgspec.msgpack.Decoder(WorkloadSpec)
_allocation_decoder = msgspec.msgpack.Decoder(Allocation)


def encode_spec(spec: WorkloadSpec) -> bytes:
    return _spec_encoder.encode(spec)


def decode_spec(data: bytes) -> WorkloadSpec:
    try:
        return validate(_spec_decoder.decode(data))
    except msgspec.DecodeError as exc:
        if isinstance(exc, msgspec.ValidationError):
            raise _field_error(exc) from None
        raise InvalidWorkload(f"spec: undecodable: {exc}", field="spec") from None


def encode_allocation(allocation: Allocation) -> bytes:
    return _spec_encoder.encode(allocation)


def decode_allocation(data: bytes) -> Allocation:
    try:
        return _allocation_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidWorkload(f"allocation: {exc}", field="allocation") from None
