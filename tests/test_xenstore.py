"""The xenstore store: tree, Xen permissions, transactions, watches, quotas, counters, domain life."""

from __future__ import annotations

import pytest

from pvio.xenstore.store import XSD_ERRORS, Quota, Store, StoreConnection, XenstoreError, canonical_path

BE = "/local/domain/0/backend/vif/1/0"
FE = "/local/domain/1/device/vif/0"


def errno_of(fn: object, *args: object, **kwargs: object) -> str:
    """Call ``fn`` and return the errno name of the XenstoreError it must raise."""
    assert callable(fn)
    with pytest.raises(XenstoreError) as info:
        fn(*args, **kwargs)
    return info.value.errno


@pytest.fixture
def store() -> Store:
    s = Store()
    for domid in (0, 1, 2):
        s.introduce_domain(domid)
    return s


@pytest.fixture
def dom0(store: Store) -> StoreConnection:
    return store.connect(0)


@pytest.fixture
def dom1(store: Store) -> StoreConnection:
    return store.connect(1)


@pytest.fixture
def dom2(store: Store) -> StoreConnection:
    return store.connect(2)


# -- the tree ------------------------------------------------------------------------------------


def test_fresh_store_has_root_local_and_domain_owned_by_dom0() -> None:
    conn = Store().connect(0)
    assert conn.directory("/") == ["local"]
    assert conn.directory("/local") == ["domain"]
    assert conn.directory("/local/domain") == []
    assert conn.get_perms("/local/domain") == ["n0"]


def test_introduce_creates_home_owned_by_the_domain_readable_by_dom0(
    store: Store, dom0: StoreConnection, dom2: StoreConnection
) -> None:
    assert dom0.directory("/local/domain") == ["0", "1", "2"]
    assert dom0.get_perms("/local/domain/1") == ["n1", "r0"]
    assert errno_of(dom2.directory, "/local/domain/1") == "EACCES"
    assert errno_of(store.introduce_domain, 1) == "EEXIST"


def test_write_creates_missing_parents_empty_with_inherited_perms(dom1: StoreConnection) -> None:
    dom1.write("a/b/c", b"v")
    assert dom1.read("a/b/c") == b"v"
    assert dom1.read("a") == b""
    assert dom1.directory("a") == ["b"]
    assert dom1.get_perms("a/b") == ["n1", "r0"]
    assert dom1.get_perms("a/b/c") == ["n1", "r0"]


def test_unprivileged_creator_becomes_owner_of_inherited_perms(
    dom0: StoreConnection, dom2: StoreConnection
) -> None:
    dom0.mkdir("/shared")
    dom0.set_perms("/shared", ["r0", "w2", "r1"])
    dom2.write("/shared/x", "2")
    assert dom2.get_perms("/shared/x") == ["r2", "w2", "r1"]


def test_dom0_created_node_keeps_the_parents_owner(dom0: StoreConnection) -> None:
    dom0.write("/local/domain/1/x", "from dom0")
    assert dom0.get_perms("/local/domain/1/x") == ["n1", "r0"]


def test_relative_paths_resolve_against_the_callers_home(
    dom0: StoreConnection, dom1: StoreConnection
) -> None:
    dom1.write("name", "guest")
    assert dom0.read("/local/domain/1/name") == b"guest"
    assert dom0.get_domain_path(1) == "/local/domain/1"
    assert canonical_path(7, "device/vif") == "/local/domain/7/device/vif"


def test_read_missing_node_is_enoent_but_eacces_under_an_unreadable_parent(
    dom1: StoreConnection, dom2: StoreConnection
) -> None:
    assert errno_of(dom1.read, "nothing/here") == "ENOENT"
    assert errno_of(dom2.read, "/local/domain/1/nothing") == "EACCES"


def test_str_value_is_stored_as_utf8(dom1: StoreConnection) -> None:
    dom1.write("name", "héllo")
    assert dom1.read("name") == "héllo".encode()


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/a/",
        "//a",
        "/a//b",
        "/a b",
        "/caf\u00e9",
        "a\0b",
        "/a.b",
        "/" + "x" * 3072,
        "x" * 2049,
        "/local/domain/1/" + "x" * 2049,
    ],
)
def test_invalid_paths_are_einval(dom0: StoreConnection, path: str) -> None:
    assert errno_of(dom0.write, path, b"") == "EINVAL"


