"""Rootless runc: host facts (subordinate ids, delegated cgroup) and the config built from them,
against `runc spec --rootless` and runc's rootless rules (user namespace, mappings, no cgroups
unless delegated, /sys bound read-only, devpts without gid=5)."""

import json
import os

import pytest

from cloudless.sandbox.rootless import (
    IdMapping,
    NoNetwork,
    RootlessHost,
    delegated_cgroup,
    id_mappings,
    subordinate_range,
)
from cloudless.sandbox.runtime import ContainerSpec, InvalidContainerSpec, PortMapping, SandboxError
from cloudless.sandbox.spec import HostCgroups, ResolvedUser, build_config

V1 = HostCgroups(version=1, swap_accounting=True)
V2 = HostCgroups(version=2, swap_accounting=True)
SINGLE = RootlessHost(id_mappings(1000, None), id_mappings(1000, None))
SUBIDS = RootlessHost(id_mappings(1000, (100000, 65536)), id_mappings(1000, (100000, 65536)))


def make(**kw):
    base = dict(
        id="web-1", rootfs="/home/u/rootfs", args=["sh"], network="none", memory_bytes=64 << 20, cpu=0.5, pids_limit=64
    )
    base.update(kw)
    return ContainerSpec(**base)


def config(spec=None, host=SINGLE, user=ResolvedUser(0, 0), cgroups=V1):
    return build_config(spec or make(), user=user, cgroups=cgroups, cgroups_path="cloudless-x/web-1", rootless=host)


def test_subuid_entry_by_name_or_uid_and_malformed_lines_ignored():
    text = "# comment\nbob:x:10\nalice:100000:65536\n1001:200000:1000\nbad:1:\nzero:5:0\n"
    assert subordinate_range(text, "alice", 1000) == (100000, 65536)
    assert subordinate_range(text, "carol", 1001) == (200000, 1000)
    assert subordinate_range(text, "bob", 7) is None  # non-numeric start
    assert subordinate_range(text, "zero", 8) is None  # an empty range
    assert subordinate_range("huge:4294967290:65536\n", "huge", 9) is None  # past the id space


def test_mappings_put_the_user_at_zero_and_the_subordinate_range_above_it():
    assert id_mappings(1000, None) == (IdMapping(0, 1000, 1),)
    assert id_mappings(1000, (100000, 1 << 20)) == (IdMapping(0, 1000, 1), IdMapping(1, 100000, 65536))
    assert SUBIDS.subordinate and not SINGLE.subordinate
    assert SUBIDS.maps_uid(65536) and not SUBIDS.maps_uid(65537) and not SINGLE.maps_uid(1)


def test_the_config_runs_in_a_user_namespace_with_the_users_mapping():
    c = config()
    linux = c["linux"]
    assert {"type": "user"} in linux["namespaces"]
    assert {"type": "network"} in linux["namespaces"]  # network none: loopback only, allowed inside the userns
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 1000, "size": 1}]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": 1000, "size": 1}]
    assert json.loads(json.dumps(c)) == c


def test_host_network_shares_the_hosts_namespace():
    namespaces = config(make(network="host"))["linux"]["namespaces"]
    assert {"type": "user"} in namespaces and not any(ns["type"] == "network" for ns in namespaces)


def test_mounts_follow_runc_spec_rootless():
    mounts = {m["destination"]: m for m in config()["mounts"]}
    assert mounts["/sys"]["type"] == "bind" and mounts["/sys"]["source"] == "/sys"
    assert "ro" in mounts["/sys"]["options"] and "rbind" in mounts["/sys"]["options"]
    assert not any(o.startswith("gid=") for o in mounts["/dev/pts"]["options"])
    assert "/sys/fs/cgroup" not in mounts  # a cgroup mount needs privileges; the /sys bind shows it read-only
    # A root node's config keeps them (unchanged by this path).
    root = build_config(make(), user=ResolvedUser(0, 0), cgroups=V1, cgroups_path="p/x")
    root_mounts = {m["destination"]: m for m in root["mounts"]}
    assert "gid=5" in root_mounts["/dev/pts"]["options"] and root_mounts["/sys"]["type"] == "sysfs"
    assert "uidMappings" not in root["linux"] and {"type": "user"} not in root["linux"]["namespaces"]


