"""Tests of the pure Raft core (dtask/raft/core.py), named after etcd's raft tests where
one exists (test_leader_election ~ TestLeaderElection, ...).

Everything runs on the in-memory harness of tests/raft_harness.py: election_ticks=10,
heartbeat_ticks=1, a fixed seed per node. Index convention (see the harness docstring):
the founding members' bootstrap snapshot is index 1, term 1, so the paper's index i is
our index i + 1 and `log_terms()` lists terms from our index 2 on. A fresh leader's
no-op therefore lands at index 2 in term 2.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from dtask.raft.core import NotLeader, ProposalRejected
from dtask.raft.messages import (
    CAMPAIGN_TRANSFER,
    ConfChange,
    ConfChangeType,
    EntryType,
    HardState,
    Message,
    MsgType,
)
from dtask.raft.progress import REPLICATE, SNAPSHOT, Role

from .raft_harness import (
    ELECTION_TICKS,
    Network,
    empty_node,
    founding_node,
    node_with_log,
)

# etcd's newNetwork default: neither pre-vote nor check-quorum (the paper's plain Raft).
CLASSIC = {"pre_vote": False, "check_quorum": False}
VOTERS3 = [1, 2, 3]


def vote_msg(mtype: MsgType, frm: int, to: int, term: int, index: int, log_term: int) -> Message:
    return Message(mtype, to=to, frm=frm, term=term, index=index, log_term=log_term)


# ====================================================================== elections

ELECTION_CASES = [
    # (cluster size, nodes down, expect a leader)
    (3, (), True),
    (3, (3,), True),
    (3, (2, 3), False),
    (4, (2, 3), False),
    (5, (2, 3), True),
    (5, (2, 3, 4), False),
]


def _leader_election(size: int, down: tuple[int, ...], wins: bool, pre_vote: bool) -> None:
    net = Network.of_size(size, pre_vote=pre_vote)
    for node in down:
        net.isolate(node)
    r = net.campaign(1)
    if wins:
        assert r.role == Role.LEADER and r.term == 2
        assert all(net[i].leader == 1 for i in net.nodes if i not in down)
    elif pre_vote:
        # A pre-candidate without a quorum never touches its term.
        assert r.role == Role.PRE_CANDIDATE and r.term == 1
    else:
        assert r.role == Role.CANDIDATE and r.term == 2


@pytest.mark.parametrize("size,down,wins", ELECTION_CASES)
def test_leader_election(size: int, down: tuple[int, ...], wins: bool) -> None:
    """A candidate wins iff a majority of the voters is reachable; otherwise it stays a
    candidate (TestLeaderElection)."""
    _leader_election(size, down, wins, pre_vote=False)


@pytest.mark.parametrize("size,down,wins", ELECTION_CASES)
def test_leader_election_pre_vote(size: int, down: tuple[int, ...], wins: bool) -> None:
    """Same with pre-vote: a losing pre-candidate stays at its old term
    (TestLeaderElectionPreVote)."""
    _leader_election(size, down, wins, pre_vote=True)


@pytest.mark.parametrize("pre_vote", [False, True], ids=["vote", "prevote"])
def test_leader_election_rejected_by_longer_logs(pre_vote: bool) -> None:
    """Three of five voters have longer logs in the same term: they reject the candidate,
    which gives up and becomes a follower (last row of etcd's TestLeaderElection)."""
    voters = [1, 2, 3, 4, 5]
    logs = {1: [], 2: [1], 3: [1], 4: [1, 1], 5: []}
    net = Network(node_with_log(i, voters, logs[i], term=1, pre_vote=pre_vote)
                  for i in voters)
    r = net.campaign(1)
    assert r.role == Role.FOLLOWER
    assert r.term == (1 if pre_vote else 2)


def test_dueling_candidates() -> None:
    """Two candidates in the same term: the one with a majority wins, the other stays a
    candidate; when it campaigns again at a higher term it deposes the leader but, with
    a shorter log, cannot win (TestDuelingCandidates)."""
    net = Network.of_size(3, **CLASSIC)
    net.cut(1, 3)
    a = net.campaign(1)
    c = net.campaign(3)
    assert a.role == Role.LEADER and a.term == 2
    assert c.role == Role.CANDIDATE and c.term == 2  # 2 already voted for 1 in term 2

    net.recover()
    net.campaign(3)
    for i in VOTERS3:
        assert net[i].role == Role.FOLLOWER and net[i].term == 3
    assert net.log_terms(1) == net.log_terms(2) == [2]
    assert net.log_terms(3) == []  # rejected: its log is behind
    assert net.committed(1) == net.committed(2) == 2

    net.elect(1)  # one of the up-to-date nodes wins and catches 3 up
    assert net.log_terms(3) == [2, 4]


def test_dueling_pre_candidates() -> None:
    """With pre-vote, the node that cannot win never disrupts the leader: the leader
    keeps its term and role (TestDuelingPreCandidates)."""
    net = Network.of_size(3, pre_vote=True, check_quorum=False)
    net.cut(1, 3)
    a = net.campaign(1)
    c = net.campaign(3)
    assert a.role == Role.LEADER and a.term == 2
    assert c.role == Role.FOLLOWER and c.term == 2  # pre-vote rejected, learned the term

    net.recover()
    net.campaign(3)
    assert a.role == Role.LEADER and a.term == 2
    assert net[2].role == Role.FOLLOWER and net[2].term == 2
    assert c.role == Role.FOLLOWER and c.term == 2
    assert net.log_terms(1) == net.log_terms(2) == [2]
    assert net.log_terms(3) == []


def test_pre_vote_with_split_vote() -> None:
    """Two followers pre-campaign at once, both pass pre-vote and split the real vote;
    the next one to time out wins cleanly (TestPreVoteWithSplitVote)."""
    net = Network.of_size(3)
    net.elect(1)
    net.isolate(1)
    n2, n3 = net[2], net[3]
    n2.campaign(pre=True)
    n3.campaign(pre=True)
    net.send()
    assert (n2.term, n3.term) == (3, 3)
    assert n2.role == n3.role == Role.CANDIDATE

    net.campaign(2)
    assert (n2.term, n3.term) == (4, 4)
    assert n2.role == Role.LEADER and n3.role == Role.FOLLOWER


def test_disruptive_follower_pre_vote() -> None:
    """A follower partitioned away times out again and again, but pre-vote keeps its term
    from growing, so when it rejoins it neither deposes the leader nor bumps anyone's
    term; it just catches up (TestDisruptiveFollowerPreVote)."""
    net = Network.of_size(3)
    lead = net.elect(1)
    net.isolate(3)
    for i in range(3):
        net.propose(1, b"somedata%d" % i)
    net.tick(n=4 * ELECTION_TICKS)  # 3 keeps pre-campaigning into the void
    n3 = net[3]
    assert n3.role == Role.PRE_CANDIDATE and n3.term == 2
    assert not net.emitted(MsgType.VOTE, frm=3)

    net.recover()
    net.campaign(3)  # its pre-votes are ignored: 1 and 2 are within their lease
    assert lead.role == Role.LEADER and lead.term == 2
    assert n3.term == 2 and n3.role == Role.PRE_CANDIDATE

    net.tick(n=2 * ELECTION_TICKS)  # heartbeats bring it back
    assert net.leaders() == [1] and {net[i].term for i in VOTERS3} == {2}
    assert n3.role == Role.FOLLOWER and n3.leader == 1
    assert net.log_terms(3) == net.log_terms(1)
    assert net.applied_data(3) == [b"somedata0", b"somedata1", b"somedata2"]


def test_leader_superseding_with_check_quorum() -> None:
    """With check-quorum, a follower ignores vote requests while its leader lease holds,
    and grants them once it has not heard from the leader for an election timeout
    (TestLeaderSupersedingWithCheckQuorum)."""
    net = Network.of_size(3, pre_vote=False, check_quorum=True)
    a, b, c = net[1], net[2], net[3]
    net.elect(1)
    net.campaign(3)
    assert c.role == Role.CANDIDATE  # a and b ignored it
    assert a.role == Role.LEADER and b.term == 2

    b.randomized_timeout = ELECTION_TICKS + 1  # b must not campaign itself
    net.tick([2], n=ELECTION_TICKS)  # b's lease on leader 1 expires
    net.campaign(3)
    assert c.role == Role.LEADER and c.term == 4
    assert a.role == Role.FOLLOWER and a.leader == 3  # deposed by c's append


def test_free_stuck_candidate_with_check_quorum() -> None:
    """A candidate stuck at a higher term (its votes ignored because of leases) is freed
    when the old leader contacts it: the leader learns the higher term and steps down,
    and the candidate can then win (TestFreeStuckCandidateWithCheckQuorum)."""
    net = Network.of_size(3, pre_vote=False, check_quorum=True)
    a, b, c = net[1], net[2], net[3]
    net.elect(1)
    net.isolate(1)
    net.campaign(3)
    net.campaign(3)
    assert c.role == Role.CANDIDATE and c.term == b.term + 2 == 4

    net.recover()
    net.tick([1])  # a's heartbeat reaches c, which answers with its higher term
    assert a.role == Role.FOLLOWER and a.term == c.term

    net.campaign(3)
    assert c.role == Role.LEADER


def test_leader_stepdown_when_quorum_lost() -> None:
    """With check-quorum a leader that hears from no quorum during an election timeout
    steps down (TestLeaderStepdownWhenQuorumLost). The first check after the election
    still counts the election-time replies, so it steps down at the second one."""
    net = Network.of_size(3)
    a = net.elect(1)
    net.isolate(1)
    net.tick([1], n=2 * ELECTION_TICKS - 1)
    assert a.role == Role.LEADER
    net.tick([1])
    assert a.role == Role.FOLLOWER and a.term == 2 and a.leader == 0


def test_leader_stays_when_quorum_active() -> None:
    """A leader that hears from a quorum (one follower down) keeps leading
    (TestLeaderStepdownWhenQuorumActive)."""
    net = Network.of_size(3)
    a = net.elect(1)
    net.isolate(3)
    net.tick([1], n=5 * ELECTION_TICKS)
    assert a.role == Role.LEADER and a.term == 2


def _drive_to(net: Network, state: str) -> None:
    r = net[1]
    if state == "pre_candidate":
        r.campaign(pre=True)
    elif state in ("candidate", "leader"):
        r.campaign(pre=False)
    net.send()
    if state == "leader":
        net.send([Message(MsgType.VOTE_RESP, to=1, frm=2, term=r.term)])
    assert r.role.name.lower() == state


@pytest.mark.parametrize("state", ["follower", "pre_candidate", "candidate", "leader"])
@pytest.mark.parametrize("mtype", [MsgType.VOTE, MsgType.PRE_VOTE], ids=["vote", "prevote"])
def test_vote_from_any_state(state: str, mtype: MsgType) -> None:
    """An up-to-date vote request at a higher term is granted from any state (no lease
    without check-quorum). A real vote makes the node a follower of that term with the
    vote recorded durably; a pre-vote changes neither role nor term (TestVoteFromAnyState)."""
    net = Network([founding_node(1, VOTERS3, **CLASSIC)])  # 2 and 3 exist only as ids
    r = net[1]
    _drive_to(net, state)
    old_role, old_term = r.role, r.term
    new_term = old_term + 1
    net.send([vote_msg(mtype, 2, 1, new_term, r.log.last_index(), r.log.last_term())])
    resp_type = MsgType.VOTE_RESP if mtype == MsgType.VOTE else MsgType.PRE_VOTE_RESP
    resp = net.emitted(resp_type, frm=1, to=2)[-1]
    assert not resp.reject and resp.term == new_term
    if mtype == MsgType.VOTE:
        assert r.role == Role.FOLLOWER and r.term == new_term and r.vote == 2
        assert net.storage[1].hard_state == HardState(new_term, 2)
    else:
        assert r.role == old_role and r.term == old_term


@pytest.mark.parametrize("mtype", [MsgType.VOTE, MsgType.PRE_VOTE], ids=["vote", "prevote"])
@pytest.mark.parametrize("index,log_term,granted", [
    (4, 2, True),  # same last entry
    (5, 2, True),  # same last term, longer
    (3, 2, False),  # same last term, shorter
    (2, 3, True),  # higher last term wins even if shorter
    (10, 1, False),  # lower last term loses even if longer
])
def test_vote_requires_up_to_date_log(mtype: MsgType, index: int, log_term: int,
                                      granted: bool) -> None:
    """§5.4.1: a vote (or pre-vote) is granted only to a candidate whose last entry is at
    least as up to date as ours: higher last term, or same last term and not shorter.
    The voter's log is terms [1, 2, 2] (last index 4, last term 2)."""
    net = Network([node_with_log(1, VOTERS3, [1, 2, 2], term=3, **CLASSIC)])
    net.send([vote_msg(mtype, 2, 1, 4, index, log_term)])
    resp_type = MsgType.VOTE_RESP if mtype == MsgType.VOTE else MsgType.PRE_VOTE_RESP
    (resp,) = net.emitted(resp_type, frm=1, to=2)
    assert resp.reject is not granted
    if mtype == MsgType.VOTE:
        assert net[1].vote == (2 if granted else 0)


def test_one_vote_per_term_survives_restart() -> None:
    """A node votes at most once per term: the vote is in the Ready's hard state (so it is
    persisted before the grant goes out), repeated requests from the same candidate are
    re-granted, other candidates are refused, also after a restart."""
    r = founding_node(1, VOTERS3, **CLASSIC)
    r.step(vote_msg(MsgType.VOTE, 2, 1, 2, 1, 1))
    rd = r.ready()
    assert rd.hard_state == HardState(2, 2)
    assert [(m.type, m.to, m.reject) for m in rd.messages] == [(MsgType.VOTE_RESP, 2, False)]

    net = Network([founding_node(1, VOTERS3, **CLASSIC)])

    def ask(frm: int, term: int) -> bool:
        net.send([vote_msg(MsgType.VOTE, frm, 1, term, 1, 1)])
        return not net.emitted(MsgType.VOTE_RESP, frm=1, to=frm)[-1].reject

    assert ask(2, 2)
    assert not ask(3, 2)
    assert ask(2, 2)
    net.restart(1)
    assert not ask(3, 2)
    assert net[1].vote == 2
    assert ask(3, 3)  # a new term, a new vote


# ====================================================================== log replication

FIG7_LEADER = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
FIG7_FOLLOWERS = {
    # follower log, rejections the leader must see before the logs match
    "a": ([1, 1, 1, 4, 4, 5, 5, 6, 6], 1),
    "b": ([1, 1, 1, 4, 4], 1),
    "c": ([1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6], 0),
    "d": ([1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7], 0),
    "e": ([1, 1, 1, 4, 4, 4, 4], 1),
    "f": ([1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3], 1),
}


@pytest.mark.parametrize("case", sorted(FIG7_FOLLOWERS))
def test_leader_sync_follower_log(case: str) -> None:
    """Figure 7: whatever the follower's log (missing entries, extra uncommitted entries,
    or both), the term-8 leader makes it identical to its own plus its term-8 no-op.
    Fast backtracking (the follower's hint skips a whole term, the leader's lookup
    another) takes at most one rejection: (f) would need 7 with one entry per round
    trip, (e) and (b) 5 (TestLeaderSyncFollowerLog)."""
    follower_log, want_rejections = FIG7_FOLLOWERS[case]
    lead = node_with_log(1, VOTERS3, FIG7_LEADER, term=7)
    follower = node_with_log(2, VOTERS3, follower_log, term=7)
    # The follower may have a better log than the leader: the third voter elects it.
    third = node_with_log(3, VOTERS3, [], term=7)
    net = Network([lead, follower, third])
    net.elect(1)
    assert lead.term == 8

    want = FIG7_LEADER + [8]
    assert net.log_terms(1) == net.log_terms(2) == net.log_terms(3) == want
    assert net.committed(2) == net.committed(1) == lead.log.last_index()
    rejections = [m for m in net.delivered(MsgType.APPEND_RESP, frm=2, to=1) if m.reject]
    assert len(rejections) == want_rejections


@pytest.mark.parametrize("acked,want_commit", [(2, 1), (3, 1), (4, 4)])
def test_leader_only_commits_log_from_current_term(acked: int, want_commit: int) -> None:
    """§5.4.2: a leader of term 3 whose log is terms [1, 2] plus its term-3 no-op does not
    commit the earlier-term entries when a majority (2 of 2) has them, only once the
    majority has an entry of term 3 (TestLeaderOnlyCommitsLogFromCurrentTerm)."""
    r = node_with_log(1, [1, 2], [1, 2], term=2, **CLASSIC)
    net = Network([r])
    r.campaign(pre=False)
    net.send([Message(MsgType.VOTE_RESP, to=1, frm=2, term=3)])
    assert r.role == Role.LEADER and net.log_terms(1) == [1, 2, 3]
    net.send([Message(MsgType.APPEND_RESP, to=1, frm=2, term=3, index=acked)])
    assert r.log.committed == want_commit


def test_commit_without_new_term_entry() -> None:
    """Entries of term 2 stranded on a minority are committed once a new leader (term 3)
    commits its own no-op, with no new proposal (TestCommitWithoutNewTermEntry)."""
    net = Network.of_size(5, **CLASSIC)
    net.elect(1)
    for peer in (3, 4, 5):
        net.cut(1, peer)
    net.propose(1, b"some data")
    net.propose(1, b"some data")
    assert net.committed(1) == 2  # just the no-op

    net.recover()
    net.elect(2)
    assert net.log_terms(2) == [2, 2, 2, 3]
    for i in net.nodes:
        assert net.committed(i) == 5
        assert net.applied_data(i) == [b"some data", b"some data"]


def _figure8_cluster() -> Network:
    """Figure 8 after (b): S1 (term 3 after restarting) and S2 hold [1, 2], S5 holds
    [1, 3]; S3 and S4 voted for S5 in term 3 and hold [1]."""
    voters = [1, 2, 3, 4, 5]
    return Network([
        node_with_log(1, voters, [1, 2], term=3, **CLASSIC),
        node_with_log(2, voters, [1, 2], term=2, **CLASSIC),
        node_with_log(3, voters, [1], term=3, vote=5, **CLASSIC),
        node_with_log(4, voters, [1], term=3, vote=5, **CLASSIC),
        node_with_log(5, voters, [1, 3], term=3, vote=5, **CLASSIC),
    ])


def test_figure8_old_term_entry_on_majority_is_not_committed() -> None:
    """Figure 8 (c)->(d): S1, leader of term 4, gets its term-2 entry onto a majority (S1,
    S2, S3) but not its term-4 entry. The term-2 entry must not count as committed:
    S5 (last term 3) can still be elected in term 5 and overwrites it everywhere."""
    net = _figure8_cluster()
    net.isolate(5)
    net.cut(1, 4)
    # Only term-4 entries are lost: the term-2 entry does get through.
    net.intercept(lambda m: replace(m, entries=[e for e in m.entries if e.term != 4])
                  if m.type == MsgType.APPEND else m)
    s1 = net.elect(1)
    assert s1.term == 4
    assert net.log_terms(1) == [1, 2, 4]
    assert net.log_terms(2) == net.log_terms(3) == [1, 2]  # (c): index 2 on a majority
    assert net.committed(1) == 1  # ... yet not committed

    net.recover()
    net.isolate(1)  # (d): S1 crashes
    s5 = net.campaign(5)
    assert s5.role == Role.CANDIDATE and s5.term == 4  # S2, S3 voted for S1 in term 4
    net.campaign(5)
    assert s5.role == Role.LEADER and s5.term == 5
    for i in (2, 3, 4, 5):
        assert net.log_terms(i) == [1, 3, 5]
        assert net.committed(i) == 4
    net.recover()
    net.tick([5])
    assert net.log_terms(1) == [1, 3, 5]  # S1's term-2 and term-4 entries are gone


def test_figure8_current_term_entry_commits_older_ones() -> None:
    """Figure 8 (e): once S1's term-4 entry is on a majority it commits, and the term-2
    entry before it with it; S5 can then no longer be elected."""
    net = _figure8_cluster()
    net.isolate(5)
    net.cut(1, 4)
    s1 = net.elect(1)
    assert net.log_terms(2) == net.log_terms(3) == [1, 2, 4]
    assert net.committed(1) == s1.log.last_index() == 4

    net.recover()
    net.isolate(1)
    s5 = net[5]
    for _ in range(3):
        net.campaign(5)
        assert s5.role != Role.LEADER
    net.recover()
    net.elect(2)
    for i in net.nodes:
        assert net.log_terms(i)[:3] == [1, 2, 4]


@pytest.mark.parametrize("size,down,commits", [
    (3, (), True),
    (3, (3,), True),
    (3, (2, 3), False),
    (5, (4, 5), True),
    (5, (3, 4, 5), False),
])
def test_proposal(size: int, down: tuple[int, ...], commits: bool) -> None:
    """A proposal commits (and is applied everywhere reachable) iff a majority of voters
    stores it (TestProposal)."""
    net = Network.of_size(size)
    lead = net.elect(1)
    for node in down:
        net.isolate(node)
    before = lead.log.committed
    _, _, last = net.propose(1, b"somedata")
    up = [i for i in net.nodes if i not in down]
    for i in up:
        assert net[i].log.last_index() == last
        if commits:
            assert net.committed(i) == last and net.applied_data(i) == [b"somedata"]
        else:
            assert net.applied_data(i) == []
    if not commits:
        assert lead.log.committed == before


def test_proposal_by_follower_is_rejected() -> None:
    """A follower refuses proposals with NotLeader and points at the leader."""
    net = Network.of_size(3)
    net.elect(1)
    with pytest.raises(NotLeader) as exc:
        net[2].propose([b"x"])
    assert exc.value.leader == 1
    assert net[2].log.last_index() == net[1].log.last_index()


def test_single_node_commit_and_read() -> None:
    """A one-voter cluster elects itself when its timer fires, commits on its own durable
    write and answers ReadIndex at once, without sending any message
    (TestSingleNodeCommit)."""
    net = Network([founding_node(1, [1])])
    r = net[1]
    with pytest.raises(NotLeader):
        r.read_index(b"too early")
    net.tick(n=2 * ELECTION_TICKS)
    assert r.role == Role.LEADER and r.term == 2
    net.propose(1, b"a")
    net.propose(1, b"b")
    assert net.applied_data(1) == [b"a", b"b"]
    r.read_index(b"r")
    net.send()
    assert net.storage[1].read_states == [(b"r", r.log.last_index())]
    assert net.sent == []


def test_replication_pipelines_up_to_max_inflight() -> None:
    """A follower in REPLICATE state is sent one append per proposal without waiting for
    acknowledgements, up to max_inflight unacknowledged messages; acks reopen the window."""
    net = Network.of_size(3, max_inflight=3)
    lead = net.elect(1)
    assert lead.prs[2].state == REPLICATE
    before = len(net.emitted(MsgType.APPEND, frm=1, to=2))
    for i in range(5):
        lead.propose([b"p%d" % i])
    net.collect()  # persist and queue the leader's output, deliver nothing
    appends = net.emitted(MsgType.APPEND, frm=1, to=2)[before:]
    assert len(appends) == 3
    assert lead.prs[2].paused()
    for prev, nxt in zip(appends, appends[1:], strict=False):
        assert nxt.index == prev.entries[-1].index  # back to back, no overlap
    net.send()
    last = lead.log.last_index()
    for i in VOTERS3:
        assert net.committed(i) == last
        assert net.applied_data(i) == [b"p%d" % i for i in range(5)]


def test_replication_splits_large_batch_into_pipelined_messages() -> None:
    """One large proposal is sent as several size-limited appends at once, again capped by
    max_inflight."""
    net = Network.of_size(3, max_msg_bytes=1, max_inflight=4)  # one entry per message
    lead = net.elect(1)
    before = len(net.emitted(MsgType.APPEND, frm=1, to=2))
    lead.propose([b"e%d" % i for i in range(10)])
    net.collect()
    appends = net.emitted(MsgType.APPEND, frm=1, to=2)[before:]
    assert [len(m.entries) for m in appends] == [1, 1, 1, 1]
    net.send()
    assert net.applied_data(2) == [b"e%d" % i for i in range(10)]


def test_flow_control_recovers_from_lost_appends() -> None:
    """When every append in a full pipeline is lost, the leader stops sending to that
    follower; the next heartbeat response frees a slot, the follower rejects the gap,
    and the leader probes back from the follower's match and catches it up."""
    net = Network.of_size(3, max_inflight=2)
    lead = net.elect(1)
    losing = [True]
    net.intercept(lambda m: None if losing[0] and m.type == MsgType.APPEND and m.to == 2
                  else m)
    net.propose(1, b"a")
    net.propose(1, b"b")
    assert lead.prs[2].paused()

    losing[0] = False
    sent = len(net.emitted(MsgType.APPEND, frm=1, to=2))
    net.propose(1, b"c")  # commits with node 3; nothing goes to the stalled follower
    assert len(net.emitted(MsgType.APPEND, frm=1, to=2)) == sent
    assert net.committed(1) == lead.log.last_index()
    assert net[2].log.last_index() < lead.log.last_index()

    net.tick([1])
    assert net.log_terms(2) == net.log_terms(1)
    assert net.committed(2) == net.committed(1)
    assert net.applied_data(2) == [b"a", b"b", b"c"]
    assert lead.prs[2].state == REPLICATE


# ====================================================================== snapshots

def _lagging_follower_after_compaction(chunk: int, data: bytes) -> Network:
    """Leader 1 commits entries without node 3, snapshots them away, then appends two
    more entries; node 3 is reconnected but nothing has been delivered to it yet."""
    net = Network.of_size(3, snapshot_chunk_bytes=chunk)
    lead = net.elect(1)
    net.isolate(3)
    for i in range(5):
        net.propose(1, b"e%d" % i)
    snap = net.create_snapshot(1, data)
    assert lead.log.first_index() == snap.meta.index + 1 == lead.log.last_index() + 1
    net.propose(1, b"after-1")
    net.propose(1, b"after-2")
    net.recover()
    return net


def test_snapshot_chunked_catch_up() -> None:
    """A follower behind the leader's compacted log gets the snapshot in
    ceil(size / snapshot_chunk_bytes) chunks, one at a time; heartbeats (and a new
    proposal, committed by the others) keep flowing during the transfer; the follower's
    Ready carries the whole snapshot, and appends then bring it up to date."""
    chunk = 100
    data = bytes(range(256)) * 4 + b"tail"  # 1028 bytes -> 11 chunks
    net = _lagging_follower_after_compaction(chunk, data)
    lead, f = net[1], net[3]
    snap_index = lead.snapshot.meta.index
    term = lead.term

    proposed = committed_during_transfer = False
    for _ in range(200):
        net.tick(deliver=False)  # every node ticks, then one round of delivery
        net.deliver_round()
        chunks = net.delivered(MsgType.SNAPSHOT, to=3)
        if len(chunks) == 5 and not proposed:
            lead.propose([b"during"])
            proposed = True
        if proposed and lead.prs[3].state == SNAPSHOT and lead.log.committed == \
                lead.log.last_index():
            committed_during_transfer = True
        if (net.storage[3].installed and f.log.last_index() == lead.log.last_index()
                and f.log.committed == lead.log.committed):
            break
    net.send()

    chunks = net.emitted(MsgType.SNAPSHOT, frm=1, to=3)
    assert len(chunks) == math.ceil(len(data) / chunk) == 11
    assert [m.offset for m in chunks] == list(range(0, len(data), chunk))
    assert [m.last_chunk for m in chunks] == [False] * 10 + [True]
    assert not net.emitted(MsgType.SNAPSHOT, to=2)

    positions = [i for i, m in enumerate(net.trace) if m.to == 3 and m.type == MsgType.SNAPSHOT]
    between = net.trace[positions[0]:positions[-1]]
    assert any(m.type == MsgType.HEARTBEAT and m.to == 3 for m in between)
    assert any(m.type == MsgType.HEARTBEAT_RESP and m.frm == 3 for m in between)
    assert committed_during_transfer

    (installed,) = net.storage[3].installed
    assert installed.data == data and installed.meta.index == snap_index
    assert net.applied_data(3) == [b"after-1", b"after-2", b"during"]
    assert f.log.last_index() == lead.log.last_index() and f.log.committed == lead.log.committed
    assert net.leaders() == [1] and {net[i].term for i in VOTERS3} == {term}
    assert lead.prs[3].state == REPLICATE


def test_snapshot_lost_chunk_is_resent_after_election_timeout() -> None:
    """If a chunk is lost, the leader resends it (from the last acknowledged offset) once
    the transfer has been idle for election_ticks, and the transfer completes."""
    data = b"x" * 450  # 5 chunks of 100
    net = _lagging_follower_after_compaction(100, data)
    lead = net[1]
    lost: list[Message] = []

    def lose_third_chunk_once(m: Message) -> Message | None:
        if m.type == MsgType.SNAPSHOT and m.offset == 200 and not lost:
            lost.append(m)
            return None
        return m

    net.intercept(lose_third_chunk_once)
    net.tick([1])  # a heartbeat discovers the lagging follower; chunks 0, 100 go through
    assert lost and lead.prs[3].state == SNAPSHOT
    sent = len(net.emitted(MsgType.SNAPSHOT, frm=1, to=3))
    assert sent == 3

    net.tick([1], n=ELECTION_TICKS - 1)
    assert len(net.emitted(MsgType.SNAPSHOT, frm=1, to=3)) == sent  # not yet
    net.tick([1])
    resent = net.emitted(MsgType.SNAPSHOT, frm=1, to=3)[sent]
    assert resent.offset == 200
    assert len(net.emitted(MsgType.SNAPSHOT, frm=1, to=3)) == 6
    assert net.storage[3].installed[-1].data == data
    assert net.applied_data(3) == [b"after-1", b"after-2"]


def test_snapshot_restarts_when_follower_lost_the_beginning() -> None:
    """A follower that restarts mid-transfer has lost the chunks it had; when the next
    chunk arrives it asks for offset 0 and the leader sends the snapshot again from the
    start, so what it installs is the leader's snapshot, byte for byte."""
    data = bytes(range(250)) * 2  # 5 chunks of 100
    net = _lagging_follower_after_compaction(100, data)
    lost: list[Message] = []

    def lose_third_chunk_once(m: Message) -> Message | None:
        if m.type == MsgType.SNAPSHOT and m.offset == 200 and not lost:
            lost.append(m)
            return None
        return m

    net.intercept(lose_third_chunk_once)
    net.tick([1])
    assert lost
    net.restart(3)  # the partial snapshot was only in memory
    net.tick([1], n=ELECTION_TICKS)  # the stalled chunk is resent, to a node that lacks 0..200
    offsets = [m.offset for m in net.emitted(MsgType.SNAPSHOT, frm=1, to=3)]
    assert offsets == [0, 100, 200, 200, 0, 100, 200, 300, 400]
    (installed,) = net.storage[3].installed
    assert installed.data == data
    assert net.applied_data(3) == [b"after-1", b"after-2"]


def test_snapshot_while_replicating() -> None:
    """The leader compacts its log while appends to a follower are still in flight: the
    follower accepts them, and since it needs nothing that was compacted away it is
    never sent a snapshot."""
    net = Network.of_size(3)
    lead = net.elect(1)
    lead.propose([b"a", b"b", b"c"])
    msgs = net.flush(1)
    to3 = [m for m in msgs if m.to == 3]
    assert [m.type for m in to3] == [MsgType.APPEND]

    net.isolate(3)  # hold node 3's copy in flight
    net.send([m for m in msgs if m.to != 3])
    assert lead.log.applied == lead.log.last_index()
    net.create_snapshot(1, b"state-abc")
    assert lead.log.first_index() == lead.log.last_index() + 1

    net.recover()
    net.send(to3)  # the pre-compaction appends arrive now
    net.tick([1])  # the heartbeat carries the commit index
    net.propose(1, b"d")
    assert not net.emitted(MsgType.SNAPSHOT)
    assert net[3].log.last_index() == lead.log.last_index()
    assert net.applied_data(3) == [b"a", b"b", b"c", b"d"]


@pytest.mark.parametrize("keep,snapshots", [(0, 1), (10, 0)])
def test_snapshot_keep_entries(keep: int, snapshots: int) -> None:
    """With keep_entries, a slightly slow follower is caught up with appends from the
    retained entries; without, it needs the snapshot."""
    net = Network.of_size(3)
    net.elect(1)
    net.isolate(3)
    for i in range(5):
        net.propose(1, b"e%d" % i)
    net.create_snapshot(1, b"state", keep_entries=keep)
    net.recover()
    net.tick([1])
    assert len(net.emitted(MsgType.SNAPSHOT, frm=1, to=3)) == snapshots
    assert net[3].log.last_index() == net[1].log.last_index()
    assert net.committed(3) == net.committed(1)


def test_snapshot_transfer_is_not_spliced_across_leaders() -> None:
    """A follower may resume a partially received snapshot only with the rest of the same
    copy. Snapshot data is opaque to the core, and two nodes' snapshots at the same
    (index, term) need not be byte-identical (dtask's node wraps the state machine's
    bytes with an address book learned from logged, not applied, entries). So when
    leadership moves mid-transfer the follower must end up with exactly one node's
    snapshot, never the first leader's first chunks followed by the second's tail."""
    net = Network.of_size(3, snapshot_chunk_bytes=100)
    net.elect(1)
    net.isolate(3)
    for i in range(3):
        net.propose(1, b"e%d" % i)
    net.tick([1])  # node 2 learns the commit index and applies everything too
    snap1 = net.create_snapshot(1, b"A" * 300)
    snap2 = net.create_snapshot(2, b"B" * 300)
    assert (snap1.meta.index, snap1.meta.term) == (snap2.meta.index, snap2.meta.term)

    net.recover()
    net.intercept(lambda m: None if m.type == MsgType.SNAPSHOT and m.frm == 1
                  and m.offset >= 200 else m)
    net.tick([1])  # leader 1 starts the transfer; its third chunk never arrives
    assert [m.offset for m in net.delivered(MsgType.SNAPSHOT, frm=1, to=3)] == [0, 100]

    net[1].transfer_leadership(2)
    net.send()
    assert net.leader() == 2
    net.tick([2])  # the new leader catches 3 up from its own snapshot
    (installed,) = net.storage[3].installed
    got = installed.data
    assert got in (snap1.data, snap2.data), (
        f"installed {got.count(b'A')} bytes of node 1's snapshot + {got.count(b'B')} of "
        f"node 2's")


# ====================================================================== leadership transfer

def test_leader_transfer_to_up_to_date_node() -> None:
    """Transfer to an up-to-date follower: TimeoutNow right away, the transferee campaigns
    at once (no pre-vote, lease overridden) and wins; then transfer back
    (TestLeaderTransferToUpToDateNode)."""
    net = Network.of_size(3)
    lead = net.elect(1)
    lead.transfer_leadership(2)
    net.send()
    assert net.leader() == 2 and net[2].term == 3
    assert lead.role == Role.FOLLOWER and lead.leader == 2
    votes = net.emitted(MsgType.VOTE, frm=2)
    assert votes and all(m.context == CAMPAIGN_TRANSFER for m in votes)
    assert not net.emitted(MsgType.PRE_VOTE, frm=2)

    net[2].transfer_leadership(1)
    net.send()
    assert net.leader() == 1 and lead.term == 4


def test_leader_transfer_to_slow_follower() -> None:
    """Transfer to a lagging follower: the leader first brings it up to date, and sends
    TimeoutNow only once it has acknowledged the leader's last entry
    (TestLeaderTransferToSlowFollower)."""
    net = Network.of_size(3)
    lead = net.elect(1)
    net.isolate(3)
    net.propose(1, b"x")
    net.propose(1, b"y")
    net.recover()
    last = lead.log.last_index()
    assert net[3].log.last_index() < last

    lead.transfer_leadership(3)
    net.send()
    assert net.leader() == 3 and net[3].term == 3
    (pos,) = [i for i, m in enumerate(net.trace) if m.type == MsgType.TIMEOUT_NOW]
    acks = [m for m in net.trace[:pos]
            if m.type == MsgType.APPEND_RESP and m.frm == 3 and not m.reject]
    assert acks and acks[-1].index == last
    assert net.applied_data(3) == [b"x", b"y"]


def test_leader_transfer_after_snapshot() -> None:
    """Transfer to a follower behind the leader's compacted log: the leader sends the
    snapshot first and TimeoutNow only after the follower has installed it
    (TestLeaderTransferAfterSnapshot)."""
    net = Network.of_size(3)
    lead = net.elect(1)
    net.isolate(3)
    net.propose(1, b"x")
    net.create_snapshot(1, b"snap")
    net.recover()
    lead.transfer_leadership(3)
    net.send()
    assert net.leader() == 3 and net[3].term == 3
    kinds = [m.type for m in net.trace if m.to == 3 and m.frm == 1]
    assert MsgType.SNAPSHOT in kinds
    assert kinds.index(MsgType.SNAPSHOT) < kinds.index(MsgType.TIMEOUT_NOW)
    assert net.storage[3].installed[-1].data == b"snap"


def test_leader_transfer_timeout() -> None:
    """A transfer to an unreachable node is abandoned after one election timeout, and the
    leader accepts proposals again (TestLeaderTransferTimeout)."""
    net = Network.of_size(3)
    lead = net.elect(1)
    net.isolate(3)
    lead.transfer_leadership(3)
    net.send()
    assert lead.role == Role.LEADER and lead.lead_transferee == 3

    net.tick([1], n=ELECTION_TICKS - 1)
    assert lead.lead_transferee == 3
    with pytest.raises(NotLeader):
        lead.propose([b"x"])
    net.tick([1])
    assert lead.lead_transferee == 0 and lead.role == Role.LEADER
    net.propose(1, b"x")
    assert net.applied_data(2) == [b"x"]


def test_leader_transfer_ignore_proposal() -> None:
    """While a transfer is pending the leader refuses proposals and membership changes
    with NotLeader (pointing at the transferee) and its log does not grow
    (TestLeaderTransferIgnoreProposal)."""
    net = Network.of_size(3)
    lead = net.elect(1)
    net.isolate(3)  # keep the transfer pending
    lead.transfer_leadership(3)
    net.send()
    last = lead.log.last_index()
    with pytest.raises(NotLeader) as exc:
        lead.propose([b"x"])
    assert exc.value.leader == 3
    with pytest.raises(NotLeader):
        lead.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    assert lead.log.last_index() == last


def test_leader_transfer_to_non_member_or_self() -> None:
    """Transfers to itself, to a non-member or to a learner are refused, and a follower
    cannot start one (TestLeaderTransferToNonMember / ToSelf)."""
    net = Network.of_size(3)
    lead = net.elect(1)
    net.add(empty_node(4))
    net.propose_conf(1, ConfChangeType.ADD_LEARNER, 4)
    for target in (1, 4, 5):
        with pytest.raises(ProposalRejected):
            lead.transfer_leadership(target)
    with pytest.raises(NotLeader):
        net[2].transfer_leadership(3)
    assert lead.lead_transferee == 0
    net.propose(1, b"still leading")
    assert net.leader() == 1 and net.applied_data(2) == [b"still leading"]


# ====================================================================== membership

def test_add_learner() -> None:
    """A new learner is sent a snapshot and the log; it is in everybody's configuration as
    a learner, does not count toward commit, never campaigns, is never asked for a vote,
    and a vote from it would not count."""
    net = Network.of_size(3)
    lead = net.elect(1)
    net.propose(1, b"a")
    net.add(empty_node(4))
    net.propose_conf(1, ConfChangeType.ADD_LEARNER, 4)
    net.tick([1])
    for i in (1, 2, 3, 4):
        assert net[i].conf.voters == (1, 2, 3) and net[i].conf.learners == (4,)
    assert net.applied_data(4) == [b"a"]
    assert len(net.storage[4].installed) == 1  # started from the leader's snapshot

    # It does not count for commit: 1 + learner 4 is no quorum.
    net.cut(1, 2)
    net.cut(1, 3)
    net.propose(1, b"b")
    assert net[4].log.last_index() == lead.log.last_index()
    assert lead.log.committed < lead.log.last_index()
    net.recover()
    net.tick([1])
    assert net.applied_data(4) == [b"a", b"b"]

    # It never campaigns, however long it hears nothing.
    net.isolate(4)
    net.tick([4], n=5 * ELECTION_TICKS)
    assert net[4].role == Role.FOLLOWER and net[4].term == lead.term
    assert not [m for m in net.emitted(frm=4) if m.type in (MsgType.VOTE, MsgType.PRE_VOTE)]

    # Candidates do not ask it, and its vote would not count.
    net.recover()
    net.cut(2, 1)
    net.cut(2, 3)
    c = net.campaign(2, pre=False)
    asked = {m.to for m in net.emitted(MsgType.VOTE, frm=2)}
    assert asked == {1, 3}
    net.send([Message(MsgType.VOTE_RESP, to=2, frm=4, term=c.term)])
    assert c.role == Role.CANDIDATE


def test_learner_counts_for_neither_read_index_nor_check_quorum() -> None:
    """A learner's heartbeat acknowledgements confirm no read and keep no leader alive:
    a leader that only hears from its learner never serves the read and steps down."""
    net = Network.of_size(3)
    lead = net.elect(1)
    net.add(empty_node(4))
    net.propose_conf(1, ConfChangeType.ADD_LEARNER, 4)
    net.cut(1, 2)
    net.cut(1, 3)
    lead.read_index(b"r")
    net.send()
    assert [m.context for m in net.delivered(MsgType.HEARTBEAT_RESP, frm=4)] == [b"r"]
    assert net.storage[1].read_states == []
    net.tick([1], n=2 * ELECTION_TICKS)
    assert net.storage[1].read_states == []
    assert lead.role != Role.LEADER


def test_promote_learner() -> None:
    """Promoting a learner is refused while it lags more than learner_catchup entries
    behind, accepted once it has caught up; then it is a voter everywhere and counts for
    the quorum (3 of 4)."""
    net = Network.of_size(3, learner_catchup=5)
    lead = net.elect(1)
    net.add(empty_node(4, learner_catchup=5))
    net.propose_conf(1, ConfChangeType.ADD_LEARNER, 4)
    net.isolate(4)
    for i in range(10):
        net.propose(1, b"p%d" % i)
    with pytest.raises(ProposalRejected):
        lead.propose_conf_change(ConfChange(ConfChangeType.PROMOTE, 4))

    net.recover()
    net.tick([1])
    assert lead.prs[4].match == lead.log.last_index()
    net.propose_conf(1, ConfChangeType.PROMOTE, 4)
    net.tick([1])
    for i in (1, 2, 3, 4):
        assert net[i].conf.voters == (1, 2, 3, 4) and net[i].conf.learners == ()

    net.isolate(3)
    net.isolate(4)
    net.propose(1, b"needs 3 of 4")
    assert lead.log.committed < lead.log.last_index()
    net.recover()
    net.tick([1])
    assert net.applied_data(4)[-1] == b"needs 3 of 4"


def test_remove_follower_shrinks_quorum() -> None:
    """After voter 4 of 4 is removed, two nodes are a quorum (2 of 3) where before they
    were not (2 of 4), and the removed node is no longer contacted."""
    net = Network.of_size(4)
    lead = net.elect(1)
    net.isolate(3)
    net.isolate(4)
    net.propose(1, b"a")
    assert lead.log.committed < lead.log.last_index()  # 2 of 4

    net.recover()
    net.tick([1])
    assert net.applied_data(1) == [b"a"]
    net.propose_conf(1, ConfChangeType.REMOVE, 4)
    for i in (1, 2, 3):
        assert net[i].conf.voters == (1, 2, 3)
    assert 4 not in lead.prs

    net.isolate(3)
    net.isolate(4)
    net.propose(1, b"b")
    assert lead.log.committed == lead.log.last_index()  # 2 of 3
    sent_to_4 = len(net.emitted(to=4))
    net.recover()
    net.tick([1], n=3)
    assert len(net.emitted(to=4)) == sent_to_4


def test_remove_leader_itself() -> None:
    """A leader removing itself keeps leading while the change is uncommitted (even as
    entries before it commit), counting only the new configuration's voters for commit;
    once the removal commits, it steps down and hands over with TimeoutNow, so another
    node leads at once (no election timeout)."""
    net = Network.of_size(3)
    lead = net.elect(1)
    term = lead.term
    # The entry before the removal reaches everyone, the removal itself nobody.
    net.intercept(lambda m: replace(m, entries=[e for e in m.entries
                                                if e.type != EntryType.CONF_CHANGE]))
    _, _, x_index = lead.propose([b"x"])
    _, index = lead.propose_conf_change(ConfChange(ConfChangeType.REMOVE, 1))
    net.send()
    assert lead.conf.voters == (2, 3)  # in effect as soon as appended
    assert lead.log.committed == x_index < index
    assert lead.role == Role.LEADER

    net.recover()
    net.cut(1, 3)  # now only node 2 gets the removal
    net.tick([1])
    assert net[2].log.last_index() == index
    assert lead.log.committed < index  # 1 and 2 are a majority of the old config only
    assert lead.role == Role.LEADER
    net.propose(1, b"while leaving")

    net.recover()
    net.tick([1])  # a heartbeat reaches 3: the removal commits
    assert lead.role == Role.FOLLOWER
    assert net.emitted(MsgType.TIMEOUT_NOW, frm=1)
    new = net.leader()
    assert new in (2, 3) and net[new].term == term + 1
    for i in (2, 3):
        assert net[i].conf.voters == (2, 3)
        assert net.applied_data(i) == [b"x", b"while leaving"]


def test_only_one_uncommitted_conf_change() -> None:
    """A second membership change is refused while the first is uncommitted, and
    accepted once it commits."""
    net = Network.of_size(3)
    lead = net.elect(1)
    net.add(empty_node(4))
    net.add(empty_node(5))
    net.isolate(1)
    lead.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    net.send()
    with pytest.raises(ProposalRejected):
        lead.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 5))

    net.recover()
    net.tick([1])
    net.propose_conf(1, ConfChangeType.ADD_LEARNER, 5)
    net.tick([1])
    assert net[2].conf.learners == (4, 5)