def test_path_length_limits_are_inclusive(dom0: StoreConnection, dom1: StoreConnection) -> None:
    absolute = "/" + "x" * 3071
    dom0.write(absolute, "abs")
    assert dom0.read(absolute) == b"abs"
    relative = "y" * 2048
    dom1.write(relative, "rel")
    assert dom1.read(relative) == b"rel"


def test_mkdir_makes_an_empty_node_and_is_ok_when_it_exists(dom1: StoreConnection) -> None:
    dom1.write("d", "keep")
    dom1.mkdir("d")
    assert dom1.read("d") == b"keep"
    dom1.mkdir("e/f")
    assert dom1.read("e/f") == b""


def test_rm_removes_the_subtree(dom1: StoreConnection) -> None:
    dom1.write("a/b/c", "1")
    dom1.write("a/d", "2")
    dom1.write("z", "3")
    dom1.rm("a")
    assert dom1.directory("/local/domain/1") == ["z"]
    assert errno_of(dom1.read, "a/b/c") == "ENOENT"


def test_rm_of_absent_node_is_ok_but_an_absent_parent_is_enoent(dom1: StoreConnection) -> None:
    dom1.rm("absent")
    assert errno_of(dom1.rm, "absent/child") == "ENOENT"


def test_rm_of_root_is_einval(dom0: StoreConnection) -> None:
    assert errno_of(dom0.rm, "/") == "EINVAL"


def test_directory_lists_children_in_creation_order(dom1: StoreConnection) -> None:
    for name in ("c", "a", "b"):
        dom1.write(f"dir/{name}", "")
    dom1.rm("dir/a")
    dom1.write("dir/a", "")
    assert dom1.directory("dir") == ["c", "b", "a"]


def test_every_errno_name_is_from_xsd_errors() -> None:
    with pytest.raises(ValueError, match="not a xenstore errno"):
        XenstoreError("ENOTDIR")
    assert len(XSD_ERRORS) == 16


# -- permissions ---------------------------------------------------------------------------------


def test_default_entry_applies_to_unlisted_domains(
    dom1: StoreConnection, dom2: StoreConnection, store: Store
) -> None:
    dom1.write("pub", "x")
    dom1.set_perms("pub", ["r1"])
    pub = "/local/domain/1/pub"
    assert dom2.read(pub) == b"x"  # no traversal right is needed on the unreadable parent
    assert errno_of(dom2.write, pub, "y") == "EACCES"
    dom1.set_perms("pub", ["b1"])
    dom2.write(pub, "y")
    assert dom1.read("pub") == b"y"


def test_explicit_entry_overrides_the_default(dom1: StoreConnection, dom2: StoreConnection) -> None:
    dom1.write("k", "x")
    dom1.set_perms("k", ["b1", "n2"])
    assert errno_of(dom2.read, "/local/domain/1/k") == "EACCES"


def test_owner_has_full_access_whatever_the_entries_say(dom1: StoreConnection) -> None:
    dom1.write("mine", "x")
    dom1.set_perms("mine", ["n1", "n1"])
    dom1.write("mine", "y")
    assert dom1.read("mine") == b"y"


def test_dom0_reads_and_writes_everywhere(dom0: StoreConnection, dom1: StoreConnection) -> None:
    dom1.write("secret", "x")
    dom1.set_perms("secret", ["n1"])
    assert dom0.read("/local/domain/1/secret") == b"x"
    dom0.write("/local/domain/1/secret", "y")
    assert dom1.read("secret") == b"y"


def test_only_the_owner_sets_perms_even_with_write_access(
    dom1: StoreConnection, dom2: StoreConnection
) -> None:
    dom1.write("shared", "x")
    dom1.set_perms("shared", ["n1", "b2"])
    dom2.write("/local/domain/1/shared", "by dom2")
    assert errno_of(dom2.set_perms, "/local/domain/1/shared", ["b1"]) == "EACCES"


def test_only_dom0_changes_the_owner(dom0: StoreConnection, dom1: StoreConnection) -> None:
    dom1.write("node", "x")
    assert errno_of(dom1.set_perms, "node", ["n2"]) == "EPERM"
    dom0.set_perms("/local/domain/1/node", ["n2", "r1"])
    assert dom0.get_perms("/local/domain/1/node") == ["n2", "r1"]
    assert errno_of(dom1.write, "node", "y") == "EACCES"


