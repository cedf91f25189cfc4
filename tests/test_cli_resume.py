"""``captum-gig run`` interrupted at any stage resumes from the last complete artifact and ends
with the same results as an uninterrupted run (issue: reliability, long runs).

Interruptions are injected at every stage, alternately before the stage writes anything and after it
has written its artifacts but before it is marked complete (the worst moment: files exist that a
careless resume would trust), and one run is killed for real with SIGTERM.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from captum_gig import cli, pipeline
from test_cli import common, workspace  # noqa: F401  (workspace: the CLI tests' model and images)

STAGES = pipeline.STAGES


def _tensor_artifacts(out):
    """Every tensor the run left, by relative path and name (the run's results)."""
    found = {}
    for d, _, files in os.walk(out):
        for f in files:
            if f.endswith(".safetensors"):
                path = os.path.join(d, f)
                with safe_open(path, framework="pt") as sf:
                    for key in sf.keys():
                        found[(os.path.relpath(path, out), key)] = sf.get_tensor(key)
    return found


def _graphs(out):
    """The graph JSON files, which hold the GIG edge values."""
    found = {}
    for d, _, files in os.walk(out / "graphs"):
        for f in files:
            if f.endswith(".json"):
                found[f] = open(os.path.join(d, f)).read()
    return found


def _assert_same_results(a, b):
    ta, tb = _tensor_artifacts(a), _tensor_artifacts(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert _graphs(a) == _graphs(b)


@pytest.fixture(scope="module")
def reference(workspace):
    assert cli.main(["run"] + common(workspace, "reference")) == 0
    return workspace / "reference"


@pytest.mark.slow
def test_interrupted_at_every_stage_resumes_to_identical_results(workspace, reference, monkeypatch):
    out = workspace / "interrupted"
    original = dict(pipeline.STAGE_FUNCTIONS)
    for i, stage in enumerate(STAGES):
        # alternately before the stage wrote anything and after it wrote its artifacts
        def interrupted(run, _stage=stage, after_writing=i % 2 == 1):
            if after_writing:
                original[_stage](run)  # artifacts on disk, stage not yet marked complete
            raise KeyboardInterrupt

        monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, stage, interrupted)
        assert cli.main(["run"] + common(workspace, out.name)) == 130, stage
        monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, stage, original[stage])
        # the stages before this one are complete and are not recomputed on resume
        assert os.path.isfile(out / ".state" / f"{stage}.json") is False
    assert cli.main(["run"] + common(workspace, out.name)) == 0
    status = {k: v["status"] for k, v in pipeline._read_json(str(out / "manifest.json"))["this_invocation"].items()}
    # every stage but the last was completed by a later call of the loop above
    assert status == {**{s: "resumed" for s in STAGES[:-1]}, STAGES[-1]: "computed"}
    _assert_same_results(out, reference)


@pytest.mark.slow
def test_killed_by_sigterm_resumes_to_identical_results(workspace, reference):
    out = workspace / "killed"
    cmd = [sys.executable, "-m", "captum_gig", "run"] + common(workspace, out.name)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / ".state" / "extract.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the run finished before it could be interrupted; make the workload larger")
    assert proc.returncode == -signal.SIGTERM, err.decode()
    done_before = {s for s in STAGES if (out / ".state" / f"{s}.json").exists()}
    assert "extract" in done_before and done_before != set(STAGES)
    assert cli.main(["run"] + common(workspace, out.name)) == 0
    status = {k: v["status"] for k, v in pipeline._read_json(str(out / "manifest.json"))["this_invocation"].items()}
    assert {s for s, v in status.items() if v == "resumed"} == done_before
    _assert_same_results(out, reference)
