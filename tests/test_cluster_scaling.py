"""Weak scaling across the local cluster's nodes, Horovod apart from the hardware (issue 23,
item 5): the table from fixture records and a Horovod timeline (fast), the summary's
``allreduce_checks``, the figure, and one measurement on the real cluster (slow).
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import require

from chexlib.report import cluster_scaling as cs
from chexlib.report.allreduce_model import ring_allreduce_seconds


def _record(rate: float, host: str = "node1", ranks: int = 1, **changes) -> dict:
    hosts = [host] if ranks == 1 else ["node1", "node2"]
    base = dict(model="tiny", batch_size_per_rank=16, steps_per_epoch=100, ranks=ranks,
                images_per_sec_per_rank=rate, hosts_per_rank=hosts, run_id=f"r-{host}-{ranks}")  # fmt: skip
    return {**base, **changes}


def _phase(pid: int, begin: float, end: float, name: str = "ALLREDUCE", shape=None) -> list:
    close = {"ph": "E", "ts": end, "pid": pid}
    if shape is not None:
        close["args"] = {"dtype": "float32", "shape": str(shape)}
    return [{"ph": "B", "name": name, "ts": begin, "pid": pid}, close]


def _timeline() -> list[dict]:
    """Two gradient tensors fused (overlapping phases), 3 steps; a broadcast and a
    metric allreduce once, which are not a step's."""
    names = {1: "Dist/HorovodAllreduce_grads_0", 2: "Dist/HorovodAllreduce_grads_1_0",
             3: "HorovodBroadcast_w_0", 4: "HorovodAllreduce"}  # fmt: skip
    events = [{"name": "process_name", "ph": "M", "pid": p, "args": {"name": n}}
              for p, n in names.items()]  # fmt: skip
    events += _phase(3, 0, 50_000, "BROADCAST") + _phase(4, 0, 90_000)
    for k, start in enumerate((100_000, 200_000, 300_000)):
        long = 2_000 if k else 9_000  # the first step's allreduce is slow (warm-up)
        events += [{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": start - 5_000, "pid": 1},
                   {"ph": "E", "ts": start, "pid": 1}]  # fmt: skip
        events += _phase(1, start, start + long, shape=[3, 3, 8, 16])
        events += _phase(1, start + 10, start + 20, "GLOO_ALLREDUCE")  # nested: not counted
        events += _phase(2, start + 1_000, start + long + 1_000, shape=[16])
    return events


def test_allreduce_per_step_is_the_union_of_each_steps_gradient_phases():
    numbers = cs.allreduce_per_step(_timeline())
    assert numbers["steps"] == 3 and numbers["gradient_tensors"] == 2
    assert numbers["ms_per_step"] == [10.0, 3.0, 3.0]  # union, not the sum (fused)
    assert numbers["median_ms"] == 3.0  # the warm-up step does not decide it
    assert numbers["gradient_params"] == 3 * 3 * 8 * 16 + 16  # from the recorded shapes


def test_a_timeline_without_gradient_allreduces_is_refused():
    events = [{"name": "process_name", "ph": "M", "pid": 3, "args": {"name": "HorovodBroadcast_w"}}]
    with pytest.raises(ValueError, match="no gradient ALLREDUCE"):
        cs.allreduce_per_step(events + _phase(3, 0, 10, "BROADCAST"))


def test_link_rates_are_read_as_tc_writes_them():
    assert cs.gbit_per_s("10gbit") == 10 and cs.gbit_per_s("1Gbit") == 1
    assert cs.gbit_per_s("100mbit") == pytest.approx(0.1) and cs.gbit_per_s("unshaped") is None
    with pytest.raises(ValueError, match="'fast'"):
        cs.gbit_per_s("fast")


def _rows(rate: str | None):
    alone = _record(400.0)
    concurrent = [_record(320.0), _record(360.0, host="node2")]
    horovod = _record(272.0, ranks=2)
    allreduce = {"median_ms": 12.0, "gradient_params": 1_000_000}
    spans = [(0.0, 10.0), (4.0, 12.0)]
    return cs.link_rows(rate, alone, concurrent, horovod, allreduce, spans)


def test_the_table_separates_sharing_the_machine_from_horovod():
    rows = {r["configuration"]: r for r in _rows("1gbit")}
    assert rows["alone"]["efficiency_vs_alone"] == 1.0
    assert rows["concurrent"]["efficiency_vs_alone"] == pytest.approx(340 / 400)  # the hardware
    assert rows["horovod"]["efficiency_vs_concurrent"] == pytest.approx(272 / 340)  # Horovod
    assert rows["horovod"]["efficiency_vs_alone"] == pytest.approx(272 / 400)
    assert rows["concurrent"]["hosts"] == ["node1", "node2"]
    assert rows["concurrent"]["overlap_seconds"] == 6.0
    assert rows["concurrent"]["overlap_fraction"] == pytest.approx(6 / 8)
    assert rows["horovod"]["allreduce_ms_per_step"] == 12.0


def test_the_model_is_checked_against_horovod_minus_the_concurrent_jobs():
    rows = _rows("1gbit")
    (check,) = cs.allreduce_checks(rows)
    measured = 1e3 * (16 / 272 - 16 / 340)  # Horovod's step minus the independent jobs' step
    assert check["measured_ms"] == pytest.approx(measured)
    predicted = 1e3 * ring_allreduce_seconds(4 * 1_000_000, 2, 1.0)  # the timeline's params
    assert check["predicted_ms"] == pytest.approx(predicted)
    assert check["gbit_per_s"] == 1.0 and check["timeline_allreduce_ms"] == 12.0
    table = cs.scaling_table(rows + _rows(None))
    assert table["model_measured_ms"].notna().sum() == 1  # unshaped: no rate to model
    assert not cs.allreduce_checks(_rows(None))


def test_runs_of_another_batch_are_refused_naming_the_run():
    with pytest.raises(ValueError, match="r-node2-1: batch_size_per_rank 8 differs"):
        cs.link_rows(None, _record(400.0), [_record(1.0), _record(1.0, host="node2",
                     batch_size_per_rank=8)], _record(1.0, ranks=2), {"median_ms": 1}, [(0, 1)])  # fmt: skip


def test_the_summary_checks_the_projection_with_a_studys_checks(tmp_path):
    from chexlib.report import summary, verdicts

    run = tmp_path / "scaling" / "r1"
    run.mkdir(parents=True)
    check = {**cs.allreduce_checks(_rows("1gbit"))[0], "model": "tiny"}
    (run / "run.json").write_text(json.dumps({"stage": "scaling", "status": "complete",
                                              "notebook": "04c_cluster_scaling"}))  # fmt: skip
    (run / "params.json").write_text("{}")
    (run / "metrics.json").write_text(json.dumps({"allreduce_checks": [check]}))
    tables = summary.load_study(tmp_path)
    assert [c["run_id"] for c in tables["allreduce_checks"]] == ["r1"]
    claim = next(c for c in verdicts.verdicts(tables)["claims"] if c["id"] == "scaling-projection")
    assert "measured 2-host overheads" in claim["note"] and "1 Gbit/s" in claim["note"]


def test_the_figure_has_every_mark_in_its_legend_and_axes_from_zero():
    import matplotlib

    matplotlib.use("Agg")
    from chexlib.report.cluster_scaling_plots import SERIES, plot_cluster_scaling

    fig = plot_cluster_scaling(cs.scaling_table(_rows(None) + _rows("1gbit") + _rows("10gbit")))
    labels = [t.get_text().replace("\n", " ") for t in fig.legends[0].get_texts()]
    for _, label in SERIES.values():
        assert label in labels
    assert any("PROJECTION" in label for label in labels)
    assert any("unshaped" in label for label in labels)
    (ax,) = fig.axes
    assert ax.get_ylim()[0] == 0 and ax.get_xlim()[0] == 0


# --- on the real local cluster ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """The running cluster, or one brought up here and taken down after (as found)."""
    from chexlib.cluster import cli, commands
    from chexlib.cluster.state import ClusterState

    missing = commands.missing_prerequisite()
    require(missing is None, f"the cluster tests need: {missing}")
    ours = ClusterState.load() is None
    if ours:
        assert cli.up(2, 1) == 0
    try:
        assert cli.status() == 0, "the cluster is up but not well: chexlib cluster status"
        yield ClusterState.load()
    finally:
        if ours:
            cli.down()


@pytest.mark.slow
def test_three_configurations_ran_where_and_when_they_should(cluster, tmp_path):
    """Unshaped and 1gbit, the tiny model a few steps: alone on node1, the independent jobs
    on node1 and node2 at the same time, Horovod across both; the links set back after."""
    from chexlib.cluster import nodes
    from chexlib.launch import cluster_scaling
    from chexlib.train.config import TrainConfig

    known = [nodes.Node.from_dict(d) for d in cluster.data["nodes"]]
    before = [nodes.link_rate_now(n) for n in known]
    config = TrainConfig(
        out=str(tmp_path / "x"), model="tiny", synthetic=True, image_size=64, batch_size=16,
        epochs=1, steps_per_epoch=100, warmup_epochs=0, evaluate=False, checkpoint=False,
        throughput_warmup_steps=10, throughput_window_steps=20, pin_cores=1, verbose=0,
    )  # fmt: skip
    result = cluster_scaling.measure(config, tmp_path / "runs", ("unshaped", "1gbit"), 300)
    assert [nodes.link_rate_now(n) for n in known] == before
    rows = {(r["link_rate"], r["configuration"]): r for r in result["rows"]}
    assert len(rows) == 6
    for rate in ("unshaped", "1gbit"):
        assert rows[rate, "alone"]["hosts"] == ["node1"]
        assert rows[rate, "concurrent"]["hosts"] == ["node1", "node2"]
        assert rows[rate, "horovod"]["hosts"] == ["node1", "node2"]
        assert rows[rate, "concurrent"]["overlap_fraction"] > 0.5, rows[rate, "concurrent"]
        # On 2 shared cores the timeline's allreduce phase is mostly CPU and scheduling
        # (this model's gradients take about 3 ms at 1 Gbit/s, measured phases 10-30 ms,
        # and unshaped was larger than 1gbit in one of two trial runs): positive, not ordered.
        assert rows[rate, "horovod"]["allreduce_ms_per_step"] > 0
        folder = tmp_path / "runs" / f"tiny-{rate}"
        for run in ("alone", "concurrent-node1", "concurrent-node2", "horovod"):
            assert (folder / run / "metrics.json").is_file(), run
        assert (folder / "horovod-timeline.json").is_file()
    (check,) = result["allreduce_checks"]
    assert check["gbit_per_s"] == 1.0 and check["predicted_ms"] > 0
    assert math.isfinite(check["measured_ms"])
    assert (tmp_path / "runs" / "cluster_scaling.csv").is_file()


def test_shaping_without_a_cluster_says_so(monkeypatch):
    from chexlib.cluster import cli
    from chexlib.cluster.commands import ClusterError
    from chexlib.cluster.state import ClusterState

    monkeypatch.setattr(ClusterState, "load", classmethod(lambda cls, *a: None))
    with pytest.raises(ClusterError, match="no cluster is up to shape"):
        cli.shape("1gbit")


@pytest.mark.slow
def test_a_shell_inside_a_node_reshapes_every_link_and_sets_it_back(cluster):
    """As a Slurm job's shell would (it runs in node1's network namespace)."""
    import subprocess
    import sys
    from pathlib import Path

    from chexlib.cluster import nodes

    known = [nodes.Node.from_dict(d) for d in cluster.data["nodes"]]
    before = [nodes.link_rate_now(n) for n in known]
    chexlib = str(Path(sys.executable).parent / "chexlib")
    inside = ["nsenter", f"--net={known[0].netns}", chexlib, "cluster", "shape", "--link-rate"]
    try:
        done = subprocess.run([*inside, "100mbit"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert [nodes.link_rate_now(n) for n in known] == ["100Mbit"] * len(known)
        done = subprocess.run([*inside, "none"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert [nodes.link_rate_now(n) for n in known] == [None] * len(known)
    finally:
        for node, rate in zip(known, before, strict=True):
            if rate:
                nodes.shape(node, rate)
            else:
                nodes.unshape(node)
