"""Progress displays: the phase hook, the plain line-per-round mode, the live table's content."""

from __future__ import annotations

import io

from conftest import tiny_config
from parablock.cli import main
from parablock.core.metrics import ClientLog
from parablock.tools.progress import LiveProgress, PlainProgress, ProgressState, make_progress


def test_span_calls_the_phase_listener_on_start_and_end():
    heard = []
    log = ClientLog(3, listener=lambda *a: heard.append(a))
    with log.span(5, "upload"):
        heard.append("inside")
    assert heard == [(3, 5, "upload", True), "inside", (3, 5, "upload", False)]
    assert [s.phase for s in log.spans] == ["upload"]


def test_run_quiet_prints_one_plain_line_per_round(tiny_model_dir, tmp_path, capsys):
    sets = {
        "model.name_or_path": tiny_model_dir,
        "model.blocks": "all",
        "data.train_size": "16",
        "data.max_length": "320",
        "federation.rounds": "3",
        "federation.local_steps": "1",
        "federation.batch_size": "2",
        "link.up_mbps": "inf",
        "link.down_mbps": "inf",
        "eval.size": "4",
        "run.out": str(tmp_path / "r"),
        "run.threads": "1",
    }
    args = ["run", "--quiet"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    rounds = [x for x in lines if x.startswith("round ")]
    assert [x.split(" block")[0] for x in rounds] == ["round 1/3", "round 2/3", "round 3/3"]
    assert len([x for x in lines if x.startswith("drain:")]) == 1
    assert "ETA" in rounds[0] and "examples/s" in rounds[0]
    table = lines[lines.index("done:") :]  # the table a run ends with
    assert table[1].split()[:2] == ["ran", "parablock"] and table[-1].split()[0] == "files"
    assert any(x.split()[:2] == ["held-out", "loss"] for x in table)


def test_live_table_shows_each_clients_phases(tiny_model_dir, tmp_path):
    from rich.console import Console

    cfg = tiny_config(tiny_model_dir, str(tmp_path), federation={"clients": 2, "rounds": 4})
    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    live = LiveProgress(cfg, console)
    live.phase(0, 1, "compute", True)
    live.phase(0, 1, "upload", True)
    live.phase(1, 1, "compute", True)
    live.phase(1, 1, "compute", False)
    console.print(live.render())
    text = console.file.getvalue()
    assert "computing + uploading" in text  # ParaBlock: both threads busy
    assert "round 1/4" in text and "ETA ?" in text
    row1 = next(x for x in text.splitlines() if "│ 1 " in x or "┃ 1 " in x or " 1 │" in x)
    assert "idle" in row1


def test_eta_is_remaining_rounds_times_mean_round():
    state = ProgressState(clients=1, rounds=5)

    class Rec:
        def __init__(self, t):
            self.round, self.block, self.drain = t, t, False
            self.compute_s, self.upload_s, self.download_s, self.idle_s = 1.0, 0.25, 0.25, 0.0
            self.train_loss, self.examples = 2.0, 4

    class C:
        def __init__(self, t):
            self.log = type("L", (), {"rounds": [Rec(t)]})()

    state.barrier(C(0), 0)
    state.barrier(C(1), 1)
    mean = sum(d.seconds for d in state.done) / 2
    assert state.eta_s() == mean * 3 + 0.5  # three rounds left, then a drain of one comm phase


def test_make_progress_is_plain_off_a_terminal(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, str(tmp_path))
    assert isinstance(make_progress(cfg, stream=io.StringIO()), PlainProgress)
    assert isinstance(make_progress(cfg, quiet=True), PlainProgress)
