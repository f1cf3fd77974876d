"""`drvbox bench` end to end, small: every number it promises is there and is a measurement.
No timing threshold here (performance is the benchmark's business, not a test's)."""

import math

import pytest

from reflector.bench import measure, report

pytestmark = [pytest.mark.needs_sandbox, pytest.mark.slow]

PROMISED = ("floor_1hop_us", "floor_2hop_us", "ioctl_kernel_us", "ioctl_user_us", "ioctl_user_p99_us",
            "memcpy_1mib_bps", "read_1mib_bps", "read_1mib_copy_bps", "read_1mib_kernel_bps", "python_start_ms", "host_start_ms", "host_restart_ms")


def test_bench_measures_every_promised_number():
    result = measure(n=200, rounds=1, restarts=1)
    for key in PROMISED:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["ioctl_user_p99_us"] >= result["ioctl_user_us"]
    assert "user-mode IOCTL / two-hop floor" in report(result)
