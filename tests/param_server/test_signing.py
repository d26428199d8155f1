"""With a token, checkpoints and blobs are signed: a crafted checkpoint with a valid plain SHA-256 is
refused by a real server process (it starts empty, loudly), and a blob put without the token's MAC
is refused by the reading client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamrec.param_server import checkpoint
from streamrec.param_server.client import ParamClient, ParamServerError
from streamrec.param_server.store import ParamStore
from tests.param_server.conftest import StartServer
from tests.param_server.test_fuzz import exchange, frame, hello

TOKEN = "s3cret-token"


def signed_checkpoint(start_server: StartServer, tmp_path: Path, rows: int) -> Path:
    """A checkpoint directory whose shard, run with TOKEN, stopped holding table t with `rows` rows."""
    ckpt = tmp_path / "ckpt"
    server = start_server("--checkpoint-dir", str(ckpt), "--checkpoint-every", "0", token=TOKEN)
    with ParamClient([server.address], token=TOKEN) as client:
        client.create_table("t", 4, key_type="int")
        client.push({"t": (np.arange(rows), np.ones((rows, 4), np.float32))})
    server.stop()
    return ckpt


def test_plainly_checksummed_checkpoint_is_refused_with_a_token(start_server: StartServer, tmp_path: Path) -> None:
    ckpt = signed_checkpoint(start_server, tmp_path, rows=3)
    restarted = start_server("--checkpoint-dir", str(ckpt), "--checkpoint-every", "0", token=TOKEN)
    assert restarted.ready["restored"] and not restarted.ready["empty"]  # a signed checkpoint loads
    restarted.stop()

    shard_dir = ckpt / "shard-0-of-1"
    forged = ParamStore(0, 1, previous_version=10**9, empty=False)
    taken = checkpoint.snapshot(forged)
    checkpoint.write(shard_dir / "ckpt-99999999999999999999.srps", taken.header, taken.arrays)  # plain SHA-256, valid
    checkpoint.read(shard_dir / "ckpt-99999999999999999999.srps")  # the plain checksum does check out
    for path in shard_dir.glob("ckpt-0*.srps"):
        path.unlink()  # leave only the forged one
    victim = start_server("--checkpoint-dir", str(ckpt), "--checkpoint-every", "0", token=TOKEN)
    assert victim.ready["empty"] and victim.ready["restored"] is None
    assert "signature mismatch" in victim.ready["rejected_checkpoints"][0]
    assert "STARTING EMPTY" in victim.stop()


def test_blob_without_the_tokens_mac_is_refused_by_the_reader(start_server: StartServer) -> None:
    server = start_server("--no-checkpoints", token=TOKEN)
    with ParamClient([server.address], token=TOKEN) as client:
        client.put_blob("model", b"weights")
        assert client.get_blob("model").data == b"weights"
        raw = frame({"op": "put_blob", "name": "model", "arrays": [["data", "|u1", [7], 0]]}, b"evil!!!\0")
        assert b'"ok":true' in exchange(server.address, hello(TOKEN) + raw)
        with pytest.raises(ParamServerError, match="BadSignature"):
            client.get_blob("model")


def test_a_shard_started_without_its_token_keeps_the_checkpoints_it_could_not_load(
        start_server: StartServer, tmp_path: Path) -> None:
    """Started without its token, a shard rejects every signed checkpoint and starts empty (as
    documented). Its own checkpoints then used to prune the signed ones after --keep-checkpoints
    saves, so once the token was back there was nothing left to restore. Restarted once more
    without it, the shard loads its own newest and never tries the signed ones: they must survive
    that too."""
    ckpt = signed_checkpoint(start_server, tmp_path, rows=100)
    misconfigured = start_server("--checkpoint-dir", str(ckpt), "--checkpoint-every", "0",
                                 "--keep-checkpoints", "2")
    assert misconfigured.ready["empty"] and misconfigured.ready["rejected_checkpoints"]
    with ParamClient([misconfigured.address]) as client:
        client.create_table("t", 4, key_type="int")
        for n in range(4):  # more saves than it keeps
            client.push({"t": (np.array([1000 + n]), np.ones((1, 4), np.float32))})
            client.checkpoint()
    misconfigured.stop()
    again = start_server("--checkpoint-dir", str(ckpt), "--checkpoint-every", "0", "--keep-checkpoints", "2")
    assert again.ready["restored"] and not again.ready["rejected_checkpoints"]  # its own, unsigned
    with ParamClient([again.address]) as client:
        for n in range(4):
            client.push({"t": (np.array([2000 + n]), np.ones((1, 4), np.float32))})
            client.checkpoint()
    again.stop()
    fixed = start_server("--checkpoint-dir", str(ckpt), "--checkpoint-every", "0", token=TOKEN)
    assert fixed.ready["restored"] and not fixed.ready["empty"]
    with ParamClient([fixed.address], token=TOKEN) as client:
        assert client.table_info("t")["rows"] == 100
