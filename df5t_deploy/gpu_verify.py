"""Verify everything that needs a GPU, in one command, on a bare (offline) GPU machine.

    python -m df5t_deploy.gpu_verify --report DIR [--part tests|bench|all] [--no-install]

run from the repository root (``make gpu-verify REPORT=DIR`` wraps it):
1. install: the package with ``pip --no-deps --no-build-isolation -e .``, and whatever pure
   dependency is missing from the git-ignored ``wheelhouse/`` (``make gpu-wheelhouse``),
   ``--no-index``: the machine is offline;
2. part ``tests``: ``pytest -m gpu`` (collection first: an error there is a failure), then
   the kernel tests under compute-sanitizer's memcheck and initcheck (with PyTorch's caching
   allocator off, so the sanitizer sees every allocation); a sanitizer the machine refuses
   is reported "not run" with its reason;
3. part ``bench``: ``benchmarks/gpu_throughput.py`` at one tile size, its rows written to
   ``DIR/gpu_bench.json`` as they finish; a missed target is reported, not a failure.
It writes ``DIR/report.md`` (first line ``status: pass``, ``fail`` or ``no-gpu``; then the
GPU, driver, CUDA and package versions, each test's outcome and the benchmark table) as it
goes, ``DIR/junit.xml``, and the logs. Exit status: 0 pass, 1 fail, 3 no CUDA GPU (found
after the install and the test collection succeeded).

Only the standard library is imported here: this must run before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

EXIT_PASS, EXIT_FAIL, EXIT_NO_GPU = 0, 1, 3
PARTS = ("tests", "bench")
WHEELHOUSE = "wheelhouse"
#: Import name -> distribution of the runtime dependencies a bare GPU machine may lack.
RUNTIME_MODULES = {"numpy": "numpy", "scipy": "scipy", "onnxruntime": "onnxruntime", "tifffile": "tifffile",
                   "click": "click", "tqdm": "tqdm", "PIL": "pillow", "mrcfile": "mrcfile", "zarr": "zarr",
                   "skimage": "scikit-image", "pywt": "PyWavelets", "pytest": "pytest", "onnx": "onnx",
                   "onnxscript": "onnxscript", "watchdog": "watchdog"}
#: The kernels' GPU tests, which the sanitizers watch.
SANITIZED_TESTS = "tests/test_cuda_kernels.py"
SANITIZER_TOOLS = ("memcheck", "initcheck")
#: pytest's options for every GPU run: a line per test (the log streams line by line, so a run
#: cut short still shows how far it got) and, for a test that runs this long, every thread's
#: stack in the log (what a hang waits on).
PYTEST_OPTIONS = ("-v", "-o", "faulthandler_timeout=120")
BENCH_TILE = 256
#: Phrases with which compute-sanitizer says it cannot run here at all (containers without
#: the debugger interface, for one), as opposed to finding errors.
SANITIZER_REFUSALS = ("Unable to attach", "not supported", "Could not", "permission", "Permission", "ERR_NVGPUCTRPERM",
                      "Debugger", "debugger")


@dataclass
class Report:
    """``report.md`` in the report folder, rewritten after every stage so that a command cut
    short still leaves what it found."""

    folder: Path
    status: str = "running"
    machine: dict = field(default_factory=dict)
    stages: list[tuple[str, str]] = field(default_factory=list)  # (stage, outcome)
    tests: list[tuple[str, str, str]] = field(default_factory=list)  # (test, outcome, message)
    bench_table: str = ""

    def stage(self, name: str, outcome: str) -> None:
        self.stages.append((name, outcome))
        print(f"[gpu-verify] {name}: {outcome}", flush=True)
        self.write()

    def write(self) -> None:
        lines = [f"status: {self.status}", "", "# GPU verification", ""]
        lines += [f"- {key}: {value}" for key, value in self.machine.items()]
        lines += ["", "## Stages", ""] + [f"- {name}: {outcome}" for name, outcome in self.stages]
        if self.tests:
            lines += ["", "## Tests", "", "| test | outcome | message |", "|---|---|---|"]
            lines += [f"| {name} | {outcome} | {message.replace('|', '/')[:200]} |" for name, outcome, message in self.tests]
        if self.bench_table:
            lines += ["", "## Benchmark", "", "```", self.bench_table, "```"]
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / "report.md.partial"
        partial.write_text("\n".join(lines) + "\n")
        partial.replace(self.folder / "report.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, type=Path, help="folder for report.md, junit.xml, logs")
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--no-install", action="store_true", help="the package is installed already")
    args = parser.parse_args(argv)
    repo = Path.cwd()
    if not (repo / "pyproject.toml").is_file() or not (repo / "df5t_deploy").is_dir():
        print("run this from the repository root (where pyproject.toml is)", file=sys.stderr)
        return EXIT_FAIL
    os.environ["PYTHONUNBUFFERED"] = "1"
    report = Report(args.report.resolve())
    report.write()
    parts = PARTS if args.part == "all" else (args.part,)
    status = verify(repo, report, parts, install=not args.no_install)
    report.status = {EXIT_PASS: "pass", EXIT_FAIL: "fail", EXIT_NO_GPU: "no-gpu"}[status]
    report.write()
    print(f"[gpu-verify] status: {report.status} ({report.folder / 'report.md'})", flush=True)
    return status


def verify(repo: Path, report: Report, parts: tuple[str, ...], install: bool) -> int:
    if install and not install_package(repo, report):
        return EXIT_FAIL
    report.machine = machine_facts()
    report.write()
    if "tests" in parts and not collect_tests(repo, report):
        return EXIT_FAIL
    if not report.machine.get("cuda_gpu"):
        report.stage("GPU", "no CUDA GPU visible to PyTorch: nothing that needs one was run")
        return EXIT_NO_GPU
    failed = False
    if "tests" in parts:
        failed |= not run_tests(repo, report)
        for tool in SANITIZER_TOOLS:
            failed |= not run_sanitizer(repo, report, tool)
    if "bench" in parts:
        failed |= not run_bench(repo, report)
    return EXIT_FAIL if failed else EXIT_PASS


# --------------------------------------------------------------------------- install


def install_package(repo: Path, report: Report) -> bool:
    wheelhouse = repo / WHEELHOUSE
    missing = [dist for module, dist in RUNTIME_MODULES.items() if importlib.util.find_spec(module) is None]
    if not _setuptools_ok():
        missing.append("setuptools>=77")
    if missing:
        if not wheelhouse.is_dir():
            report.stage("install", f"missing {', '.join(missing)} and no {WHEELHOUSE}/ (make gpu-wheelhouse)")
            return False
        result = _pip(["install", "--no-index", "--find-links", str(wheelhouse), *missing], repo, report, "wheelhouse")
        if result != 0:
            return False
    if _pip(["install", "--no-deps", "--no-build-isolation", "-e", "."], repo, report, "package") != 0:
        return False
    report.stage("install", "package installed" + (f"; from {WHEELHOUSE}/: {', '.join(missing)}" if missing else ""))
    return True


def _setuptools_ok() -> bool:
    try:
        from importlib.metadata import version

        return int(version("setuptools").split(".")[0]) >= 77
    except Exception:  # not installed, or a version string we cannot read
        return False


def _pip(arguments: list[str], repo: Path, report: Report, what: str) -> int:
    log = report.folder / f"install-{what}.log"
    code = stream([sys.executable, "-m", "pip", *arguments, "--disable-pip-version-check"], repo, log)
    if code != 0:
        report.stage("install", f"pip {' '.join(arguments)} failed (exit {code}); see {log.name}")
    return code


# --------------------------------------------------------------------------- facts


def machine_facts() -> dict:
    """GPU, driver, CUDA and package versions, probed in a child process (this process
    keeps no CUDA context that a sanitizer run would compete with)."""
    probe = (
        "import json, platform, sys\n"
        "facts = {'python': sys.version.split()[0], 'platform': platform.platform()}\n"
        "try:\n"
        "    import torch\n"
        "    facts.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda_gpu=torch.cuda.is_available())\n"
        "    if facts['cuda_gpu']:\n"
        "        p = torch.cuda.get_device_properties(0)\n"
        "        facts.update(gpu=p.name, compute_capability=f'{p.major}.{p.minor}', gpu_memory_gb=round(p.total_memory / 2**30, 1),\n"
        "                     gpu_count=torch.cuda.device_count())\n"
        "except ImportError as err:\n"
        "    facts.update(torch=f'not installed ({err})', cuda_gpu=False)\n"
        "from importlib.metadata import version, PackageNotFoundError\n"
        "for name in ('df5t-deploy', 'numpy', 'cuda-bindings', 'cuda-python', 'cupy-cuda12x', 'cupy-cuda13x',\n"
        "             'onnxruntime', 'onnxruntime-gpu', 'tensorrt', 'triton', 'tifffile'):\n"
        "    try:\n"
        "        facts[name] = version(name)\n"
        "    except PackageNotFoundError:\n"
        "        pass\n"
        "print(json.dumps(facts))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    facts = json.loads(result.stdout) if result.returncode == 0 else {"probe": result.stderr.strip()[-500:],
                                                                       "cuda_gpu": False}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                               capture_output=True, text=True)
        facts["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    return facts


# --------------------------------------------------------------------------- tests


def collect_tests(repo: Path, report: Report) -> bool:
    log = report.folder / "collect.log"
    code = stream([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q"], repo, log)
    ok = code == 0
    report.stage("test collection", "ok" if ok else f"failed (exit {code}); see {log.name}")
    return ok


def run_tests(repo: Path, report: Report) -> bool:
    junit = report.folder / "junit.xml"
    log = report.folder / "tests.log"
    code = stream([sys.executable, "-m", "pytest", "-m", "gpu", "-rA", *PYTEST_OPTIONS, f"--junitxml={junit}"], repo, log)
    report.tests = junit_outcomes(junit) if junit.is_file() else []
    counts = {outcome: sum(1 for _, o, _ in report.tests if o == outcome) for outcome in ("passed", "failed", "error", "skipped")}
    report.stage("pytest -m gpu", f"exit {code}; " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    return code == 0


def junit_outcomes(path: Path) -> list[tuple[str, str, str]]:
    """(test id, outcome, message) for every test case in a JUnit XML file."""
    outcomes = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome, message = tag if tag != "failure" else "failed", element.get("message", "")
                break
        outcomes.append((name, outcome, " ".join(message.split())))
    return outcomes


def run_sanitizer(repo: Path, report: Report, tool: str) -> bool:
    """The kernel tests under compute-sanitizer; True unless it ran and found errors."""
    sanitizer = shutil.which("compute-sanitizer") or next(
        (str(p) for p in Path("/usr/local/cuda/bin").glob("compute-sanitizer") if p.is_file()), None)
    if sanitizer is None:
        report.stage(f"compute-sanitizer {tool}", "not run: compute-sanitizer is not installed")
        return True
    log = report.folder / f"sanitizer-{tool}.log"
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    code = stream([sanitizer, "--tool", tool, "--error-exitcode", "99", sys.executable, "-m", "pytest", "-m", "gpu",
                   *PYTEST_OPTIONS, "-k", "gpu", SANITIZED_TESTS], repo, log, env=env)
    text = log.read_text(errors="replace")
    if code == 0:
        report.stage(f"compute-sanitizer {tool}", "no errors")
        return True
    if code != 99 and any(phrase in text for phrase in SANITIZER_REFUSALS):
        reason = next(line.strip() for line in text.splitlines() if any(p in line for p in SANITIZER_REFUSALS))
        report.stage(f"compute-sanitizer {tool}", f"not run: the machine refused it ({reason[:200]})")
        return True
    report.stage(f"compute-sanitizer {tool}", f"failed (exit {code}); see {log.name}")
    return False


# --------------------------------------------------------------------------- benchmark


def run_bench(repo: Path, report: Report) -> bool:
    results = report.folder / "gpu_bench.json"
    log = report.folder / "bench.log"
    code = stream([sys.executable, "benchmarks/gpu_throughput.py", "--tile", str(BENCH_TILE), "--json", str(results)],
                  repo, log)
    report.bench_table = "\n".join(line for line in log.read_text(errors="replace").splitlines()
                                   if line.startswith(("df5t-512", "ours vs")) or " px tile " in line)
    report.stage("benchmark", f"exit {code}; rows in {results.name}" if code == 0 else f"failed (exit {code}); see {log.name}")
    return code == 0


# --------------------------------------------------------------------------- processes


def stream(command: list[str], cwd: Path, log: Path, env: dict | None = None) -> int:
    """Run ``command``, its output streamed to this process's stdout and to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(command, cwd=cwd, env=env or os.environ.copy(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sink.write(line)
            sink.flush()
        code = process.wait()
        sink.write(f"# exit {code} after {time.monotonic() - started:.0f} s\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
