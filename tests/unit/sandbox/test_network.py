"""Bridge networking pieces that need no root: address pool, names, rules, persistence."""

import ipaddress

import pytest

from cloudless.sandbox.network import _COMMENT, AddressPool, Attachment, BridgeConfig, BridgeNetwork
from cloudless.sandbox.runtime import NetworkSetupFailed, PortMapping


def test_pool_skips_network_gateway_and_broadcast_and_reuses_released():
    pool = AddressPool("10.88.7.0/29", taken=set())  # hosts .1-.6, gateway .1
    got = [pool.allocate() for _ in range(5)]
    assert got == [f"10.88.7.{i}" for i in range(2, 7)]
    with pytest.raises(NetworkSetupFailed):
        pool.allocate()
    pool.release("10.88.7.4")
    assert pool.allocate() == "10.88.7.4"


def test_pool_respects_addresses_taken_before_restart():
    pool = AddressPool("10.88.0.0/24", taken={"10.88.0.2", "10.88.0.3"})
    assert pool.allocate() == "10.88.0.4"
    assert pool.gateway == "10.88.0.1"


def test_names_fit_kernel_limits_and_are_stable(tmp_path):
    net = BridgeNetwork(tmp_path, BridgeConfig(tag="cl", veth_prefix="clv"))
    long_id = "a" * 63
    veth = net.veth_name(long_id)
    assert len(veth) <= 15 and veth.startswith("clv")
    assert veth == BridgeNetwork(tmp_path, BridgeConfig(tag="cl", veth_prefix="clv")).veth_name(long_id)
    assert net.veth_name("x") != net.veth_name("y")
    assert net.netns_name("web") == "cl-web"


def test_port_rules_dnat_from_outside_and_from_this_host_with_hairpin(tmp_path):
    net = BridgeNetwork(tmp_path, BridgeConfig(tag="cl"))
    a = Attachment(
        "web", "cl-web", "10.88.0.5", "10.88.0.1", 24, "clvabc", [PortMapping(8080, 80), PortMapping(5353, 53, "udp")]
    )
    nat = net._port_rules(a)["nat"]
    assert len(nat) == 6
    assert any(
        r.startswith("-A PREROUTING -p tcp") and "--dport 8080" in r and "--to-destination 10.88.0.5:80" in r
        for r in nat
    )
    assert any(r.startswith("-A OUTPUT -p tcp") and "--dst-type LOCAL" in r and "--dport 8080" in r for r in nat)
    assert any(
        r.startswith("-A POSTROUTING -s 10.88.0.5/32 -d 10.88.0.5/32 -p udp") and r.endswith("-j MASQUERADE")
        for r in nat
    )
    assert all('--comment "cl:web"' in r for r in nat)
    assert net._port_rules(Attachment("x", "n", "10.88.0.6", "10.88.0.1", 24, "v")) == {}


def test_bridge_rules_masquerade_egress_and_loopback_hairpin(tmp_path):
    net = BridgeNetwork(tmp_path, BridgeConfig(bridge="cl0", subnet="10.88.0.0/24", tag="cl"))
    rules = net._bridge_rules()
    assert '-A POSTROUTING -s 10.88.0.0/24 ! -o cl0 -m comment --comment "cl" -j MASQUERADE' in rules["nat"]
    assert any("-s 127.0.0.0/8 -o cl0" in r for r in rules["nat"])
    assert {r.split()[2] + r.split()[3] for r in rules["filter"]} == {"-icl0", "-ocl0"}


@pytest.mark.parametrize(
    "line,tag",
    [
        ('-A OUTPUT -p tcp -m comment --comment "cl:web" -j DNAT --to-destination 10.88.0.5:80', "cl:web"),
        ("-A OUTPUT -p tcp -m comment --comment cl:web -j DNAT", "cl:web"),
        ('-A POSTROUTING -s 10.88.0.0/24 ! -o cl0 -m comment --comment "cl" -j MASQUERADE', "cl"),
    ],
)
def test_comment_tags_are_found_in_iptables_save_output(line, tag):
    assert _COMMENT.search(line).group(1) == tag


def test_attachments_persist_across_instances(tmp_path):
    net = BridgeNetwork(tmp_path, BridgeConfig())
    a = Attachment("web", "cloudless-web", "10.88.0.2", "10.88.0.1", 24, "clv1", [PortMapping(80, 80)])
    net._attachments["web"] = a
    net._persist()
    again = BridgeNetwork(tmp_path, BridgeConfig())
    assert again.attachment("web") == a
    assert again._pool.allocate() == "10.88.0.3"
    assert a.netns_path == "/run/netns/cloudless-web"
    assert ipaddress.ip_address(a.ip) in ipaddress.ip_network("10.88.0.0/24")


def test_default_config_differs_per_node_state_dir_and_fits_kernel_names(tmp_path):
    a = BridgeConfig.for_node(tmp_path / "node-a")
    b = BridgeConfig.for_node(tmp_path / "node-b")
    assert a.tag != b.tag and a.bridge != b.bridge
    assert a == BridgeConfig.for_node(tmp_path / "node-a")  # stable across restarts
    for c in (a, b):
        assert len(c.bridge) <= 15
        assert ipaddress.ip_network(c.subnet).subnet_of(ipaddress.ip_network("10.88.0.0/16"))
        assert ipaddress.ip_network(c.subnet).prefixlen == 24
        net = BridgeNetwork(tmp_path / "x", c)
        assert len(net.veth_name("a" * 63)) <= 15
