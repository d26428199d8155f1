"""`streamrec evaluate` prints EVALUATION.md's JSON; `streamrec refit` publishes to a live server."""

from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from streamrec.app.cli import cli
from streamrec.param_server.artifacts import KNN_BLOB, decode_dense
from streamrec.param_server.client import ParamClient
from streamrec.param_server.server import ParamServer
from streamrec.param_server.store import ParamStore
from streamrec.param_server.table_alias import resolve_tables
from streamrec.trainer.models import load
from tests.trainer.synthetic import planted_log

TOP_LEVEL = {"protocol", "model", "params", "data", "metrics", "fit_seconds", "eval_seconds", "events_per_second", "seed"}


@pytest.fixture(scope="module")
def csv_log(tmp_path_factory) -> Path:
    log = planted_log(n_users=40, n_items=30, per_user=10)
    path = tmp_path_factory.mktemp("log") / "events.csv"
    lines = ["user_id,item_id,rating,timestamp"] + [
        f"{u},{i},{r:g},{t:.0f}" for u, i, r, t in zip(log.user_id, log.item_id, log.rating, log.timestamp)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(args: list[str]) -> dict:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


@pytest.mark.parametrize(
    "protocol,model,params,metrics",
    [
        ("rating", "mf-sgd", ["factors=4", "epochs=3"], {"rmse", "mae"}),
        ("topn", "item-knn", ["k=5"], {"hr@10", "ndcg@10", "mrr", "recall@20", "coverage@10"}),
        ("prequential", "online-popularity", [], {"hr@10_second_half", "ndcg@10_second_half", "hr@10_all", "ndcg@10_all"}),
    ],
)
def test_evaluate_json_schema(csv_log, protocol, model, params, metrics):
    args = ["evaluate", "--protocol", protocol, "--model", model, "--data", str(csv_log), "--format", "csv", "--json"]
    out = _run(args + [a for p in params for a in ("--param", p)])
    assert TOP_LEVEL <= set(out) and metrics <= set(out["metrics"])
    assert out["protocol"] == protocol and out["model"] == model and out["seed"] == 0
    assert out["data"] == {"path": str(csv_log), "format": "csv", "users": 40, "items": 30, "interactions": 400}
    assert all(np.isfinite(out["metrics"][m]) for m in metrics)
    assert (out["events_per_second"] is None) == (protocol != "prequential")


def test_evaluate_rejects_unknown_params_and_wrong_protocol(csv_log):
    base = ["evaluate", "--data", str(csv_log), "--format", "csv", "--json"]
    bad_param = CliRunner().invoke(cli, base + ["--protocol", "rating", "--model", "mf-sgd", "--param", "nope=1"])
    assert bad_param.exit_code == 2 and "nope" in bad_param.output
    wrong = CliRunner().invoke(cli, base + ["--protocol", "rating", "--model", "als"])
    assert wrong.exit_code == 2 and "explicit" in wrong.output


@pytest.fixture()
def param_server():
    server = ParamServer(ParamStore())
    server.start()
    yield "{}:{}".format(*server.address)
    server.stop()


@pytest.mark.parametrize("model,params", [("item-knn", ["k=5"]), ("bpr", ["factors=4", "epochs=2"])])
def test_refit_publishes_to_the_parameter_server(csv_log, param_server, tmp_path, monkeypatch, model, params):
    monkeypatch.setenv("STREAMREC_PARAM_SERVERS", param_server)
    monkeypatch.setenv("STREAMREC_HOME", str(tmp_path))
    args = ["refit", "--model", model, "--from", str(csv_log), "--format", "csv"]
    report = _run(args + [a for p in params for a in ("--param", p)])
    assert report["model"] == model and report["events"] == 400
    assert Path(report["artefacts"]["model"], "arrays.npz").exists()
    with ParamClient(param_server) as client:
        header, arrays = decode_dense(client.get_blob(f"refit/{model}/manifest").data)
        assert header["version"] == report["version"] and len(arrays["popularity"]) == 30
        if model == "item-knn":
            assert client.get_blob(KNN_BLOB) is not None
        else:
            items, users = resolve_tables(client, "refit_bpr_items", "refit_bpr_users")
            rows = client.pull(items, ["item-000x", "item-001x"])
            # factors=4 includes the item bias (a scalar here): three factors, plus the blend coordinate (zero at weight 0)
            assert rows.vectors.shape == (2, 4) and rows.found.all()
            assert users in client.tables() and header["aliases"] == {"refit_bpr_items": items, "refit_bpr_users": users}


def test_refits_keep_the_newest_artefact_folders_only(csv_log, tmp_path, monkeypatch):
    """A refit loop wrote a version folder every period and never removed one (about 3 GB a day for
    item-knn at the compose default of every 10 minutes)."""
    monkeypatch.setenv("STREAMREC_HOME", str(tmp_path))
    folder = tmp_path / "refits" / "popularity"
    for n in range(4):  # earlier refits' folders, oldest first
        (folder / f"v{n:06d}" / "model").mkdir(parents=True)
    report = _run(["refit", "--model", "popularity", "--from", str(csv_log), "--format", "csv", "--no-publish",
                   "--keep-artefacts", "2"])
    kept = sorted(path.name for path in folder.iterdir())
    assert kept == ["v000003", f"v{report['version']:06d}"]


def test_a_model_that_learns_ratings_is_refit_on_the_rated_events_only(tmp_path, monkeypatch):
    """An unrated event (a view) entered mf-sgd's fit as a rating of 1: an item a user had only
    viewed was predicted at one star, below the log's 5-star ratings. A log without a rating
    column is refused instead of fitted on constant 1s."""
    monkeypatch.setenv("STREAMREC_HOME", str(tmp_path))
    rows = ["user_id,item_id,rating,timestamp"]
    for n, (u, i) in enumerate((u, i) for u in range(30) for i in range(10)):
        rows.append(f"u{u},r{i},5,{n}" if i < 5 else f"u{u},v{i},,{n}")  # five rated items, five viewed
    log = tmp_path / "views_and_ratings.csv"
    log.write_text("\n".join(rows) + "\n")
    report = _run(["refit", "--model", "mf-sgd", "--param", "epochs=30", "--from", str(log), "--format", "csv",
                   "--no-publish", "--out", str(tmp_path / "refits")])
    model = load(next((tmp_path / "refits" / "mf-sgd").glob("*/model")))
    rated, viewed = model.score(np.array(["u0", "u0"], object), np.array(["r0", "v5"], object))
    assert rated > 4.5 and viewed > 4.5  # a viewed item is one the fit never saw: the mean, not one star
    assert (report["events"], report["events_fitted"], report["items"]) == (300, 150, 5)
    unrated = tmp_path / "views.csv"
    unrated.write_text("user_id,item_id,timestamp\nu1,a,1\nu2,b,2\n")
    result = CliRunner().invoke(cli, ["refit", "--model", "mf-sgd", "--from", str(unrated), "--format", "csv",
                                      "--no-publish", "--out", str(tmp_path / "refits")])
    assert result.exit_code != 0 and "learns from ratings and this log has none" in result.output, result.output


def test_a_one_off_refit_against_a_server_that_is_down_is_a_clear_error(csv_log, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_PARAM_SERVERS", "127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("STREAMREC_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["refit", "--model", "popularity", "--from", str(csv_log), "--format", "csv"])
    assert result.exit_code == 1 and "refit failed" in result.output and "Traceback" not in result.output


def test_refits_publish_whatever_width_the_fit_exports(param_server, tmp_path):
    """The popularity-blend weight is chosen on validation at each fit; between 0 and not 0 the
    exported width flipped, the next create_table was refused, and a refit loop failed at every
    period for ever. Other factors (a changed --param) failed the same way."""
    from streamrec.trainer.interactions import Interactions
    from streamrec.trainer.models import create
    from streamrec.trainer.refit import publish

    data = Interactions.from_log(planted_log(n_users=40, n_items=30, per_user=10), implicit=True)
    with ParamClient(param_server) as client:
        for n, (factors, weight) in enumerate([(4, 0.0), (4, 0.5), (4, 0.0), (6, 0.0)]):
            model = create("als", factors=factors, iterations=2, popularity_blend=weight).fit(data)
            publish(client, model, n)
            items, users = resolve_tables(client, "refit_als_items", "refit_als_users")
            assert client.tables()[items]["spec"]["dim"] == factors + 1
            rows = client.pull(users, model.users.ids[:3].tolist())
            served = rows.vectors @ client.pull(items, model.items.ids.tolist()).vectors.T
            own = model.user_scores(np.arange(3))
            assert (np.argsort(-served, axis=1)[:, :5] == np.argsort(-own, axis=1)[:, :5]).all()


def test_a_refit_publishes_both_sides_as_one_version_and_drops_older_ones(param_server):
    """A refit assigned its item vectors, then its user vectors, into the same two tables in place:
    a reader between the two (or after a refit killed between them) got new items with old users,
    and rows of ids that had left the log were served for ever. Now each version has its own
    tables and one alias write switches both; the version before stays for readers mid-poll, and
    older ones (a killed refit's included) are dropped."""
    from streamrec.param_server.table_alias import alias_blob, read_alias
    from streamrec.trainer.interactions import Interactions
    from streamrec.trainer.models import create
    from streamrec.trainer.refit import publish

    first = Interactions.from_log(planted_log(n_users=40, n_items=30, per_user=10), implicit=True)
    with ParamClient(param_server) as client:
        publish(client, create("als", factors=4, iterations=2).fit(first), 1)
        _, v1 = read_alias(client, "refit_als_items")
        # a refit killed after its item table was written: nothing names it, nothing serves it
        client.create_table("refit_als_items.v2-0badc0de", dim=5, optimizer="sgd")
        client.assign("refit_als_items.v2-0badc0de", ["item-000x"], np.full((1, 5), 9.0, np.float32))
        assert read_alias(client, "refit_als_items")[1] == v1
        client.create_table("refit_als_items", dim=5, scalars=1, optimizer="sgd")  # a release before aliases
        client.create_table("refit_als_items_old", dim=5, scalars=1, optimizer="sgd")  # another model's name
        log = planted_log(n_users=40, n_items=30, per_user=10)
        later = Interactions.from_log(log.take(np.flatnonzero(log.user_id != "user-000")), implicit=True)  # one user left
        model = create("als", factors=4, iterations=2).fit(later)
        written = publish(client, model, 3)
        version, v3 = read_alias(client, "refit_als_items")
        assert version == written["blobs"][alias_blob("refit_als_items")] and v3 == written["aliases"]
        assert set(v3) == {"refit_als_items", "refit_als_users"} and set(v3.values()).isdisjoint(v1.values())
        tables = set(client.tables())
        assert set(v1.values()) | set(v3.values()) <= tables  # the version replaced stays one more round
        assert written["dropped"] == ["refit_als_items", "refit_als_items.v2-0badc0de"]
        assert "refit_als_items_old" in tables
        assert client.tables()[v3["refit_als_users"]]["rows"] == 39  # the user who left has no row
        publish(client, model, 4)
        assert set(v1.values()).isdisjoint(client.tables())



def test_of_two_refits_publishing_at_once_one_wins_and_the_alias_never_names_dropped_tables(param_server):
    """Two replicas of a refit service publish one model at once. A publish drops the tables no
    alias names, so the slower replica's alias, put without a check, named tables the faster one
    had just dropped: serving failed every poll until the next refit. Now the alias is put only
    over the version read when the tables were begun: the slower replica fails and drops its own
    tables, and the faster one's version stays whole."""
    from streamrec.param_server.client import ParamServerError
    from streamrec.param_server.table_alias import read_alias
    from streamrec.trainer.interactions import Interactions
    from streamrec.trainer.models import create
    from streamrec.trainer.refit import publish, stable_width, stage_tables, switch_tables

    data = Interactions.from_log(planted_log(n_users=40, n_items=30, per_user=10), implicit=True)
    slow, fast = (create("als", factors=4, iterations=2, seed=seed).fit(data) for seed in (0, 1))
    with ParamClient(param_server) as client:
        publish(client, slow, 1)
        staged = stage_tables(client, slow, stable_width(slow, slow.export()), 2, {"tables": {}})
        written = publish(client, fast, 3)  # the other replica, while this one's tables are written
        assert set(staged.aliases.values()) <= set(written["dropped"])  # nothing named them
        with pytest.raises(ParamServerError, match="another refit published"):
            switch_tables(client, staged)
        _, aliases = read_alias(client, "refit_als_items")
        assert aliases == written["aliases"]
        tables = client.tables()
        assert all(tables[name]["rows"] > 0 for name in aliases.values())
        assert set(staged.aliases.values()).isdisjoint(tables)
