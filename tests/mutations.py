"""Deliberate bugs the test suite must catch: ``python tests/mutations.py`` (``make mutants``).

Each mutation is a plausible wrong implementation, applied by monkeypatching when the test
session starts (``conftest.py`` reads ``DF5T_MUTATION``); the suite, run with it, must fail.
The runner runs the promise tests once per mutation and prints which test caught it, or
that none did (exit status 1 then).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = "DF5T_MUTATION"
#: The tests that back the README's promises (the rest check kernels, export and engines).
PROMISE_TESTS = ("tests/test_promises.py", "tests/test_hostile.py", "tests/test_sampler.py", "tests/test_restore.py",
                 "tests/test_volumes.py", "tests/test_formats.py", "tests/test_tiling.py", "tests/test_noise_model.py",
                 "tests/test_submit.py", "tests/test_final_step.py", "tests/test_walk.py")


def _uncertainty_doubled(mp: pytest.MonkeyPatch) -> None:
    from df5t_deploy import api, pipeline

    real = api.mean_and_std

    def doubled(unit, intensity):
        mean, std = real(unit, intensity)
        return mean, None if std is None else 2 * std

    mp.setattr(api, "mean_and_std", doubled)
    mp.setattr(pipeline, "mean_and_std", doubled)


def _model_sha256_zeroed(mp: pytest.MonkeyPatch) -> None:
    from df5t_deploy import api

    real = api.Restorer.provenance
    mp.setattr(api.Restorer, "provenance", lambda self, *a: {**real(self, *a), "model_sha256": "0" * 64})


def _isotropic_yz_pass_dropped(mp: pytest.MonkeyPatch) -> None:
    from df5t_deploy import volume

    real = volume.IsotropicRun._run

    def xz_twice(self, planes, orientation, offset):
        if orientation == volume.ORIENTATION_YZ:  # the YZ slabs restored with the XZ noise instead
            orientation = volume.ORIENTATION_XZ
        return real(self, planes, orientation, offset)

    mp.setattr(volume.IsotropicRun, "_run", xz_twice)


def _measurement_ignored(mp: pytest.MonkeyPatch) -> None:
    from df5t_deploy import sampler

    mp.setattr(sampler.DDRM, "spectral_measurement", lambda self, y: np.zeros_like(self.op.ut(y)))


def _seed_high_word_dropped(mp: pytest.MonkeyPatch) -> None:
    from df5t_deploy import noise

    mp.setattr(noise, "seed_key", lambda seed: (seed & 0xFFFFFFFF, 0))


def _noise_per_batch(mp: pytest.MonkeyPatch) -> None:
    """Noise drawn per call from a generator (the batch layout then changes the result)."""
    from df5t_deploy import walks

    rng = np.random.default_rng(0)
    mp.setattr(walks, "group_noise",
               lambda key, samples, shape, step: rng.standard_normal((len(key.plane_ids) * samples, 3, *shape))
               .astype(np.float32))


def _provenance_not_written_to_mrc(mp: pytest.MonkeyPatch) -> None:
    from df5t_deploy.formats import mrc

    mp.setattr(mrc, "_provenance", lambda handle, labels: None)


def _output_checks_skipped(mp: pytest.MonkeyPatch) -> None:
    from df5t_deploy import output_safety

    mp.setattr(output_safety, "check_outputs", lambda outputs, reads: None)
    import df5t_deploy.pipeline as pipeline

    mp.setattr(pipeline, "check_outputs", lambda outputs, reads: None)


def _any_existing_output_taken_for_ours(mp: pytest.MonkeyPatch) -> None:
    """Every existing file or folder under an output's name taken for a previous output of ours."""
    from df5t_deploy import output_safety

    mp.setattr(output_safety, "is_previous_output", lambda path: True)


def _run_identity_compares_timestamps(mp: pytest.MonkeyPatch) -> None:
    """The input's modification time compared as part of the run identity (a touched input is another run)."""
    from df5t_deploy.run_identity import RunIdentity

    real = RunIdentity.differences

    def with_timestamps(self, other):
        stamp = [] if other is None or other.input_mtime_ns == self.input_mtime_ns else ["the input's modification time"]
        return real(self, other) + stamp

    mp.setattr(RunIdentity, "differences", with_timestamps)


def _eta_default_changed(mp: pytest.MonkeyPatch) -> None:
    from df5t_deploy import cli

    option = next(p for p in cli.main.commands["restore"].params if p.name == "eta")
    mp.setattr(option, "default", 0.5)


def _algebraic_anscombe_inverse(mp: pytest.MonkeyPatch) -> None:
    """The closed-form inverse of the transform in place of the exact unbiased one."""
    from df5t_deploy.poisson_gaussian import PoissonGaussian

    def algebraic(self, stabilized):
        s = self.read_noise_counts
        return self.from_counts(np.maximum((np.asarray(stabilized) / 2) ** 2 - 0.375 - s * s, 0.0))

    mp.setattr(PoissonGaussian, "exact_unbiased_inverse", algebraic)


def _stabilized_map_back_affine(mp: pytest.MonkeyPatch) -> None:
    """The stabilised domain's values taken for input values on the way back."""
    from df5t_deploy.intensity import IntensityMap, StabilizedMap

    mp.setattr(StabilizedMap, "values_from_unit", IntensityMap.values_from_unit)


