"""Progress output of a Simulation of Sites: tqdm's bar (time left), one line per round and site,
plain lines off a terminal, nothing at all when progress is off."""

import io
import sys

from _fl_helpers import phantom, tiny_unet

from fastdp.federated import DPConfig, FedAvg, Simulation, Site


def _simulation(progress, dp=None, rounds=2):
    site = Site("site_a", phantom("site_a", 16), None, tiny_unet, batch_size=8, local_steps=1, dp=dp)
    return Simulation([site], FedAvg(), tiny_unet, rounds=rounds, progress=progress)


def test_progress_off_a_terminal_is_whole_lines(capsys):
    _simulation(True, dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0), rounds=3).run()
    out, err = capsys.readouterr()
    assert out == ""  # progress goes to stderr only
    lines = err.splitlines()
    assert "[dp-sgd] round 1/3" in lines
    assert any(line.startswith("  site site_a: 1 steps in") and "epsilon" in line for line in lines)
    assert any(line.startswith("[dp-sgd] round 3/3 done in") and "epsilon site_a=" in line for line in lines)
    # tqdm's state after each round, as one line: count, elapsed < time left, rate
    meters = [line for line in lines if line.startswith("[dp-sgd]:")]
    assert [m.split("|")[2].split()[0] for m in meters] == ["1/3", "2/3", "3/3"]
    assert all("<" in m and "round" in m for m in meters)
    assert "\r" not in err and "ETA" not in err


def test_progress_on_a_terminal_draws_a_live_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    _simulation(True).run()
    text = term.getvalue()
    assert "\r" in text and "2/2" in text  # redrawn in place
    assert "[nonprivate] round 2/2 done in" in text


def test_no_progress_prints_nothing(capsys):
    _simulation(False).run()
    assert capsys.readouterr() == ("", "")
