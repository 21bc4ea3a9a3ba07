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

    from cloudless.gossip.metadata import Metadata
    from cloudless.node.controller import node_infos
    from cloudless.node.device import ARCH_LABEL, CLASS_LABEL
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
