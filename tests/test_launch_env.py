"""The rank/world resolver, one launcher's environment at a time (the variables each really sets)."""

from __future__ import annotations

import pytest

from distlm.parallel import launch_env
from distlm.parallel.launch_env import LaunchEnvError, Placement, resolve
from distlm.parallel.rendezvous import RendezvousError, choose_gloo_interface, interface_of, local_interfaces, route_source


def _never(*_):
    raise AssertionError("this launcher's placement must not need to ask anyone")


def _resolve(env, **kw):
    kw = {"mpi_master": _never, "slurm_host": _never, "mpi4py_ranks": _never, "free_port": lambda: 40000, **kw}
    return resolve(env, **kw)


TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29500", "GROUP_RANK": "1"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1"}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3", "PMI_FD": "7"}
SLURM_STEP = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
              "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]",
              "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
# The batch script itself: SLURM says task 0 of the job's 4, but nobody started the other 3.
SLURM_BATCH = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "123456",
               "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS_PER_NODE": "2"}


def test_torchrun_variables_are_taken_as_they_are():
    p = _resolve(TORCHRUN)
    assert p == Placement("torchrun", 5, 8, 1, 4, "node0", 29500)
    assert p.torch_env() == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                             "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}


def test_the_deepspeed_launcher_says_local_size():
    env = {**TORCHRUN, "LOCAL_SIZE": "4", "CROSS_RANK": "1"}
    del env["LOCAL_WORLD_SIZE"]
    assert _resolve(env).local_world_size == 4


def test_torchrun_wins_over_the_scheduler_it_runs_under():
    assert _resolve({**SLURM_STEP, **MPICH, **TORCHRUN}).launcher == "torchrun"


