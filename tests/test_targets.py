"""The run's Prometheus target file (distlm.metrics.targets): addresses, labels, where it goes, and
the removal the SLURM script runs when a job ends for good. The file written by real ranks and
scraped by a real Prometheus is tested in test_prometheus_live.py and test_slurm.py."""

import json

from distlm.config import load_config
from distlm.metrics import targets
from launchers import CONFIG


def test_a_scraper_reaches_each_bind_at_its_own_address():
    assert targets.scrape_address("127.0.0.1", 9470, "node7") == "127.0.0.1:9470"  # loopback answers only there
    # ... on rank 0's host; another host's loopback rank is listed by name, down rather than mistaken.
    assert targets.scrape_address("127.0.0.1", 9470, "node8", same_host=False) == "node8:9470"
    assert targets.scrape_address("localhost", 9470, "node8", same_host=False) == "node8:9470"
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


def test_the_file_is_named_by_the_run_and_its_folder_in_the_configured_folder(tmp_path):
    on = load_config(CONFIG, ["metrics.enabled=true", "run.name=pre/train 7", "run.dir=a/exp"])
    path = targets.targets_file(on, environ={})
    assert path.parent == targets.Path("monitoring/targets") and path.name.startswith("pre_train_7-")
    assert targets.targets_file(on, environ={"DISTLM_TARGETS_DIR": str(tmp_path)}) == tmp_path / path.name
    # Two runs whose folders share a name never share a file.
    twin = load_config(CONFIG, ["metrics.enabled=true", "run.name=pre/train 7", "run.dir=b/exp"])
    assert targets.targets_file(twin, environ={}) != path
    assert targets.targets_file(load_config(CONFIG, ["metrics.enabled=true", "metrics.targets_dir=''"]), environ={}) is None
    assert targets.targets_file(load_config(CONFIG, ["metrics.enabled=false"]), environ={}) is None


def test_one_process_writes_its_file_and_warns_about_what_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTLM_TARGETS_DIR", str(tmp_path / "targets"))
    cfg = load_config(CONFIG, ["metrics.enabled=true", "run.name=solo"])
    said = []
    written = targets.publish(cfg, ("127.0.0.1", 9470), rank=0, world_size=1, group=None, log=said.append)
    assert written.path == targets.targets_file(cfg) and written.path.parent == tmp_path / "targets"
    (group,) = json.loads(written.path.read_text())
    assert group["targets"] == ["127.0.0.1:9470"] and group["labels"]["rank"] == "0"
    assert "1 of 1 ranks listed" in said[-1]
    # Removal takes only what this process wrote: a later start's file stays.
    written.path.write_text("[]\n")
    written.remove(said.append)
    assert written.path.exists()
    written.path.write_text(written.text)
    written.remove(said.append)
    assert not written.path.exists()
    written.remove(said.append)  # already gone: fine

    (tmp_path / "blocked").write_text("a file where the folder should be")
    monkeypatch.setenv("DISTLM_TARGETS_DIR", str(tmp_path / "blocked"))
    assert targets.publish(cfg, ("127.0.0.1", 9470), rank=0, world_size=1, group=None, log=said.append) is None
    assert "no Prometheus target file" in said[-1] and "metrics.targets_dir" in said[-1]


def test_remove_deletes_the_runs_file_when_the_job_is_over(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTLM_TARGETS_DIR", str(tmp_path))
    left = targets.targets_file(load_config(CONFIG, ["metrics.enabled=true", "run.name=crashed"]))
    left.write_text("[]")
    other = tmp_path / "another-run.json"
    other.write_text("[]")
    assert targets.main(["--remove", CONFIG, "metrics.enabled=true", "run.name=crashed"]) == 0
    assert not left.exists() and other.exists()
    assert str(left) in capsys.readouterr().out
    assert targets.main(["--remove", CONFIG, "metrics.enabled=true", "run.name=crashed"]) == 0  # nothing left: fine
    assert targets.main(["--remove", CONFIG, "metrics.enabled=maybe"]) == 2