@pytest.mark.parametrize("perms", [[], ["x1"], ["r"], ["r-1"], ["r70000"], ["1r"], ["r\u0661"]])
def test_malformed_perms_are_einval(dom0: StoreConnection, perms: list[str]) -> None:
    dom0.write("/n", "")
    assert errno_of(dom0.set_perms, "/n", perms) == "EINVAL"


def test_get_perms_needs_read_access(dom1: StoreConnection, dom2: StoreConnection) -> None:
    dom1.write("hidden", "")
    assert errno_of(dom2.get_perms, "/local/domain/1/hidden") == "EACCES"


def build_vif(toolstack: StoreConnection, backend: int, frontend: int) -> tuple[str, str]:
    """Write a vif's two directories with libxl's permissions; return (backend dir, frontend dir)."""
    be = f"/local/domain/{backend}/backend/vif/{frontend}/0"
    fe = f"/local/domain/{frontend}/device/vif/0"
    for key, value in {"frontend": fe, "frontend-id": str(frontend), "online": "1", "state": "1"}.items():
        toolstack.write(f"{be}/{key}", value)
    for key, value in {
        "backend": be,
        "backend-id": str(backend),
        "state": "1",
        "mac": "00:16:3e:00:00:01",
    }.items():
        toolstack.write(f"{fe}/{key}", value)
    for path in (be, *(f"{be}/{k}" for k in toolstack.directory(be))):
        toolstack.set_perms(path, [f"n{backend}", f"r{frontend}"])
    for path in (fe, *(f"{fe}/{k}" for k in toolstack.directory(fe))):
        toolstack.set_perms(path, [f"n{frontend}", f"r{backend}"])
    return be, fe


def test_each_side_of_a_device_reads_but_cannot_write_the_other_side(
    store: Store, dom0: StoreConnection, dom1: StoreConnection, dom2: StoreConnection
) -> None:
    be, fe = build_vif(dom0, backend=0, frontend=1)
    assert be == BE and fe == FE
    # The frontend reads the backend's directory but cannot write, create or remove there.
    assert dom1.read(f"{BE}/state") == b"1"
    assert dom1.directory(BE) == ["frontend", "frontend-id", "online", "state"]
    assert errno_of(dom1.write, f"{BE}/state", "4") == "EACCES"
    assert errno_of(dom1.write, f"{BE}/new-key", "1") == "EACCES"
    assert errno_of(dom1.rm, f"{BE}/online") == "EACCES"
    # Its own directory is its own.
    dom1.write(f"{FE}/state", "4")
    dom1.write(f"{FE}/tx-ring-ref", "8")
    assert dom0.read(f"{FE}/tx-ring-ref") == b"8"
    # A third domain sees neither side.
    assert errno_of(dom2.read, f"{BE}/state") == "EACCES"
    assert errno_of(dom2.read, f"{FE}/state") == "EACCES"


def test_with_a_driver_domain_backend_neither_side_writes_the_other(
    dom0: StoreConnection, dom1: StoreConnection, dom2: StoreConnection
) -> None:
    be, fe = build_vif(dom0, backend=2, frontend=1)
    assert dom2.read(f"{fe}/mac") == b"00:16:3e:00:00:01"
    assert dom1.read(f"{be}/online") == b"1"
    assert errno_of(dom2.write, f"{fe}/state", "5") == "EACCES"
    assert errno_of(dom1.write, f"{be}/state", "5") == "EACCES"
    dom2.write(f"{be}/state", "2")
    dom1.write(f"{fe}/state", "4")
    assert (dom1.read(f"{be}/state"), dom2.read(f"{fe}/state")) == (b"2", b"4")


# -- transactions --------------------------------------------------------------------------------


def test_transaction_writes_are_private_until_commit(dom1: StoreConnection, dom0: StoreConnection) -> None:
    dom1.write("x", "old")
    tx = dom1.transaction_start()
    dom1.write("x", "new", tx)
    dom1.write("y/z", "created", tx)
    assert dom1.read("x", tx) == b"new"
    assert dom1.directory("y", tx) == ["z"]
    assert dom0.read("/local/domain/1/x") == b"old"
    assert errno_of(dom0.read, "/local/domain/1/y/z") == "ENOENT"
    dom1.transaction_end(tx)
    assert dom0.read("/local/domain/1/x") == b"new"
    assert dom0.read("/local/domain/1/y/z") == b"created"


