"""OCI documents decode with validation (image-spec manifest.md, image-index.md, config.md)."""

import json

import pytest

from cloudless.sandbox import oci
from cloudless.sandbox.oci import InvalidImage

D1 = "sha256:" + "11" * 32
D2 = "sha256:" + "22" * 32


def manifest(**over):
    doc = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": D1, "size": 10},
        "layers": [{"mediaType": oci.OCI_LAYER_GZIP, "digest": D2, "size": 20}],
    }
    doc.update(over)
    return json.dumps(doc).encode()


def test_manifest_decodes_descriptors():
    m = oci.decode_manifest(manifest())
    assert m.config.digest == D1 and m.layers[0].size == 20


@pytest.mark.parametrize(
    "over, fragment",
    [
        ({"schemaVersion": 1}, "schemaVersion"),
        ({"config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:xyz", "size": 1}}, "malformed digest"),
        ({"layers": [{"mediaType": "text/plain", "digest": D2, "size": 1}]}, "unsupported layer media type"),
        ({"layers": [{"mediaType": oci.OCI_LAYER, "digest": D2, "size": -1}]}, "negative size"),
        ({"layers": "nope"}, "invalid image manifest"),
    ],
)
def test_invalid_manifests_are_refused_with_a_reason(over, fragment):
    with pytest.raises(InvalidImage) as err:
        oci.decode_manifest(manifest(**over))
    assert fragment in err.value.message


def test_oversized_and_non_json_documents_are_refused():
    with pytest.raises(InvalidImage, match="limit"):
        oci.decode_manifest(b" " * (oci.MAX_DOCUMENT_BYTES + 1))
    with pytest.raises(InvalidImage, match="not valid JSON"):
        oci.decode_manifest(b"{")


def test_document_kind_from_media_type_or_shape():
    assert oci.document_kind(manifest()) == "manifest"
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert oci.document_kind(index) == "index"
    assert oci.document_kind(index, oci.DOCKER_MANIFEST_LIST) == "index"
    with pytest.raises(InvalidImage, match="schema 1"):
        oci.document_kind(b"{}", "application/vnd.docker.distribution.manifest.v1+prettyjws")


def _index(*platforms):
    return oci.decode_index(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + f"{i:02x}" * 32, "size": 1, "platform": p}
                    for i, p in enumerate(platforms)
                ],
            }
        ).encode()
    )


def test_platform_selection_picks_host_os_arch_and_variant():
    idx = _index(
        {"os": "linux", "architecture": "arm", "variant": "v6"},
        {"os": "linux", "architecture": "arm", "variant": "v7"},
        {"os": "linux", "architecture": "amd64"},
        {"os": "windows", "architecture": "amd64"},
    )
    assert oci.select_platform(idx, oci.host_platform("x86_64")).digest == "sha256:" + "02" * 32
    assert oci.select_platform(idx, oci.host_platform("armv7l")).digest == "sha256:" + "01" * 32
    # arm64 manifests often omit the v8 variant.
    arm64 = _index({"os": "linux", "architecture": "arm64"})
    assert oci.select_platform(arm64, oci.host_platform("aarch64")).digest == "sha256:" + "00" * 32


def test_platform_selection_names_what_is_available_when_nothing_fits():
    idx = _index({"os": "linux", "architecture": "s390x"})
    with pytest.raises(InvalidImage) as err:
        oci.select_platform(idx, oci.host_platform("x86_64"))
    assert err.value.context["available"] == "linux/s390x"


def test_image_config_maps_docker_keys():
    doc = oci.decode_config(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Entrypoint": ["/bin/app"],
                    "Cmd": ["--serve"],
                    "Env": ["A=1"],
                    "WorkingDir": "/srv",
                    "User": "1000:1000",
                    "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
                    "Labels": {"k": "v"},
                    "StopSignal": "SIGINT",
                    "Volumes": {"/data": {}},
                },
                "rootfs": {"type": "layers", "diff_ids": [D1]},
            }
        ).encode()
    )
    cfg = oci.ImageConfig.from_doc(doc)
    assert cfg.entrypoint == ["/bin/app"] and cfg.cmd == ["--serve"] and cfg.env == ["A=1"]
    assert (cfg.working_dir, cfg.user, cfg.stop_signal) == ("/srv", "1000:1000", "SIGINT")
    assert cfg.exposed_ports == ["53/udp", "8080/tcp"] and cfg.labels == {"k": "v"} and cfg.volumes == ["/data"]


def test_config_with_bad_diff_id_or_rootfs_type_is_refused():
    bad = {"rootfs": {"type": "layers", "diff_ids": ["sha256:short"]}}
    with pytest.raises(InvalidImage, match="digest"):
        oci.decode_config(json.dumps(bad).encode())
    with pytest.raises(InvalidImage, match="rootfs type"):
        oci.decode_config(json.dumps({"rootfs": {"type": "x", "diff_ids": []}}).encode())