def test_conf_change_refused_before_leader_commits_in_its_term() -> None:
    """A new leader refuses membership changes until it has committed an entry (its
    no-op) of its own term."""
    net = Network.of_size(3)
    net.ignore(MsgType.APPEND)
    lead = net.elect(1)  # elected, but its no-op reaches nobody
    assert lead.log.committed < lead.log.last_index()
    net.add(empty_node(4))
    with pytest.raises(ProposalRejected):
        lead.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))

    net.recover()
    net.tick([1])
    assert lead.log.committed == lead.log.last_index()
    net.propose_conf(1, ConfChangeType.ADD_LEARNER, 4)
    assert lead.conf.learners == (4,)


def test_truncated_conf_change_rolls_back_configuration() -> None:
    """A membership change takes effect when appended, so when a new leader overwrites
    an uncommitted conf-change entry, the follower (and later the old leader) goes back
    to the previous configuration."""
    net = Network.of_size(5, **CLASSIC)
    lead = net.elect(1)
    for peer in (3, 4, 5):
        net.cut(1, peer)
    _, index = lead.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 6))
    net.send()
    assert net[2].conf.learners == (6,) and lead.conf.learners == (6,)
    assert lead.log.committed < index

    net.recover()
    net.isolate(1)
    net.elect(3)  # 3, 4 and 5 elect node 3; 2 refuses (its log is longer)
    assert net.log_terms(2) == [2, 3]  # the conf-change entry was overwritten
    assert net[2].conf.learners == () and net[2].conf.voters == (1, 2, 3, 4, 5)

    net.recover()
    net.tick([3])
    assert lead.role == Role.FOLLOWER and net.log_terms(1) == [2, 3]
    assert lead.conf.learners == ()


