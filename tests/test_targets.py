"""The run's Prometheus target file (distlm.metrics.targets): addresses, labels, where it goes, and
the removal the SLURM script runs when a job ends for good. The file written by real ranks and
scraped by a real Prometheus is tested in test_prometheus_live.py and test_slurm.py."""

import json

from distlm.config import load_config
from distlm.metrics import targets
from launchers import CONFIG


def test_a_scraper_reaches_each_bind_at_its_own_address():
    assert targets.scrape_address("127.0.0.1", 9470, "node7") == "127.0.0.1:9470"  # loopback answers only there
    assert targets.scrape_address("0.0.0.0", 9471, "node7") == "node7:9471"      # a wildcard: the host's name
    assert targets.scrape_address("::", 9470, "node7") == "node7:9470"
    assert targets.scrape_address("10.1.2.3", 9470, "node7") == "10.1.2.3:9470"
    assert targets.scrape_address("::1", 9470, "node7") == "[::1]:9470"          # IPv6 needs brackets
    assert targets.scrape_address("fd00::5", 9470, "node7") == "[fd00::5]:9470"


def test_one_group_per_serving_rank_with_its_rank_and_node():
    endpoints = [("n1:9470", "n1"), None, ("n2:9470", "n2")]  # rank 1 could not bind its port
    groups = targets.target_groups(endpoints, "pretrain", environ={"SLURM_JOB_ID": "77"})
    assert groups == [
        {"targets": ["n1:9470"], "labels": {"job": "distlm", "run": "pretrain", "rank": "0", "node": "n1",
                                            "slurm_job_id": "77"}},
        {"targets": ["n2:9470"], "labels": {"job": "distlm", "run": "pretrain", "rank": "2", "node": "n2",
                                            "slurm_job_id": "77"}}]
    assert "slurm_job_id" not in targets.target_groups(endpoints, "x", environ={})[0]["labels"]


def test_the_file_is_named_by_the_run_in_the_configured_folder(tmp_path):
    on = load_config(CONFIG, ["metrics.enabled=true", "run.name=pre/train 7"])
    assert targets.targets_file(on, environ={}) == targets.Path("monitoring/targets/pre_train_7.json")
    assert targets.targets_file(on, environ={"DISTLM_TARGETS_DIR": str(tmp_path)}) == tmp_path / "pre_train_7.json"
    assert targets.targets_file(load_config(CONFIG, ["metrics.enabled=true", "metrics.targets_dir=''"]), environ={}) is None
    assert targets.targets_file(load_config(CONFIG, ["metrics.enabled=false"]), environ={}) is None


def test_one_process_writes_its_file_and_warns_about_what_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTLM_TARGETS_DIR", str(tmp_path / "targets"))
    cfg = load_config(CONFIG, ["metrics.enabled=true", "run.name=solo"])
    said = []
    path = targets.publish(cfg, ("127.0.0.1", 9470), rank=0, world_size=1, group=None, log=said.append)
    assert path == tmp_path / "targets" / "solo.json"
    (group,) = json.loads(path.read_text())
    assert group["targets"] == ["127.0.0.1:9470"] and group["labels"]["rank"] == "0"
    assert "1 of 1 ranks listed" in said[-1]

    (tmp_path / "blocked").write_text("a file where the folder should be")
    monkeypatch.setenv("DISTLM_TARGETS_DIR", str(tmp_path / "blocked"))
    assert targets.publish(cfg, ("127.0.0.1", 9470), rank=0, world_size=1, group=None, log=said.append) is None
    assert "cannot write the Prometheus target file" in said[-1] and "metrics.targets_dir" in said[-1]


def test_remove_deletes_the_runs_file_when_the_job_is_over(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTLM_TARGETS_DIR", str(tmp_path))
    left = tmp_path / "crashed.json"
    left.write_text("[]")
    other = tmp_path / "another-run.json"
    other.write_text("[]")
    assert targets.main(["--remove", CONFIG, "metrics.enabled=true", "run.name=crashed"]) == 0
    assert not left.exists() and other.exists()
    assert str(left) in capsys.readouterr().out
    assert targets.main(["--remove", CONFIG, "metrics.enabled=true", "run.name=crashed"]) == 0  # nothing left: fine
    assert targets.main(["--remove", CONFIG, "metrics.enabled=maybe"]) == 2