def test_without_a_delegated_cgroup_nothing_is_limited_and_no_cgroup_path_is_given():
    linux = config()["linux"]
    assert linux["resources"] == {}  # no devices rules either: runc cannot set them rootless
    assert "cgroupsPath" not in linux


def test_a_delegated_cgroup_enforces_exactly_the_controllers_it_offers():
    partial = RootlessHost(
        SINGLE.uid_mappings, SINGLE.gid_mappings, "/sys/fs/cgroup/user.slice/u", frozenset({"memory", "pids"})
    )
    linux = config(host=partial, cgroups=V2)["linux"]
    assert linux["cgroupsPath"] == "cloudless-x/web-1"  # relative: runc puts it under the delegated parent
    assert linux["resources"] == {"memory": {"limit": 64 << 20, "swap": 64 << 20}, "pids": {"limit": 64}}
    assert partial.unenforced() == ["cpu"]
    full = RootlessHost(
        SINGLE.uid_mappings, SINGLE.gid_mappings, "/sys/fs/cgroup/u", frozenset({"memory", "cpu", "pids"})
    )
    assert set(config(host=full, cgroups=V2)["linux"]["resources"]) == {"memory", "cpu", "pids"}


def test_a_user_without_an_id_inside_is_refused_and_groups_are_dropped_without_subordinate_ids():
    with pytest.raises(InvalidContainerSpec, match="no id on this rootless node"):
        config(user=ResolvedUser(1000, 1000))
    assert config(user=ResolvedUser(0, 0, (10,)))["process"]["user"] == {"uid": 0, "gid": 0}
    user = config(host=SUBIDS, user=ResolvedUser(1000, 1000, (10, 70000)))["process"]["user"]
    assert user == {"uid": 1000, "gid": 1000, "additionalGids": [10]}  # 70000 has no id inside


def test_a_bridge_network_is_refused():
    spec = make(network="bridge", ports=[PortMapping(8080, 80, "tcp")])
    with pytest.raises(InvalidContainerSpec, match="no container bridge"):
        config(spec)


async def test_the_rootless_network_attaches_nothing():
    net = NoNetwork()
    assert net.attachment("c") is None and await net.sweep({"c"}) == []
    await net.detach("c")
    with pytest.raises(SandboxError, match="no container bridge"):
        await net.attach("c", [])


def cgroup_tree(tmp_path, own="/user.slice/user-1000.slice/user@1000.service/app.slice/node.scope"):
    root = tmp_path / "cgroup"
    parent = root / os.path.dirname(own).lstrip("/")
    parent.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (parent / "cgroup.controllers").write_text("cpu memory pids\n")
    (parent / "cgroup.subtree_control").write_text("")
    return root, parent, f"0::{own}\n"


def test_delegated_cgroup_is_the_writable_parent_of_the_own_cgroup(tmp_path):
    root, parent, own = cgroup_tree(tmp_path)
    everything = lambda path, mode: True  # noqa: E731
    assert delegated_cgroup(own, root, everything) == (str(parent), frozenset({"cpu", "memory", "pids"}))
    (parent / "cgroup.controllers").write_text("memory\n")
    assert delegated_cgroup(own, root, everything)[1] == frozenset({"memory"})


def test_no_delegation_when_not_writable_on_v1_or_at_the_root(tmp_path):
    root, _, own = cgroup_tree(tmp_path)
    no_subtree = lambda path, mode: not path.endswith("cgroup.subtree_control")  # noqa: E731
    assert delegated_cgroup(own, root, no_subtree) == (None, frozenset())
    assert delegated_cgroup(own, root, lambda path, mode: False) == (None, frozenset())
    assert delegated_cgroup("0::/node.scope\n", root, lambda path, mode: True) == (None, frozenset())  # parent is /
    (root / "cgroup.controllers").unlink()  # v1 (or hybrid without the unified root): not delegable
    assert delegated_cgroup(own, root, lambda path, mode: True) == (None, frozenset())


def test_a_user_beyond_the_subordinate_range_is_refused_with_the_range():
    with pytest.raises(InvalidContainerSpec, match="ids 0-65536 are mapped"):
        config(host=SUBIDS, user=ResolvedUser(70000, 0))