def test_torchrun_variables_without_a_master_are_refused():
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR/MASTER_PORT are not"):
        _resolve({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_open_mpi_asks_rank_0_for_the_meeting_point():
    p = _resolve(OPENMPI, mpi_master=lambda preset: ("node3", 41234))
    assert p == Placement("openmpi", 3, 4, 1, 2, "node3", 41234)


def test_mpi_with_only_master_addr_set_asks_rank_0_for_a_port_only():
    asked = []
    p = _resolve({**MPICH, "MASTER_ADDR": "10.0.0.1"}, mpi_master=lambda preset: asked.append(preset) or (preset, 41000))
    assert asked == ["10.0.0.1"] and (p.master_addr, p.master_port) == ("10.0.0.1", 41000)


def test_mpich_hydra_and_a_preset_master():
    p = _resolve({**MPICH, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"})
    assert p == Placement("mpich", 2, 3, 2, 3, "10.0.0.1", 29600)


def test_a_slurm_task_meets_on_the_first_node_at_a_port_of_its_job():
    asked = []
    p = _resolve(SLURM_STEP, slurm_host=lambda nodelist: asked.append(nodelist) or "gpu07")
    assert asked == ["gpu[07-08]"]
    assert p == Placement("slurm", 3, 4, 1, 2, "gpu07", launch_env.SLURM_PORT_BASE + 123456 % 20000)
    for job in range(0, 200000, 997):  # below Linux's ephemeral ports (32768+): no clash with outgoing connections
        assert 20000 <= launch_env.slurm_job_port({"SLURM_JOB_ID": str(job)}) < 32768


def test_slurm_tasks_per_node_is_read_for_this_node():
    env = {**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1", "SLURM_LOCALID": "0",
           "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    assert _resolve(env).local_world_size == 1
    assert _resolve({**env, "SLURM_NODEID": "0"}).local_world_size == 3


def test_the_batch_script_itself_is_a_world_of_one():
    assert _resolve(SLURM_BATCH) == Placement("single", 0, 1, 0, 1, "127.0.0.1", 40000)


def test_nothing_set_is_a_world_of_one_on_loopback():
    assert _resolve({}) == Placement("single", 0, 1, 0, 1, "127.0.0.1", 40000)


def test_forced_mpi4py_reads_the_communicator():
    p = _resolve({"DISTLM_LAUNCHER": "mpi4py"}, mpi4py_ranks=lambda: (1, 2, 1, 2), mpi_master=lambda preset: ("h", 7))
    assert p == Placement("mpi4py", 1, 2, 1, 2, "h", 7)


def test_a_forced_launcher_must_exist_and_be_complete():
    with pytest.raises(LaunchEnvError, match="DISTLM_LAUNCHER='pbs' is not one of"):
        _resolve({"DISTLM_LAUNCHER": "pbs"})
    with pytest.raises(LaunchEnvError, match="launcher openmpi: OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE not set"):
        _resolve({"DISTLM_LAUNCHER": "openmpi", **MPICH})


@pytest.mark.parametrize("env, message", [
    ({**OPENMPI, "OMPI_COMM_WORLD_RANK": "4"}, "OMPI_COMM_WORLD_RANK=4 is outside 0..3"),
    ({**MPICH, "PMI_SIZE": "three"}, "PMI_SIZE='three' is not an integer"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is outside 1..65535"),
    ({**OPENMPI, "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, "local rank 2 is outside 0..1"),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "did not say this process's rank on its node"),
])
def test_contradictions_are_named(env, message):
    with pytest.raises(LaunchEnvError, match=message):
        _resolve(env, mpi_master=lambda preset: ("h", 7))


def test_an_unknown_launcher_error_is_a_launch_error_exit_code():
    from distlm.fault import exit_codes

    assert exit_codes.code_for(LaunchEnvError("x")) == exit_codes.LAUNCH_ERROR == 6


def test_loopback_needs_no_interface_choice():
    env = {}
    p = Placement("torchrun", 0, 2, 0, 2, "127.0.0.1", 29500)
    assert choose_gloo_interface(p, env) is None and env == {}


def test_a_master_that_resolves_to_loopback_in_a_job_across_hosts_is_refused():
    # 127.0.1.1 is what Debian's /etc/hosts gives a host's own name: gloo would listen there.
    placement = Placement("slurm", 0, 4, 0, 2, "127.0.1.1", 29500)
    with pytest.raises(RendezvousError, match=r"resolves to 127.0.1.1, a loopback address.*4 ranks, 2 here.*GLOO_SOCKET_IFNAME"):
        choose_gloo_interface(placement, {})
    assert choose_gloo_interface(placement, {"GLOO_SOCKET_IFNAME": "eth0"}) is None  # the user chose


def test_a_user_choice_of_interface_is_kept():
    env = {"GLOO_SOCKET_IFNAME": "eth7"}
    assert choose_gloo_interface(Placement("torchrun", 1, 2, 0, 1, "192.0.2.1", 29500), env) is None
    assert env == {"GLOO_SOCKET_IFNAME": "eth7"}


def test_the_interface_holding_the_route_to_the_master_is_found():
    # Loopback routes to itself on every machine: the lookup sends nothing and needs no network.
    source = route_source("127.0.0.1", 29500)
    assert source == "127.0.0.1"
    assert interface_of(source, local_interfaces()) == "lo"
    assert interface_of("203.0.113.9", {"lo": ["127.0.0.1"]}) is None


def test_a_non_loopback_master_gets_the_interface_that_reaches_it():
    # This host's own non-loopback address, if it has one: the route to it names its interface.
    own = [(name, a) for name, addrs in local_interfaces().items() for a in addrs
           if name != "lo" and "." in a and not a.startswith("127.")]
    if not own:
        pytest.skip("this host has no non-loopback IPv4 address")
    name, address = own[0]
    env = {}
    assert choose_gloo_interface(Placement("slurm", 1, 2, 1, 2, address, 29500), env) == name
    assert env == {"GLOO_SOCKET_IFNAME": name}