# ====================================================================== ReadIndex

def test_read_index_confirmed_after_heartbeat_quorum() -> None:
    """read_index on the leader yields (ctx, commit index) only once a quorum (3 of 5,
    counting itself) acknowledged a heartbeat round carrying ctx; one acknowledgement
    is not enough, two down followers do not matter."""
    net = Network.of_size(5)
    lead = net.elect(1)
    net.propose(1, b"a")
    commit = lead.log.committed
    lead.read_index(b"ctx1")
    msgs = net.flush(1)
    assert net.storage[1].read_states == []
    heartbeats = [m for m in msgs if m.type == MsgType.HEARTBEAT]
    assert {m.to for m in heartbeats} == {2, 3, 4, 5}
    assert all(m.context == b"ctx1" for m in heartbeats)

    for node in (3, 4, 5):
        net.isolate(node)
    net.send(msgs)
    assert [m.frm for m in net.delivered(MsgType.HEARTBEAT_RESP)
            if m.context == b"ctx1"] == [2]
    assert net.storage[1].read_states == []

    net.recover()
    net.isolate(4)
    net.isolate(5)
    net.tick([1])  # the next heartbeat carries ctx1 again; 2 and 3 acknowledge it
    assert net.storage[1].read_states == [(b"ctx1", commit)]