def test_commit_fails_with_eagain_when_a_written_node_changed(
    dom1: StoreConnection, dom0: StoreConnection
) -> None:
    dom1.write("x", "0")
    tx = dom1.transaction_start()
    dom1.write("x", "tx", tx)
    dom1.write("other", "tx", tx)
    dom0.write("/local/domain/1/x", "outside")
    assert errno_of(dom1.transaction_end, tx) == "EAGAIN"
    assert dom1.read("x") == b"outside"
    assert errno_of(dom1.read, "other") == "ENOENT"


def test_commit_fails_with_eagain_when_a_read_node_changed(dom1: StoreConnection) -> None:
    dom1.write("x", "0")
    tx = dom1.transaction_start()
    assert dom1.read("x", tx) == b"0"
    dom1.write("y", "1", tx)
    dom1.write("x", "changed")
    assert errno_of(dom1.transaction_end, tx) == "EAGAIN"


def test_commit_fails_when_a_node_read_as_absent_appears(dom1: StoreConnection) -> None:
    tx = dom1.transaction_start()
    assert errno_of(dom1.read, "late", tx) == "ENOENT"
    dom1.write("late", "here")
    assert errno_of(dom1.transaction_end, tx) == "EAGAIN"


def test_transactions_on_disjoint_existing_nodes_both_commit(dom1: StoreConnection) -> None:
    dom1.write("a", "0")
    dom1.write("b", "0")
    t1 = dom1.transaction_start()
    t2 = dom1.transaction_start()
    dom1.write("a", "1", t1)
    dom1.write("b", "2", t2)
    dom1.transaction_end(t1)
    dom1.transaction_end(t2)
    assert (dom1.read("a"), dom1.read("b")) == (b"1", b"2")


def test_creating_siblings_in_two_transactions_conflicts_on_the_parent(dom1: StoreConnection) -> None:
    dom1.mkdir("dir")
    t1 = dom1.transaction_start()
    t2 = dom1.transaction_start()
    dom1.write("dir/a", "1", t1)
    dom1.write("dir/b", "2", t2)
    dom1.transaction_end(t1)
    assert errno_of(dom1.transaction_end, t2) == "EAGAIN"
    assert dom1.directory("dir") == ["a"]


def test_abort_discards_everything(dom1: StoreConnection) -> None:
    tx = dom1.transaction_start()
    dom1.write("gone", "1", tx)
    dom1.transaction_end(tx, commit=False)
    assert errno_of(dom1.read, "gone") == "ENOENT"


def test_rm_inside_a_transaction(dom1: StoreConnection) -> None:
    dom1.write("t/u/v", "1")
    tx = dom1.transaction_start()
    dom1.rm("t/u", tx)
    assert errno_of(dom1.read, "t/u/v", tx) == "ENOENT"
    assert dom1.read("t/u/v") == b"1"
    dom1.transaction_end(tx)
    assert dom1.directory("t") == []


def test_a_transaction_id_is_only_valid_on_its_connection_and_until_it_ends(
    store: Store, dom1: StoreConnection
) -> None:
    other = store.connect(1)
    tx = dom1.transaction_start()
    assert errno_of(other.read, "x", tx) == "ENOENT"
    assert errno_of(other.transaction_end, tx) == "ENOENT"
    dom1.write("x", "2", tx)
    dom1.write("x", "1")
    assert errno_of(dom1.transaction_end, tx) == "EAGAIN"
    assert errno_of(dom1.transaction_end, tx) == "ENOENT"
    assert errno_of(dom1.read, "x", 12345) == "ENOENT"


# -- watches -------------------------------------------------------------------------------------


def test_watch_fires_once_on_registration(dom1: StoreConnection) -> None:
    dom1.watch("/local/domain/1/device", "tok")
    assert dom1.take_events() == [("/local/domain/1/device", "tok")]
    assert dom1.take_events() == []


