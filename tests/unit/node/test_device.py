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