def test_read_index_on_follower_raises_not_leader() -> None:
    """A follower cannot serve ReadIndex: NotLeader with the leader as hint."""
    net = Network.of_size(3)
    net.elect(1)
    with pytest.raises(NotLeader) as exc:
        net[2].read_index(b"x")
    assert exc.value.leader == 1


@pytest.mark.parametrize("check_quorum", [True, False])
def test_read_index_isolated_leader_never_confirms(check_quorum: bool) -> None:
    """A leader cut off from the quorum never confirms a read, even while the others elect
    a new leader and commit writes it does not know about."""
    net = Network.of_size(3, check_quorum=check_quorum)
    lead = net.elect(1)
    net.isolate(1)
    lead.read_index(b"stale?")
    net.send()
    net.tick(n=4 * ELECTION_TICKS)
    new = max(net.leaders(), key=lambda i: net[i].term)
    assert new != 1
    net.propose(new, b"newer write")
    net.tick([1], n=ELECTION_TICKS)
    assert net.storage[1].read_states == []
    if check_quorum:
        assert lead.role != Role.LEADER and lead.term == 2  # stepped down, pre-votes since


def test_read_index_delayed_until_first_commit_of_term() -> None:
    """A new leader holds reads until its no-op commits (it cannot know the commit index
    before that); then it confirms them with an index at least the no-op's."""
    net = Network.of_size(3)
    net.ignore(MsgType.APPEND)
    lead = net.elect(1)
    lead.read_index(b"early")
    net.send()
    net.tick([1], n=3)  # heartbeats are acknowledged, but nothing is committed
    assert lead.log.committed < lead.log.last_index()
    assert net.storage[1].read_states == []

    net.recover()
    net.tick([1])
    noop = lead.log.last_index()
    assert lead.log.committed == noop
    assert net.storage[1].read_states == [(b"early", noop)]