def _noise_variances_overestimated(mp: pytest.MonkeyPatch) -> None:
    """The robust variance's MAD-to-std factor 30 % off: every fitted variance 1.69 times too large."""
    from df5t_deploy import poisson_gaussian

    mp.setattr(poisson_gaussian, "_MAD_TO_STD", poisson_gaussian._MAD_TO_STD * 1.3)


def _network_calls_unpadded(mp: pytest.MonkeyPatch) -> None:
    """The last call of a step runs only the tiles left (its batch shape, and rounding, vary)."""
    from df5t_deploy import tiling

    def unpadded(self, tiles, t):
        eps = self.network(tiles, np.full(len(tiles), t, dtype=np.float32))
        tiling.check_network_output(eps, t)
        return eps

    mp.setattr(tiling.BlendedDenoiser, "_call", unpadded)


def _frames_share_the_first_seed(mp: pytest.MonkeyPatch) -> None:
    """Frames walked together draw the Restorer's seed, not each its own."""
    from df5t_deploy import stack

    real = stack._start_region
    mp.setattr(stack, "_start_region", lambda *args, seeds=None: real(*args))


def _final_step_estimate_unchecked(mp: pytest.MonkeyPatch) -> None:
    """The weighted final step counts every band's error estimate, significant or not."""
    from df5t_deploy import sampler

    mp.setattr(sampler, "SIGNIFICANT_ERRORS", 0.0)


def _final_step_skipped(mp: pytest.MonkeyPatch) -> None:
    """--final-step weighted accepted and recorded, but the walk's images returned as they are."""
    from df5t_deploy import group_walker

    mp.setattr(group_walker, "weigh_in_measurement", lambda images, y, op, sigma0: images)


def _matched_start_one_late(mp: pytest.MonkeyPatch) -> None:
    """The matched walk starts at the timestep above the one where the measurement stops deciding."""
    from df5t_deploy import sampler

    real = sampler.matched_start
    mp.setattr(sampler, "matched_start", lambda *args: min(real(*args) + 1, len(args[0]) - 1))


def _initial_state_published_scale(mp: pytest.MonkeyPatch) -> None:
    """Every walk's initial value divided by sigma_t, as the published walk from t = T-1 does."""
    from df5t_deploy import sampler

    mp.setattr(sampler.Timesteps, "init_divisor", property(lambda self: self.init_sigma))


def _matched_walk_from_the_top(mp: pytest.MonkeyPatch) -> None:
    """--walk matched accepted and recorded, but the steps spread from t = T-1 as in the full walk."""
    from df5t_deploy import sampler

    mp.setattr(sampler, "walk_timesteps", lambda schedule, settings, op: sampler.Timesteps(schedule, settings.steps))


MUTATIONS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "uncertainty doubled": _uncertainty_doubled,
    "recorded model sha256 zeroed": _model_sha256_zeroed,
    "isotropic YZ pass dropped (XZ noise twice)": _isotropic_yz_pass_dropped,
    "measurement ignored by the sampler": _measurement_ignored,
    "seed's high word dropped": _seed_high_word_dropped,
    "noise drawn per network batch": _noise_per_batch,
    "MRC provenance not read back": _provenance_not_written_to_mrc,
    "output safety checks skipped": _output_checks_skipped,
    "any existing output taken for ours": _any_existing_output_taken_for_ours,
    "run identity compares timestamps": _run_identity_compares_timestamps,
    "CLI eta default changed": _eta_default_changed,
    "algebraic Anscombe inverse": _algebraic_anscombe_inverse,
    "stabilised map mapped back as affine": _stabilized_map_back_affine,
    "noise variances overestimated": _noise_variances_overestimated,
    "network calls not padded to the batch": _network_calls_unpadded,
    "frames walked together share one seed": _frames_share_the_first_seed,
    "final step's error estimate unchecked": _final_step_estimate_unchecked,
    "final step skipped": _final_step_skipped,
    "matched walk starts one timestep late": _matched_start_one_late,
    "initial state at the published scale": _initial_state_published_scale,
    "matched walk spread from the top": _matched_walk_from_the_top,
}


def apply(name: str, mp: pytest.MonkeyPatch) -> None:
    if name not in MUTATIONS:
        raise SystemExit(f"unknown mutation {name!r}; known: {', '.join(MUTATIONS)}")
    MUTATIONS[name](mp)


def main() -> int:
    """Run the promise tests (without the slow ones) once per mutation; each must fail."""
    missed = []
    for name in MUTATIONS:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow and not gpu",
                                 "-p", "no:cacheprovider", *PROMISE_TESTS], cwd=REPO, env={**os.environ, ENV: name},
                                capture_output=True, text=True)
        failed = [line.split(" ")[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
        verdict = f"caught by {failed[0]}" if result.returncode != 0 and failed else \
            ("NOT CAUGHT" if result.returncode == 0 else f"suite errored (exit {result.returncode})")
        if result.returncode == 0:
            missed.append(name)
        print(f"{name:<45} {verdict} ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"{len(MUTATIONS) - len(missed)} of {len(MUTATIONS)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
