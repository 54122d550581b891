"""The kernels' CPU emulation is strict where a GPU is: these show it rejects what a GPU would."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kernel_emulation import (
    ASAN,
    CaptureError,
    EmulatedDevice,
    EmulatedKernels,
    build_library,
)

U32, U64 = ctypes.c_uint32, ctypes.c_uint64
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("emulation"))


@pytest.mark.parametrize("args, problem", [
    (lambda s, o: (s, o, U32(2), U32(63)), "argument 3: c_uint given, c_ulong expected"),  # 32 bits for 64
    (lambda s, o: (s, o, U32(2)), "takes 4 arguments, 3 given"),
    (lambda s, o: (s, U64(0), U32(2), U64(63)), "argument 1: c_ulong given, c_void_p expected"),  # a value for a pointer
])
def test_a_wrongly_packed_launch_fails_as_it_would_on_a_gpu(library, args, problem):
    state, out = np.zeros((2, 3, 7, 9), np.float32), np.zeros((2, 7, 9), np.float32)
    with pytest.raises(AssertionError, match=problem):
        EmulatedKernels(library)("df5t_state_to_grey", *args(state, out))


def test_the_grid_has_several_blocks_and_threads_in_a_shuffled_order(library):
    state = np.random.default_rng(0).uniform(-1, 1, (2, 3, 7, 9)).astype(np.float32)
    out = np.full((2, 7, 9), np.nan, np.float32)
    calls = []
    kernels = EmulatedKernels(library)
    real = library.df5t_emu_set_thread
    library.df5t_emu_set_thread = lambda first, stride: (calls.append((first.value, stride.value)), real(first, stride))
    try:
        kernels("df5t_state_to_grey", state, out, U32(2), U64(63))
    finally:
        library.df5t_emu_set_thread = real
    firsts = [first for first, _ in calls]
    assert sorted(firsts) == list(range(len(calls))) and len(calls) > 4 and firsts != sorted(firsts)
    assert not np.isnan(out).any()  # every element written by some thread


def test_a_capture_replays_its_arguments_frozen_and_refuses_host_work(library):
    device = EmulatedDevice(library)
    t, table, cursor = device.empty((5,), np.float32), np.arange(10, dtype=np.float32), np.array([3], np.uint32)
    count = {"tiles": 2}

    def step():  # reads a host value while capturing: a replay repeats what was captured
        device.launch("df5t_fill_timesteps", device.pointer(t), device.pointer(table), device.pointer(cursor),
                      U32(count["tiles"]))

    replay = device.capture(step)
    assert np.isnan(t).all(), "capturing does not run the step"
    count["tiles"] = 5
    replay()
    assert t[:2].tolist() == [3.0, 3.0] and np.isnan(t[2:]).all()  # the 2 tiles of capture time
    for forbidden in (lambda: device.empty((2,), np.float32), lambda: device.upload(np.zeros(2)),
                      lambda: device.download_async(t)):
        with pytest.raises(CaptureError):
            device.capture(forbidden)


def _asan_runtime() -> str:
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the kernels' CPU emulation needs it")
    runtime = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(runtime):
        pytest.skip("g++ has no AddressSanitizer runtime here (libasan)")
    return runtime


def _under_asan(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, ASAN: "1", "LD_PRELOAD": _asan_runtime(), "ASAN_OPTIONS": "detect_leaks=0"}
    return subprocess.run([sys.executable, *command], cwd=TESTS.parent, env=env, capture_output=True, text=True)


def test_the_emulated_kernel_and_loop_tests_pass_under_address_sanitizer():
    result = _under_asan("-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "emulated",
                         str(TESTS / "test_cuda_kernels.py"), str(TESTS / "test_device_loop.py"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_address_sanitizer_sees_an_out_of_bounds_write(tmp_path):
    """The instrumented build is live: a launch with an output buffer one element short aborts."""
    script = (
        "import sys, ctypes, numpy as np\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from pathlib import Path\n"
        "from kernel_emulation import EmulatedKernels, build_library\n"
        f"kernels = EmulatedKernels(build_library(Path({str(tmp_path)!r})))\n"
        "state, out = np.zeros((1, 3, 4, 4), np.float32), np.zeros(15, np.float32)\n"
        "kernels('df5t_state_to_grey', state, out, ctypes.c_uint32(1), ctypes.c_uint64(16))\n"
    )
    result = _under_asan("-c", script)
    assert result.returncode != 0 and "heap-buffer-overflow" in result.stderr, result.stderr[-2000:]
