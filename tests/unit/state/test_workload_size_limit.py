import pytest

from cloudless.errors import InvalidInput
from cloudless.state.workload import MAX_SPEC_BYTES, WorkloadSpec, validate


def test_a_spec_within_every_field_bound_but_megabytes_large_is_refused_naming_the_field() -> None:
    # 256 env values of 32 KiB: each within its own bound, 8 MiB together (the wedge).
    env = {f"K{i}": "x" * 32 * 1024 for i in range(256)}
    spec = WorkloadSpec(name="big", image="busybox", env=env)
    with pytest.raises(InvalidInput) as info:
        validate(spec)
    assert info.value.context.get("field") == "env"
    assert "limit" in info.value.message and f"{MAX_SPEC_BYTES:,}" in info.value.message


def test_a_spec_just_under_the_limit_is_accepted() -> None:
    env = {f"K{i}": "x" * 30_000 for i in range(2)}  # 60 KB in all
    assert MAX_SPEC_BYTES - 8 * 1024 < 60_000 < MAX_SPEC_BYTES
    assert validate(WorkloadSpec(name="ok", image="busybox", env=env)).env == env