def test_read_index_retried_by_next_heartbeat() -> None:
    """If the heartbeats of a read round are lost, the next periodic heartbeat carries the
    round's context again and confirms it."""
    net = Network.of_size(3)
    lead = net.elect(1)
    net.ignore(MsgType.HEARTBEAT)
    lead.read_index(b"r")
    net.send()
    assert net.storage[1].read_states == []
    net.recover()
    net.tick([1])
    assert net.storage[1].read_states == [(b"r", lead.log.committed)]


def test_read_index_leader_removing_itself_still_needs_quorum() -> None:
    """ReadIndex may skip the heartbeat round only when the leader is its configuration's
    single voter. A leader that appended its own removal from {1, 2} has configuration
    {2}: it must still hear from node 2 before confirming a read. Here node 2 stored
    the removal, was cut off, timed out, became leader of term 3 on its own (as the
    only voter) and committed a newer write, while node 1 still leads term 2 (its
    check-quorum has not fired yet): confirming the read immediately would return
    state that misses that write."""
    net = Network.of_size(2)
    lead = net.elect(1)
    net.propose(1, b"old")
    net.ignore(MsgType.APPEND_RESP)  # node 2 stores the removal; node 1 never hears so
    lead.propose_conf_change(ConfChange(ConfChangeType.REMOVE, 1))
    net.send()
    assert lead.conf.voters == net[2].conf.voters == (2,)
    assert lead.role == Role.LEADER and lead.log.committed < lead.log.last_index()

    net.recover()
    net.isolate(1)
    for _ in range(2 * ELECTION_TICKS):  # both clocks run in lockstep
        net.tick([1, 2])
        if net[2].role == Role.LEADER:
            break
    assert net[2].role == Role.LEADER and net[2].term == 3
    assert lead.role == Role.LEADER and lead.term == 2
    net.propose(2, b"new")
    assert net.applied_data(2) == [b"old", b"new"]

    lead.read_index(b"r")
    net.send()
    assert net.storage[1].read_states == []