def test_watch_fires_on_changes_at_and_below_but_not_beside_or_above(dom1: StoreConnection) -> None:
    dom1.write("dev/x", "")
    dom1.watch("/local/domain/1/dev/x", "t")
    dom1.take_events()
    dom1.write("dev/x", "1")
    dom1.write("dev/x/deep/er", "2")
    dom1.write("dev/y", "3")
    dom1.write("dev", "4")
    dom1.write("dev/xx", "5")
    assert dom1.take_events() == [
        ("/local/domain/1/dev/x", "t"),
        ("/local/domain/1/dev/x/deep/er", "t"),
    ]


def test_relative_watches_report_relative_paths(dom1: StoreConnection) -> None:
    dom1.watch("device", "rel")
    dom1.write("device/vif/0/state", "1")
    assert dom1.take_events() == [("device", "rel"), ("device/vif/0/state", "rel")]


def test_every_watch_of_every_connection_fires_in_registration_order(
    dom0: StoreConnection, dom1: StoreConnection
) -> None:
    dom0.watch("/local/domain/1", "a")
    dom0.watch("/local/domain/1/k", "b")
    dom1.watch("k", "c")
    dom0.take_events()
    dom1.take_events()
    dom1.write("k", "v")
    assert dom0.take_events() == [("/local/domain/1/k", "a"), ("/local/domain/1/k", "b")]
    assert dom1.take_events() == [("k", "c")]


def test_rm_fires_watches_above_on_and_exactly_on_removed_descendants(dom1: StoreConnection) -> None:
    dom1.write("a/b/c", "1")
    dom1.watch("a", "on-top")
    dom1.watch("a/b/c", "on-child")
    dom1.watch("a/b/nonexistent", "on-absent")
    dom1.take_events()
    dom1.rm("a")
    assert sorted(dom1.take_events()) == [("a", "on-top"), ("a/b/c", "on-child")]


def test_mkdir_of_existing_node_fires_nothing(dom1: StoreConnection) -> None:
    dom1.mkdir("d")
    dom1.watch("d", "t")
    dom1.take_events()
    dom1.mkdir("d")
    assert dom1.take_events() == []


def test_transaction_changes_fire_at_commit_once_per_node(dom1: StoreConnection) -> None:
    dom1.watch("w", "t")
    dom1.take_events()
    tx = dom1.transaction_start()
    dom1.write("w/a", "1", tx)
    dom1.write("w/a", "2", tx)
    dom1.write("w/b", "3", tx)
    assert dom1.take_events() == []
    dom1.transaction_end(tx)
    assert dom1.take_events() == [("w/a", "t"), ("w/b", "t")]


def test_aborted_or_failed_transactions_fire_nothing(dom1: StoreConnection) -> None:
    dom1.write("w/a", "0")
    dom1.watch("w", "t")
    tx = dom1.transaction_start()
    dom1.write("w/b", "1", tx)
    dom1.transaction_end(tx, commit=False)
    tx = dom1.transaction_start()
    dom1.write("w/a", "1", tx)
    dom1.write("w/a", "outside")
    dom1.take_events()
    assert errno_of(dom1.transaction_end, tx) == "EAGAIN"
    assert dom1.take_events() == []


def test_duplicate_watch_is_eexist_and_unknown_unwatch_is_enoent(dom1: StoreConnection) -> None:
    dom1.watch("p", "t")
    assert errno_of(dom1.watch, "/local/domain/1/p", "t") == "EEXIST"
    dom1.watch("p", "t2")
    assert errno_of(dom1.unwatch, "p", "nope") == "ENOENT"


def test_unwatch_stops_events(dom1: StoreConnection) -> None:
    dom1.watch("p", "t")
    dom1.unwatch("p", "t")
    dom1.take_events()
    dom1.write("p", "1")
    assert dom1.take_events() == []


def test_watch_events_only_reach_domains_that_may_read_the_node(
    dom1: StoreConnection, dom2: StoreConnection
) -> None:
    dom1.write("dev/state", "1")
    dom1.set_perms("dev/state", ["n1"])
    dom2.watch("/local/domain/1/dev", "spy")
    assert dom2.take_events() == [("/local/domain/1/dev", "spy")]  # registration fires regardless
    dom1.write("dev/state", "2")
    dom1.write("dev/other", "x")  # inherits dev's perms: n1, r0
    assert dom2.take_events() == []
    dom1.set_perms("dev/state", ["n1", "r2"])
    dom1.write("dev/state", "3")
    assert dom2.take_events() == [("/local/domain/1/dev/state", "spy"), ("/local/domain/1/dev/state", "spy")]


