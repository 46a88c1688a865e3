"""bench/cpu_bf16.py at the micro sizes, so the table's command cannot rot: every workload runs in fp32 and
under CPU bf16 autocast (emulated where the CPU has no native bf16; the bench measures, it does not choose)."""

from bench import cpu_bf16
from conftest import micro_params


def test_every_workload_runs_in_both_precisions(tmp_path, capsys):
    cpu_bf16.main(["--rounds", "1", "--steps", "1"], params=micro_params(tmp_path))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "workload" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(cpu_bf16.workloads(micro_params(tmp_path)))
    assert all(float(row.rstrip(" |").split(" | ")[-1]) > 0 for row in rows)
