import os

import pytest

from cloudless.node.device import detect, detect_network, detect_power


def supply(root, name, **files):
    d = root / name
    d.mkdir(parents=True)
    for k, v in files.items():
        (d / k).write_text(v + "\n")


def test_laptop_on_battery(tmp_path):
    supply(tmp_path, "BAT0", type="Battery", capacity="42", status="Discharging")
    supply(tmp_path, "AC", type="Mains", online="0")
    assert detect_power(tmp_path) == ("battery", 42.0, False)


def test_laptop_plugged_in_counts_as_mains(tmp_path):
    supply(tmp_path, "BAT0", type="Battery", capacity="80", status="Charging")
    supply(tmp_path, "AC", type="Mains", online="1")
    assert detect_power(tmp_path) == ("ac", 80.0, True)


def test_server_without_battery(tmp_path):
    assert detect_power(tmp_path) == ("ac", None, False)
    assert detect_power(tmp_path / "missing") == ("ac", None, False)


def test_wifi_only_device(tmp_path):
    wlan = tmp_path / "wlan0"
    (wlan / "device").mkdir(parents=True)
    (wlan / "wireless").mkdir()
    (wlan / "operstate").write_text("up\n")
    bridge = tmp_path / "cl0"
    bridge.mkdir()
    (bridge / "operstate").write_text("up\n")
    assert detect_network(tmp_path) == "wifi"
    eth = tmp_path / "eth0"
    (eth / "device").mkdir(parents=True)
    (eth / "operstate").write_text("up\n")
    assert detect_network(tmp_path) == "wired"


def test_flags_override_detection():
    profile = detect(power="battery", battery_pct=15, network="metered")
    assert (profile.power, profile.battery_pct, profile.network) == ("battery", 15, "metered")
    assert profile.cpu_count >= 1


def test_arch_uses_oci_names_and_class_follows_the_battery():
    from cloudless.node.device import oci_arch

    assert (oci_arch("x86_64"), oci_arch("aarch64"), oci_arch("riscv64")) == ("amd64", "arm64", "riscv64")
    assert detect(device_class="phone").device_class == "phone"
    assert detect().device_class in ("server", "laptop")


def test_node_infos_read_arch_class_and_drop_the_reserved_labels():
    from types import SimpleNamespace

    from cloudless.gossip.metadata import ARCH_LABEL, CLASS_LABEL, Metadata
    from cloudless.node.controller import node_infos
    from cloudless.state.fsm import NodeRecord

    meta = Metadata(
        labels={ARCH_LABEL: "arm64", CLASS_LABEL: "phone", "gpu": "no"}, power="battery", battery_percent=40
    )
    member = SimpleNamespace(state=0, meta=meta, state_change=0.0)
    cluster = SimpleNamespace(node_id="me", member=lambda name: member)
    replicated = SimpleNamespace(fsm=SimpleNamespace(nodes={"p1": NodeRecord("p1", "127.0.0.1:1", "", "z", {}, 1, {})}))
    (info,) = node_infos(cluster, replicated, uptime_and_flaps=lambda name: (0.0, 0))  # type: ignore[arg-type]
    assert (info.arch, info.device_class, info.labels) == ("arm64", "phone", {"gpu": "no"})
    assert (info.power, info.battery_percent, info.zone) == ("battery", 40, "z")


def test_runtime_is_runc_only_with_root_runc_and_cgroups(tmp_path):
    from cloudless.node.device import detect_runtime

    cgroups = tmp_path / "cgroup"
    cgroups.mkdir()
    (cgroups / "cgroup.controllers").write_text("cpu memory pids\n")
    assert detect_runtime(euid=0, runc="/usr/sbin/runc", cgroup_root=cgroups)[0] == "runc"
    runtime, why = detect_runtime(euid=1000, runc="", cgroup_root=cgroups)
    assert runtime == "none" and "not root" in why and "no runc" in why
    runtime, why = detect_runtime(euid=0, runc="", cgroup_root=cgroups)
    assert runtime == "none" and "no runc" in why
    runtime, why = detect_runtime(euid=0, runc="/usr/sbin/runc", cgroup_root=tmp_path / "missing")
    assert runtime == "none" and "cgroup" in why


