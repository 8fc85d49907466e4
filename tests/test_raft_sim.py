"""Raft under seeded chaos: the deterministic simulator must find no violation.

Every seed checks Election Safety, Log Matching, Leader Completeness and State
Machine Safety after each step, convergence after healing, and linearizability of
the clients' history (see dtask/raft/sim.py). A seed that once failed stays here.
"""

import pytest

from dtask.raft.sim import Faults, Simulation, Violation, run_seed

# Seeds that found real bugs, with what they found.
REGRESSIONS = [
    (3, 25, "a read-index round whose heartbeats were lost was never retried"),
    (5, 10, "a delayed rejection moved a follower's next below its match, "
            "looping on the same snapshot forever"),
    (5, 54, "same as seed 25, with 5 voters"),
    (3, 1785, "simulator: a spare whose lost addition was later committed had been retired"),
]


@pytest.mark.parametrize(("nodes", "seed", "found"), REGRESSIONS)
def test_regression_seed(nodes, seed, found):
    result = run_seed(seed, nodes)
    assert result.ok, f"{found}: {result.error}"


@pytest.mark.parametrize("block", range(6))
def test_three_voters_many_seeds(block):
    """300 seeds with 3 voters (and spares joining and leaving)."""
    for seed in range(1000 + block * 50, 1000 + (block + 1) * 50):
        result = run_seed(seed, 3)
        assert result.ok, f"seed {seed}: {result.error}\n" + "\n".join(result.trace[-60:])


@pytest.mark.parametrize("block", range(2))
def test_five_voters_many_seeds(block):
    """100 seeds with 5 voters."""
    for seed in range(5000 + block * 50, 5000 + (block + 1) * 50):
        result = run_seed(seed, 5)
        assert result.ok, f"seed {seed}: {result.error}\n" + "\n".join(result.trace[-60:])


def test_simulator_exercises_the_faults_it_claims():
    """The runs above are only evidence if crashes, partitions, snapshots,
    transfers and membership changes actually happen in them."""
    seen: dict[str, int] = {}
    for seed in range(1000, 1040):
        sim = Simulation(seed, keep_trace=True)
        sim.run()
        for event in ("crash", "restart", "partition", "drop", "installs snapshot",
                      "transfer", "add", "promote", "remove", "crashes before persisting"):
            seen[event] = seen.get(event, 0) + sum(event in line for line in sim.events)
        seen["unknown outcomes"] = seen.get("unknown outcomes", 0) + sum(
            op.ret == float("inf") for op in sim.history)
    missing = [event for event, count in seen.items() if count == 0]
    assert not missing, f"never happened in 40 seeds: {missing} ({seen})"


def test_simulator_is_deterministic():
    a = run_seed(1234, 3, keep_trace=True)
    b = run_seed(1234, 3, keep_trace=True)
    assert a.ok and a.trace == b.trace and a.trace


def test_checker_catches_a_broken_core(monkeypatch):
    """If votes ignored the log up-to-date rule, the checks must notice."""
    from dtask.raft import core
    from dtask.raft.messages import Message, MsgType

    def careless_vote(self, m):
        resp = MsgType.PRE_VOTE_RESP if m.type == MsgType.PRE_VOTE else MsgType.VOTE_RESP
        self._send(Message(resp, m.frm, self.id, m.term))
        if m.type == MsgType.VOTE:
            self.vote = m.frm

    monkeypatch.setattr(core.Raft, "_handle_vote_request", careless_vote)
    failures = [s for s in range(1, 30) if not run_seed(s, 3).ok]
    assert failures, "30 seeds with a vote-granting bug and no violation detected"


def test_lost_fsync_of_votes_is_caught(monkeypatch):
    """Forgetting the vote across a crash can elect two leaders in a term."""
    from dtask.raft import sim as simmod

    original = simmod.SimNode.handle_ready

    def forgetful(self):
        before = self.disk.hard_state
        original(self)
        self.disk.hard_state = before  # the vote never reaches the disk

    monkeypatch.setattr(simmod.SimNode, "handle_ready", forgetful)
    with pytest.raises(Violation):
        for seed in range(1, 60):
            sim = Simulation(seed, faults=Faults(crash=0.005))
            sim.run()