def test_perms_change_is_announced_to_domains_that_lose_read(
    dom1: StoreConnection, dom2: StoreConnection
) -> None:
    dom1.write("k", "1")
    dom1.set_perms("k", ["r1"])
    dom2.watch("/local/domain/1/k", "t")
    dom2.take_events()
    dom1.set_perms("k", ["n1"])
    dom1.write("k", "2")
    assert dom2.take_events() == [("/local/domain/1/k", "t")]


def test_special_watches_fire_for_dom0_and_only_permitted_domains(store: Store) -> None:
    dom0 = store.connect(0)
    dom1 = store.connect(1)
    dom0.watch("@introduceDomain", "intro")
    dom0.watch("@releaseDomain", "release")
    dom1.watch("@releaseDomain", "guest")
    assert dom1.take_events() == [("@releaseDomain", "guest")]
    dom0.take_events()
    store.introduce_domain(5)
    store.release_domain(5)
    assert dom0.take_events() == [("@introduceDomain", "intro"), ("@releaseDomain", "release")]
    assert dom1.take_events() == []
    dom0.set_perms("@releaseDomain", ["n0", "r1"])
    assert dom1.get_perms("@releaseDomain") == ["n0", "r1"]
    store.introduce_domain(6)
    store.release_domain(6)
    assert dom1.take_events() == [("@releaseDomain", "guest")]


def test_a_callback_may_reenter_the_store_and_events_keep_their_order(store: Store) -> None:
    seen: list[tuple[str, str]] = []

    def react(path: str, token: str) -> None:
        seen.append((path, token))
        reactor.write("/local/domain/1/pong", "1")  # from inside the store's delivery

    reactor = store.connect(0, react)
    observer = store.connect(1)
    reactor.watch("/local/domain/1/ping", "r")
    observer.watch("ping", "o1")
    observer.watch("pong", "o2")
    observer.take_events()
    observer.write("ping", "1")
    assert seen == [("/local/domain/1/ping", "r"), ("/local/domain/1/ping", "r")]
    assert observer.take_events() == [("ping", "o1"), ("pong", "o2")]


# -- quotas --------------------------------------------------------------------------------------


def test_node_quota_counts_created_parents_and_is_enospc() -> None:
    store = Store(Quota(nodes=4))
    store.introduce_domain(1)  # the home is node 1
    dom1 = store.connect(1)
    assert errno_of(dom1.write, "a/b/c/d", "") == "ENOSPC"
    assert store.counters(1)["nodes"] == 1
    dom1.write("a/b/c", "")
    assert store.counters(1)["nodes"] == 4
    assert errno_of(dom1.write, "x", "") == "ENOSPC"
    dom1.write("a/b/c", "rewriting is free")
    dom1.rm("a/b")
    dom1.write("x", "")
    assert store.counters(1)["nodes"] == 3


def test_node_quota_is_checked_again_at_commit() -> None:
    store = Store(Quota(nodes=5))
    store.introduce_domain(1)
    dom1 = store.connect(1)
    dom1.mkdir("t")
    dom1.mkdir("o")
    tx = dom1.transaction_start()
    dom1.write("t/1", "", tx)  # 4 of 5 as seen from the transaction
    dom1.write("o/1", "")
    dom1.write("o/2", "")  # 5 of 5: the transaction's node no longer fits, without any conflict
    assert errno_of(dom1.transaction_end, tx) == "ENOSPC"
    assert dom1.directory("t") == []


def test_dom0_is_not_limited_by_node_quota() -> None:
    store = Store(Quota(nodes=2))
    dom0 = store.connect(0)
    for i in range(5):
        dom0.write(f"/tool/n{i}", "")
    assert len(dom0.directory("/tool")) == 5


def test_watch_quota_is_e2big() -> None:
    store = Store(Quota(watches=2))
    dom1 = store.connect(1)
    dom1.watch("a", "1")
    dom1.watch("b", "2")
    assert errno_of(dom1.watch, "c", "3") == "E2BIG"
    dom1.unwatch("a", "1")
    dom1.watch("c", "3")