def test_forced_runtime_none_wins_and_forced_runc_must_work(tmp_path):
    from cloudless.errors import InvalidInput
    from cloudless.node.device import detect_runtime

    cgroups = tmp_path / "cgroup"
    (cgroups / "memory").mkdir(parents=True)  # cgroup v1 layout
    assert detect_runtime("none", euid=0, runc="/usr/sbin/runc", cgroup_root=cgroups)[0] == "none"
    assert detect_runtime("auto", euid=0, runc="/usr/sbin/runc", cgroup_root=cgroups)[0] == "runc"
    assert detect_runtime("memory", euid=1000, runc="", cgroup_root=cgroups)[0] == "memory"
    with pytest.raises(InvalidInput, match="not root"):
        detect_runtime("runc", euid=1000, runc="/usr/sbin/runc", cgroup_root=cgroups)
    with pytest.raises(InvalidInput, match="not root"):
        detect_runtime("rootless", euid=0, runc="/usr/sbin/runc", cgroup_root=cgroups)
    with pytest.raises(InvalidInput, match="unknown runtime"):
        detect_runtime("docker", euid=0, runc="/usr/sbin/runc", cgroup_root=cgroups)


def test_rootless_when_not_root_with_runc_a_working_user_namespace_and_an_own_data_dir(tmp_path):
    from cloudless.errors import InvalidInput
    from cloudless.node.device import detect_runtime

    me = os.geteuid()
    works = lambda: (True, "")  # noqa: E731
    broken = lambda: (False, "unprivileged user namespaces do not work: EPERM")  # noqa: E731
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, me, -1)
    # A data dir not created yet is the node's own; no cgroup hierarchy is needed.
    runtime, why = detect_runtime(
        euid=4242, runc="/usr/sbin/runc", cgroup_root=tmp_path / "no", data_dir=tmp_path / "later", userns=works
    )
    assert runtime == "rootless"
    # The data dir belongs to someone else: refused, and says whose.
    runtime, why = detect_runtime(euid=4242, runc="/usr/sbin/runc", data_dir=data, userns=works)
    assert runtime == "none" and f"owned by uid {me}, not 4242" in why
    os.chown(data, 4242, -1)
    runtime, why = detect_runtime(euid=4242, runc="/usr/sbin/runc", data_dir=data, userns=works)
    assert runtime == "rootless" and "uid 4242" in why
    runtime, why = detect_runtime(euid=4242, runc="/usr/sbin/runc", data_dir=data, userns=broken)
    assert runtime == "none" and "EPERM" in why
    with pytest.raises(InvalidInput, match=r"rootless cannot work here: .*EPERM"):
        detect_runtime("rootless", euid=4242, runc="/usr/sbin/runc", data_dir=data, userns=broken)
    assert detect_runtime("rootless", euid=4242, runc="/usr/sbin/runc", data_dir=data, userns=works)[0] == "rootless"


def test_the_user_namespace_check_really_creates_one():
    from cloudless.sandbox.rootless import userns_works

    # This kernel allows unprivileged user namespaces (and root may always create one).
    assert userns_works() == (True, "")
    works, why = userns_works("/bin/false")
    assert not works and "do not work" in why


def test_node_infos_read_the_runtime_label():
    from types import SimpleNamespace

    from cloudless.gossip.metadata import RUNTIME_LABEL, Metadata
    from cloudless.node.controller import node_infos
    from cloudless.state.fsm import NodeRecord

    metas = {"a": Metadata(labels={RUNTIME_LABEL: "none"}), "b": Metadata(labels={RUNTIME_LABEL: "warp-drive"})}
    cluster = SimpleNamespace(
        node_id="me",
        member=lambda name: SimpleNamespace(state=0, meta=metas.get(name, Metadata()), state_change=0.0),
    )
    replicated = SimpleNamespace(
        fsm=SimpleNamespace(nodes={n: NodeRecord(n, "127.0.0.1:1", "", "", {}, 1, {}) for n in ("a", "b", "c")})
    )
    infos = {i.node_id: i for i in node_infos(cluster, replicated, uptime_and_flaps=lambda name: (0.0, 0))}  # type: ignore[arg-type]
    assert (infos["a"].runtime, infos["b"].runtime, infos["c"].runtime) == ("none", "", "")
    assert infos["a"].labels == {}


def test_unprivileged_user_namespaces_need_the_switch_and_a_limit(tmp_path):
    from cloudless.node.device import unprivileged_userns

    (tmp_path / "user").mkdir()
    (tmp_path / "kernel").mkdir()
    assert not unprivileged_userns(tmp_path)  # nothing readable: not claimed
    (tmp_path / "user" / "max_user_namespaces").write_text("0\n")
    assert not unprivileged_userns(tmp_path)
    (tmp_path / "user" / "max_user_namespaces").write_text("63000\n")
    assert unprivileged_userns(tmp_path)
    (tmp_path / "kernel" / "unprivileged_userns_clone").write_text("0\n")
    assert not unprivileged_userns(tmp_path)
