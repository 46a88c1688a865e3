"""bench/gpu_check.py, the script a GPU owner runs, at toy sizes on the CPU (``--tiny``: gloo instead of NCCL, the
compile path traced with the eager backend), so that it cannot rot unseen."""

import json

from bench import gpu_check


def test_gpu_check_tiny_runs_every_workload_and_the_process_group(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RCG_PROGRESS", "0")
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--tiny", "--out", str(out)])
    report = json.loads(out.read_text())
    workloads = report["workloads"]
    assert list(workloads) == ["encode", "rdm_step", "mage_step", "sample"]
    for name, result in workloads.items():
        assert result["gflop_per_item"] > 0, name
        assert list(result["modes"]) == ["fp32", "fp32+compile"], name
        assert all(mode["rate"] > 0 for mode in result["modes"].values()), name
    split = workloads["sample"]["modes"]["fp32"]["seconds_per_batch"]
    assert set(split) == {"rdm", "decode", "vqgan"} and all(v > 0 for v in split.values())
    assert report["ddp"]["ok"] and report["ddp"]["backend"] == "gloo" and report["ddp"]["world"] == 1
    table = capsys.readouterr().out
    assert "| sample | fp32+compile | 4 |" in table and "torchrun 1 process, gloo: ok" in table
