"""The fold from ansible-runner events to hotsite provision's progress lines and summary."""

from __future__ import annotations

from provisioning.runner import Progress


def ev(kind: str, host: str = "", task: str = "", **data: object) -> dict:
    return {"event": kind, "event_data": {"host": host, "task": task, **data}}


def test_changed_failed_and_unreachable_hosts_are_counted_and_named() -> None:
    p = Progress()
    lines = [
        p.feed(ev("playbook_on_play_start", play="Install the hotsite appliance")),
        p.feed(ev("runner_on_ok", "a", "Create user", res={"changed": True})),
        p.feed(ev("runner_on_ok", "a", "Write config", res={"changed": False})),
        p.feed(ev("runner_on_ok", "b", "Create user", res={"changed": False})),
        p.feed(ev("runner_on_failed", "b", "Write config", res={"msg": "failed to validate\nmore"})),
        p.feed(ev("runner_on_failed", "a", "Probe", ignore_errors=True, res={"msg": "x"})),
        p.feed(
            ev("runner_on_unreachable", "c", "Gathering Facts", res={"msg": "ssh: connect to host c port 22"})
        ),
        p.feed(ev("runner_on_skipped", "a", "Start hotsite")),
        p.feed(ev("verbose")),
    ]
    statuses = [(line.status, line.host) if line else None for line in lines]
    assert statuses == [
        ("play", ""),
        ("changed", "a"),
        ("ok", "a"),
        ("ok", "b"),
        ("failed", "b"),
        ("ok", "a"),
        ("unreachable", "c"),
        ("skipped", "a"),
        None,
    ]
    assert p.changed_hosts == ["a"]
    assert p.failed
    s = p.summary()
    assert s["hosts"]["a"] == {
        "ok": 2,
        "changed": 1,
        "failed": 0,
        "unreachable": 0,
        "skipped": 1,
        "changed_tasks": ["Create user"],
        "errors": [],
    }
    assert s["hosts"]["b"]["errors"] == ["Write config: failed to validate"]
    assert s["hosts"]["c"]["unreachable"] == 1
    assert s["ok"] is False


def test_the_final_stats_event_is_authoritative_and_ok_excludes_changed() -> None:
    p = Progress()
    p.feed(ev("runner_on_ok", "a", "t", res={"changed": True}))
    p.feed(
        ev(
            "playbook_on_stats",
            ok={"a": 20, "b": 5},
            changed={"a": 3},
            failures={},
            dark={},
            skipped={"b": 2},
        )
    )
    assert p.stats_seen
    assert (p.hosts["a"].ok, p.hosts["a"].changed) == (17, 3)
    assert (p.hosts["b"].ok, p.hosts["b"].changed, p.hosts["b"].skipped) == (5, 0, 2)
    assert p.changed_hosts == ["a"]
    assert not p.failed


def test_a_second_run_without_changes_reports_no_changed_host() -> None:
    p = Progress()
    for task in ("Create user", "Write config", "Install unit"):
        p.feed(ev("runner_on_ok", "a", task, res={"changed": False}))
    assert p.changed_hosts == []
    assert p.summary()["ok"] is True
