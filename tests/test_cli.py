"""The fastdp command: help, accounting commands against fastdp.accounting, config, report, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastdp.accounting import compute_epsilon, get_noise_multiplier
from fastdp.cli import main
from fastdp.experiment import ExperimentConfig, load_config

SUBCOMMANDS = ("run", "epsilon", "calibrate", "attack", "report", "config", "bench", "credentials")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in SUBCOMMANDS) and "examples:" in out


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(capsys, cmd):
    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    assert exit_.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_epsilon_matches_accounting(capsys):
    code, out, _ = _run(
        capsys, "epsilon", "-q", "0.05", "--sigma", "1.1", "--steps", "200", "--delta", "1e-5", "--json"
    )
    assert code == 0
    assert json.loads(out)["epsilon"] == compute_epsilon(0.05, 1.1, 200, 1e-5, "rdp")
    code, out, _ = _run(capsys, "epsilon", "-q", "0.05", "--sigma", "1.1", "--steps", "200")
    assert code == 0 and f"epsilon = {compute_epsilon(0.05, 1.1, 200, 1e-5):.4f}" in out


def test_epsilon_from_batch_and_dataset_size_with_pld(capsys):
    args = ["epsilon", "--batch-size", "32", "--dataset-size", "640", "-s", "1.0", "-n", "50", "--accountant", "pld"]
    code, out, _ = _run(capsys, *args, "--json")
    assert code == 0 and json.loads(out)["epsilon"] == compute_epsilon(0.05, 1.0, 50, 1e-5, "pld")


def test_calibrate_matches_accounting(capsys):
    code, out, _ = _run(capsys, "calibrate", "--target-epsilon", "8", "-q", "0.05", "--steps", "100", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["noise_multiplier"] == get_noise_multiplier(8.0, 1e-5, 0.05, 100)
    assert result["epsilon"] <= 8.0


def test_accounting_errors_are_clear(capsys):
    code, _, err = _run(capsys, "epsilon", "--sigma", "1", "--steps", "10")
    assert code == 2 and "give --sample-rate Q, or --batch-size B and --dataset-size N" in err
    code, _, err = _run(capsys, "epsilon", "-q", "1.5", "--sigma", "1", "--steps", "10")
    assert code == 2 and "sample rate must be in (0, 1]" in err
    code, _, err = _run(capsys, "epsilon", "-q", "0.1", "--sigma", "1", "--steps", "10", "--delta", "2")
    assert code == 2 and "delta must be in (0, 1)" in err


def test_config_show_prints_loadable_toml(capsys, tmp_path):
    code, out, _ = _run(capsys, "config", "--show", "--set", "federated.rounds=3")
    assert code == 0
    path = tmp_path / "shown.toml"
    path.write_text(out)
    assert load_config(path) == ExperimentConfig().replace(**{"federated.rounds": 3})


def test_config_error_names_the_key(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[dp]\nsigmaa = 1.0\n")
    code, _, err = _run(capsys, "config", str(path))
    assert code == 2 and "unknown key 'dp.sigmaa'" in err and "dp.noise_multiplier" in err
    code, _, err = _run(capsys, "run", str(path))
    assert code == 2 and "unknown key 'dp.sigmaa'" in err


def test_report_command(capsys, tmp_path):
    run = tmp_path / "nonprivate"
    run.mkdir()
    rounds = [{"round": 1, "wall_s": 2.0, "test": {"dice": 0.5}, "sites": {"site_a": {"val_dice": 0.4}}}]
    (run / "history.json").write_text(json.dumps({"mode": "nonprivate", "rounds": rounds}))
    code, out, _ = _run(capsys, "report", str(tmp_path), "--no-plots")
    assert code == 0 and Path(out.strip()) == tmp_path / "report.md"
    assert "| nonprivate | 1 | 0.500 | site_a 0.400 |" in (tmp_path / "report.md").read_text()
    code, _, err = _run(capsys, "report", str(tmp_path / "missing"))
    assert code == 2 and "no history.json" in err


@pytest.mark.parametrize("sep", [[], ["--"]])
def test_bench_forwards_arguments(monkeypatch, sep):
    import fastdp.cli

    calls = []
    monkeypatch.setattr(fastdp.cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["bench", "step", *sep, "--batches", "16", "--sizes", "64"]) == 0
    (cmd,) = calls
    assert cmd[0] == sys.executable and Path(cmd[1]).name == "bench_step.py" and Path(cmd[1]).is_file()
    assert cmd[2:] == ["--batches", "16", "--sizes", "64"]


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastdp", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("fastdp ")


def test_insecure_is_for_the_flower_backend_only(capsys):
    code, _, err = _run(capsys, "run", "--insecure", "--set", "federated.rounds=1")
    assert code == 2 and "--insecure is for the Flower backend" in err


def test_credentials_writes_a_ca_a_server_certificate_and_node_keys(capsys, tmp_path):
    pytest.importorskip("flwr", reason="fastdp credentials is part of the Flower extra")
    from cryptography import x509

    out = tmp_path / "certs"
    code, text, _ = _run(capsys, "credentials", str(out), "--host", "sl.example.org", "--nodes", "2")
    assert code == 0 and "flwr supernode register" in text
    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["sl.example.org"]
    assert sorted(p.name for p in (out / "nodes").iterdir()) == [
        "hospital-0",
        "hospital-0.pub",
        "hospital-1",
        "hospital-1.pub",
    ]
    # A second run would replace the CA (and orphan every certificate it signed): refused without --force.
    before = (out / "ca.crt").read_bytes()
    code, _, err = _run(capsys, "credentials", str(out))
    assert code == 2 and "--force" in err and (out / "ca.crt").read_bytes() == before
    assert _run(capsys, "credentials", str(out), "--force")[0] == 0 and (out / "ca.crt").read_bytes() != before
