"""The pure proof core: RFC 6962/9162 hashing, inclusion and consistency proofs, signed checkpoints."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpact.audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointSigner,
    VerifierKey,
    load_or_create_signer,
    open_checkpoint,
    parse_note,
)
from fedpact.audit.merkle import (
    EMPTY_ROOT,
    MerkleFrontier,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    memory_nodes,
    node_hash,
    perfect_subtrees,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

# RFC 6962 reference tree (certificate-transparency test data): leaf inputs and the roots of
# the trees of their first 1..8 leaves.
RFC_LEAVES = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43",
              bytes(range(0x50, 0x58)), bytes(range(0x60, 0x70))]
RFC_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def _recursive_mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1, written as the recursion, to check the iterative code against."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(_recursive_mth(leaves[:k]), _recursive_mth(leaves[k:]))


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


def test_rfc6962_reference_roots() -> None:
    hashed = [leaf_hash(x) for x in RFC_LEAVES]
    assert [root_hash(hashed[:n]).hex() for n in range(1, 9)] == RFC_ROOTS
    assert root_hash([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()


@pytest.mark.parametrize("n", [*range(0, 70), 127, 128, 129, 1000])
def test_iterative_root_and_frontier_match_the_recursive_definition(n: int) -> None:
    leaves = _leaves(n)
    expected = _recursive_mth(leaves)
    assert root_hash(leaves) == expected
    frontier = MerkleFrontier()
    frontier.extend(leaves)
    assert frontier.root() == expected


def test_frontier_reports_every_perfect_subtree_and_resumes_from_them() -> None:
    leaves = _leaves(37)
    stored: dict[tuple[int, int], bytes] = {}
    frontier = MerkleFrontier(on_node=lambda lv, ix, h: stored.__setitem__((lv, ix), h))
    frontier.extend(leaves[:20])
    resumed = MerkleFrontier.at(20, lambda keys: {k: stored[k] for k in keys if k in stored},
                                on_node=lambda lv, ix, h: stored.__setitem__((lv, ix), h))
    resumed.extend(leaves[20:])
    assert resumed.root() == root_hash(leaves)
    for (level, index), digest in stored.items():
        assert digest == root_hash(leaves[index << level:(index + 1) << level])
    assert len(stored) == 37 + 36 - bin(37).count("1") + 1  # all leaves + every completed node
    with pytest.raises(ProofError, match="lacks node"):
        MerkleFrontier.at(40, lambda keys: {})


def test_perfect_subtree_decomposition() -> None:
    assert perfect_subtrees(0, 7) == [(2, 0), (1, 2), (0, 6)]
    assert perfect_subtrees(8, 13) == [(2, 2), (0, 12)]
    with pytest.raises(ValueError, match="aligned"):
        perfect_subtrees(3, 7)


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 300), data=st.data())
def test_every_inclusion_proof_verifies_and_any_change_breaks_it(size: int, data) -> None:
    leaves = _leaves(size)
    root = root_hash(leaves)
    index = data.draw(st.integers(0, size - 1))
    proof = inclusion_proof(index, size, memory_nodes(leaves))
    verify_inclusion(index, size, leaves[index], proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaf_hash(b"forged"), proof, root)
    if proof:
        flipped = list(proof)
        k = data.draw(st.integers(0, len(proof) - 1))
        flipped[k] = bytes([flipped[k][0] ^ 1]) + flipped[k][1:]
        with pytest.raises(ProofError):
            verify_inclusion(index, size, leaves[index], flipped, root)
        with pytest.raises(ProofError):
            verify_inclusion(index, size, leaves[index], proof[:-1], root)
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaves[index], [*proof, leaves[0]], root)
    if size > 1:
        other = (index + 1) % size
        with pytest.raises(ProofError):
            verify_inclusion(other, size, leaves[index], proof, root)


@settings(max_examples=150, deadline=None)
@given(new_size=st.integers(1, 300), data=st.data())
def test_every_consistency_proof_verifies_and_a_rewritten_prefix_fails(new_size: int, data) -> None:
    leaves = _leaves(new_size)
    old_size = data.draw(st.integers(1, new_size))
    old_root, new_root = root_hash(leaves[:old_size]), root_hash(leaves)
    proof = consistency_proof(old_size, new_size, memory_nodes(leaves))
    verify_consistency(old_size, new_size, old_root, new_root, proof)
    if old_size < new_size:
        # the same new tree, but with one leaf of the old prefix rewritten
        k = data.draw(st.integers(0, old_size - 1))
        forged = list(leaves)
        forged[k] = leaf_hash(b"rewritten")
        forged_proof = consistency_proof(old_size, new_size, memory_nodes(forged))
        with pytest.raises(ProofError):
            verify_consistency(old_size, new_size, old_root, root_hash(forged), forged_proof)
        with pytest.raises(ProofError):
            verify_consistency(old_size, new_size, old_root, new_root, proof[:-1])
        with pytest.raises(ProofError, match="backwards"):
            verify_consistency(new_size, old_size, new_root, old_root, proof)


def test_proof_requests_out_of_range_are_refused() -> None:
    nodes = memory_nodes(_leaves(4))
    with pytest.raises(ProofError, match="outside"):
        inclusion_proof(4, 4, nodes)
    with pytest.raises(ProofError, match="cannot prove"):
        consistency_proof(5, 4, nodes)
    with pytest.raises(ProofError, match="lacks node"):
        inclusion_proof(0, 8, nodes)  # a tree that was never integrated that far
    with pytest.raises(ProofError, match="two different roots"):
        verify_consistency(3, 3, b"a" * 32, b"b" * 32, [])


# --- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_in_signed_note_format() -> None:
    signer = CheckpointSigner.generate("fedpact-audit-test")
    root = root_hash(_leaves(5))
    note = signer.sign(Checkpoint("fedpact-audit/test", 5, root, ("timestamp 2025-01-01T00:00:00+00:00",)))
    lines = note.split("\n")
    assert lines[:4] == ["fedpact-audit/test", "5", base64.b64encode(root).decode(),
                         "timestamp 2025-01-01T00:00:00+00:00"]
    assert lines[4] == "" and lines[5].startswith("\u2014 fedpact-audit-test ")
    key = VerifierKey.parse(signer.verifier.encode())
    opened = open_checkpoint(note, key)
    assert opened.tree_size == 5 and opened.root_hash == root
    assert opened.timestamp == "2025-01-01T00:00:00+00:00"
    # the signer key text round-trips too (the format of Go's sumdb/note)
    again = CheckpointSigner.parse_private(signer.encode_private())
    assert again.verifier == signer.verifier


def test_altered_or_foreign_checkpoints_are_refused() -> None:
    signer = CheckpointSigner.generate("log-a")
    note = signer.sign(Checkpoint("origin", 9, root_hash(_leaves(9))))
    key = signer.verifier
    bigger = note.replace("\n9\n", "\n10\n", 1)
    with pytest.raises(CheckpointError, match="does not verify"):
        open_checkpoint(bigger, key)
    other = CheckpointSigner.generate("log-a").verifier
    with pytest.raises(CheckpointError, match="not signed by log-a"):
        open_checkpoint(note, other)
    with pytest.raises(CheckpointError, match="blank line"):
        parse_note("origin\n9\n")
    with pytest.raises(CheckpointError, match="key id does not match"):
        VerifierKey.parse(key.encode().replace(key.key_id.hex(), "00000000"))
    with pytest.raises(CheckpointError, match="name\\+keyid\\+base64key"):
        VerifierKey.parse("not-a-key")


def test_signing_key_file_is_created_once_and_private(tmp_path) -> None:
    path = tmp_path / "ledger.db.signing-key"
    first = load_or_create_signer(path, "log")
    second = load_or_create_signer(path, "other-name-ignored")
    assert first.verifier == second.verifier
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("PRIVATE+KEY+garbage")
    with pytest.raises(CheckpointError, match="not of the form"):
        load_or_create_signer(path, "log")