def test_transaction_quota_is_enospc_and_freed_by_ending() -> None:
    store = Store(Quota(transactions=2))
    dom1 = store.connect(1)
    first = dom1.transaction_start()
    dom1.transaction_start()
    assert errno_of(dom1.transaction_start) == "ENOSPC"
    dom1.transaction_end(first, commit=False)
    dom1.transaction_start()
    assert store.counters(1)["transactions"] == 2


def test_value_size_limit_is_e2big_for_everyone(dom0: StoreConnection, dom1: StoreConnection) -> None:
    dom1.write("big", b"x" * 4096)
    assert errno_of(dom1.write, "big", b"x" * 4097) == "E2BIG"
    assert errno_of(dom0.write, "/big", b"x" * 4097) == "E2BIG"


def test_per_domain_quota_override(store: Store, dom1: StoreConnection, dom2: StoreConnection) -> None:
    store.set_quota(2, Quota(watches=0))
    dom1.watch("a", "t")
    assert errno_of(dom2.watch, "a", "t") == "E2BIG"


# -- counters ------------------------------------------------------------------------------------


def test_counters_count_requests_errors_and_watch_events_exactly(store: Store) -> None:
    dom1 = store.connect(1)
    dom2 = store.connect(2)
    dom1.write("a", "1")
    dom1.read("a")
    errno_of(dom1.read, "missing")
    errno_of(dom1.read, "/bad//path")
    dom1.watch("a", "t")
    dom2.watch("/local/domain/1/a", "spy")  # registration event only; dom2 cannot read a
    dom1.write("a", "2")
    tx = dom1.transaction_start()
    dom1.write("a", "3", tx)
    dom1.transaction_end(tx)
    assert store.counters(1) == {
        "requests": {"READ": 3, "TRANSACTION_END": 1, "TRANSACTION_START": 1, "WATCH": 1, "WRITE": 3},
        "errors": {"EINVAL": 1, "ENOENT": 1},
        "watch_events": 3,
        "watch_events_dropped": 0,
        "watch_events_coalesced": 0,
        "watch_events_shed": 0,
        "disconnects": {},
        "nodes": 2,
        "watches": 1,
        "transactions": 0,
    }
    assert store.counters(2)["requests"] == {"WATCH": 1}
    assert store.counters(2)["watch_events"] == 1
    assert store.counters(9)["requests"] == {}


# -- domain life ---------------------------------------------------------------------------------


def test_release_drops_watches_and_transactions_and_removes_the_home(
    store: Store, dom0: StoreConnection, dom1: StoreConnection
) -> None:
    dom1.write("data", "1")
    dom1.watch("data", "t")
    dom1.transaction_start()
    dom0.watch("/local/domain/1", "gone")
    dom0.take_events()
    store.release_domain(1)
    assert store.counters(1)["watches"] == 0
    assert store.counters(1)["transactions"] == 0
    assert store.counters(1)["nodes"] == 0
    assert dom0.take_events() == [("/local/domain/1", "gone")]
    assert errno_of(dom0.read, "/local/domain/1") == "ENOENT"
    assert errno_of(dom1.read, "data") == "EIO"
    assert not store.is_introduced(1)
    assert errno_of(store.release_domain, 1) == "ENOENT"


def test_release_removes_the_domains_remaining_nodes_and_revokes_its_access(
    store: Store, dom0: StoreConnection, dom2: StoreConnection
) -> None:
    build_vif(dom0, backend=2, frontend=1)
    be = "/local/domain/2/backend/vif/1/0"
    dom0.write("/tool/owned-by-1/child", "")
    dom0.set_perms("/tool/owned-by-1", ["n1", "r2"])
    store.release_domain(1)
    assert errno_of(dom0.read, "/tool/owned-by-1") == "ENOENT"  # XSA-419: not dom0's to keep
    assert dom0.directory("/tool") == []
    assert dom0.get_perms(f"{be}/state") == ["n2"]  # XSA-322: dom1 no longer named
    store.introduce_domain(1)
    newcomer = store.connect(1)
    assert errno_of(newcomer.read, f"{be}/state") == "EACCES"
    assert dom2.read(f"{be}/state") == b"1"
